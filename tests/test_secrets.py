"""Secrets in a config: credentials never written or printed, environment values resolved only where used.

The fault suite's driver run checks the same on a real run (stdout, Ray's logs, checkpoints, the MLflow store);
these check each place the config is written or sent, without Ray.
"""

from __future__ import annotations

import os
import pickle

import pyarrow as pa
import pytest
from omegaconf import OmegaConf

from jobs.cli import print_config
from pipeline import secrets
from pipeline.config import load_config, typed
from pipeline.training.driver import PATH_KEYS, DataPlan, make_job

pytestmark = pytest.mark.faults

PASSWORD = "s3cret-pw-123"
TOKEN = "tok-from-env-456"


def test_credentials_are_removed_from_uris():
    assert secrets.redact("http://alice:s3cret@mlflow.example:5000/x") == "http://mlflow.example:5000/x"
    assert secrets.redact("s3://bucket/p?access_key=AK&secret_key=SK&region=eu") == (
        "s3://bucket/p?access_key=***&secret_key=***&region=eu"
    )
    assert secrets.redact("sqlite:////tmp/mlflow.db") == "sqlite:////tmp/mlflow.db"
    assert secrets.shown("auth.api_key", "abc") == "***" and secrets.shown("train.lr", 0.1) == 0.1


@pytest.fixture()
def cfg(tmp_path, monkeypatch):
    """A config with a password in the tracking URI and a token from the environment in another key."""
    monkeypatch.setenv("FAULTS_TOKEN", TOKEN)
    return load_config(
        overrides=[
            f"mlflow.tracking_uri=http://alice:{PASSWORD}@127.0.0.1:5000",
            "mlflow.experiment=exp-${oc.env:FAULTS_TOKEN}",
            f"run.storage_path={tmp_path}/runs",
            "run.name=r",
        ]
    )


def small_plan() -> DataPlan:
    rows = pa.table({"path": ["a.mp4"] * 4, "label": [0, 1, 0, 1]})
    return DataPlan(rows, rows, ["cat", "dog"], [])


def test_what_is_written_or_printed_holds_no_secret(cfg, capsys):
    public = secrets.public_config(cfg, typed(cfg))
    assert public["mlflow"]["tracking_uri"] == "http://127.0.0.1:5000"
    assert public["mlflow"]["experiment"] == "exp-${oc.env:FAULTS_TOKEN}"
    job = make_job(typed(cfg), small_plan(), "run-id", raw=cfg)
    print_config(cfg)
    places = {
        "stdout": capsys.readouterr().out,
        "config.yaml": job.config_yaml,
        "checkpoint and params": repr(job.public_config),
        "repr (Ray Train's exported train_loop_config)": repr(job) + str(job),
    }
    leaks = [place for place, text in places.items() if PASSWORD in text or TOKEN in text]
    assert leaks == [], leaks
    assert "alice" not in places["config.yaml"] and "${oc.env:FAULTS_TOKEN}" in places["config.yaml"]
    sent = pickle.dumps(job)  # what travels to the workers: the environment's value does not
    assert TOKEN.encode() not in sent
    print(f"FAULT secrets-written: injected=2 places_checked={len(places) + 1} leaks={len(leaks)}")


def test_the_worker_resolves_environment_values_itself(cfg, monkeypatch):
    job = make_job(typed(cfg), small_plan(), "run-id", raw=cfg)
    assert job.config.mlflow.experiment == "exp-${oc.env:FAULTS_TOKEN}"
    monkeypatch.setenv("FAULTS_TOKEN", "the-workers-own")
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    on_worker = job.resolved()
    assert on_worker.config.mlflow.experiment == "exp-the-workers-own"
    # MLflow echoes its tracking URI in "View run" links: the credentials go to its environment variables instead
    assert on_worker.config.mlflow.tracking_uri == "http://127.0.0.1:5000"
    assert os.environ["MLFLOW_TRACKING_USERNAME"] == "alice" and os.environ["MLFLOW_TRACKING_PASSWORD"] == PASSWORD
    monkeypatch.delenv("FAULTS_TOKEN")
    with pytest.raises(secrets.ConfigError, match="FAULTS_TOKEN"):
        job.resolved()


def test_paths_from_the_environment_are_resolved_on_the_driver(tmp_path, monkeypatch):
    monkeypatch.setenv("FAULTS_RUNS", str(tmp_path / "elsewhere"))
    cfg = load_config(overrides=["run.storage_path=${oc.env:FAULTS_RUNS}", "run.name=r"])
    worker = secrets.for_workers(cfg, typed(cfg), PATH_KEYS)
    assert worker.run.storage_path == str(tmp_path / "elsewhere")
    assert OmegaConf.to_yaml(secrets.public_config(cfg)).count("${oc.env:FAULTS_RUNS}") == 1
