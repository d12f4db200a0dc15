"""MLflow tracking against a real sqlite store: one run per training key, metrics committed exactly once."""

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from pipeline.errors import TrackingError
from pipeline.tracking import RunLogger, check_record, get_or_create_run, redact, resolve_tracking_uri, safe_params


def test_relative_sqlite_uri_becomes_absolute(tmp_path):
    assert resolve_tracking_uri("sqlite:///mlflow.db", tmp_path) == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert resolve_tracking_uri("http://127.0.0.1:5000", tmp_path) == "http://127.0.0.1:5000"
    with pytest.raises(ValueError, match="file stores"):
        resolve_tracking_uri("file:///tmp/mlruns", tmp_path)


@pytest.mark.faults
def test_credentials_never_reach_params():
    assert redact("http://alice:s3cret@mlflow.example:5000/x") == "http://mlflow.example:5000/x"
    assert redact("s3://bucket/path") == "s3://bucket/path"
    params = safe_params({"mlflow.tracking_uri": "postgresql://bob:pw@db:5432/m", "auth.token": "abc", "lr": 0.1})
    assert params == {"mlflow.tracking_uri": "postgresql://db:5432/m", "auth.token": "***", "lr": "0.1"}


def test_same_run_key_gives_the_same_run(mlflow_uri):
    first = get_or_create_run(mlflow_uri, "exp", "/runs/a", "a")
    assert get_or_create_run(mlflow_uri, "exp", "/runs/a", "a") == first
    assert get_or_create_run(mlflow_uri, "exp", "/runs/b", "b") != first


@pytest.mark.faults
def test_commit_logs_each_step_once(mlflow_uri):
    run_id = get_or_create_run(mlflow_uri, "exp", "/runs/c", "c")
    logger = RunLogger(mlflow_uri, run_id, system_metrics=False, retry_seconds=0)
    assert logger.commit([("train/loss", 1.0, 1, 1000), ("train/loss", 0.9, 2, 1001)]) == 2
    logger.close()
    # A resumed attempt re-commits the buffer it found in its checkpoint: only the new step goes in.
    resumed = RunLogger(mlflow_uri, run_id, system_metrics=False, retry_seconds=0)
    assert resumed.commit([("train/loss", 0.9, 2, 1001), ("train/loss", 0.8, 3, 1002)]) == 1
    resumed.close()
    history = MlflowClient(mlflow_uri).get_metric_history(run_id, "train/loss")
    assert sorted((m.step, m.value) for m in history) == [(1, 1.0), (2, 0.9), (3, 0.8)]
    assert mlflow.active_run() is None


def test_metrics_a_store_did_not_take_are_kept_retried_and_an_incomplete_record_is_an_error(tmp_path):
    """A store that stops answering writes (here: sqlite cannot create its journal, which also stops a root
    process, unlike a read-only file): nothing is dropped, and a run it could not finish is never a success."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = get_or_create_run(uri, "exp", "/runs/d", "d")
    logger = RunLogger(uri, run_id, system_metrics=False, retry_seconds=2)
    journal = tmp_path / "mlflow.db-journal"
    journal.mkdir()
    kept = logger.commit_or_keep([("train/loss", 1.0, 1, 1000)])
    assert kept == [("train/loss", 1.0, 1, 1000)]
    journal.rmdir()
    assert logger.commit_or_keep([*kept, ("train/loss", 0.9, 2, 1001)]) == []
    journal.mkdir()
    assert logger.finish([("train/loss", 0.8, 3, 1002)]) is False
    journal.rmdir()
    history = MlflowClient(uri).get_metric_history(run_id, "train/loss")
    assert sorted((m.step, m.value) for m in history) == [(1, 1.0), (2, 0.9)]
    with pytest.raises(TrackingError, match=f"MLflow run {run_id} .* is incomplete: it is RUNNING"):
        check_record(uri, run_id, models_expected=False)
    assert logger.finish([("train/loss", 0.8, 3, 1002)]) is True  # the store answers again: the rest goes in
    assert len(MlflowClient(uri).get_metric_history(run_id, "train/loss")) == 3
    with pytest.raises(TrackingError, match="its models were not logged"):
        check_record(uri, run_id, models_expected=True)
    assert mlflow.active_run() is None


def test_experiments_are_training_experiments_with_artifacts_beside_the_store(mlflow_uri, tmp_path):
    run_id = get_or_create_run(mlflow_uri, "exp", "/runs/e", "e")
    client = MlflowClient(mlflow_uri)
    experiment = client.get_experiment(client.get_run(run_id).info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert experiment.artifact_location == (tmp_path / "mlruns").as_uri()
