"""MLflow tracking against a real sqlite store: one run per training key, metrics committed exactly once."""

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from pipeline.tracking import RunLogger, get_or_create_run, redact, resolve_tracking_uri, safe_params


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
    logger = RunLogger(mlflow_uri, run_id, system_metrics=False)
    assert logger.commit([("train/loss", 1.0, 1, 1000), ("train/loss", 0.9, 2, 1001)]) == 2
    logger.close()
    # A resumed attempt re-commits the buffer it found in its checkpoint: only the new step goes in.
    resumed = RunLogger(mlflow_uri, run_id, system_metrics=False)
    assert resumed.commit([("train/loss", 0.9, 2, 1001), ("train/loss", 0.8, 3, 1002)]) == 1
    resumed.close()
    history = MlflowClient(mlflow_uri).get_metric_history(run_id, "train/loss")
    assert sorted((m.step, m.value) for m in history) == [(1, 1.0), (2, 0.9), (3, 0.8)]
    assert mlflow.active_run() is None
