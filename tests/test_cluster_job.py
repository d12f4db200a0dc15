"""`ray start --head` with token auth, `ray job submit` of the training job, then `ray stop`: the README's recipe."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.cluster
RAY = str(Path(sys.executable).with_name("ray"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(args: list[str], env: dict, timeout: int) -> subprocess.CompletedProcess:
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT)


def submit(args: list[str], env: dict, timeout: int) -> subprocess.CompletedProcess:
    """`ray job submit`, retried while the head's job agent is still starting (it answers 500 for a while after
    `ray start` returns, longer on a busy machine)."""
    deadline = time.monotonic() + 120
    while True:
        submitted = run(args, env, timeout)
        if "No available agent" not in submitted.stderr or time.monotonic() > deadline:
            return submitted
        time.sleep(5)


def test_train_through_ray_job_submit(tmp_path):
    env = {**os.environ, "HOME": str(tmp_path), "RAY_AUTH_MODE": "token"}
    env.pop("RAY_ADDRESS", None)
    dashboard = free_port()
    assert run([RAY, "get-auth-token", "--generate"], env, 60).returncode == 0
    started = run(
        [
            RAY,
            "start",
            "--head",
            "--num-cpus=4",
            f"--port={free_port()}",
            f"--dashboard-port={dashboard}",
            "--dashboard-host=127.0.0.1",
            "--disable-usage-stats",
            '--resources={"decode": 2}',
        ],
        env,
        120,
    )  # decoding is pinned to this node's "decode" resource
    assert started.returncode == 0, started.stderr[-2000:]
    try:
        excludes = json.dumps({"excludes": [".venv/", "data/", "runs/", "mlflow.db", ".git/", "*.egg-info/"]})
        submitted = submit(
            [
                RAY,
                "job",
                "submit",
                "--address",
                f"http://127.0.0.1:{dashboard}",
                "--working-dir",
                ".",
                "--runtime-env-json",
                excludes,
                "--",
                sys.executable,
                "-m",
                "jobs.train",
                f"data.demo.out={tmp_path / 'demo'}",
                "data.demo.videos_per_class=6",
                f"run.storage_path={tmp_path / 'runs'}",
                "run.name=submitted",
                f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
                "mlflow.log_models=false",
                "mlflow.system_metrics=false",
                "train.epochs=1",
                "data.decode_resources={decode: 1}",
            ],
            env,
            600,
        )
        assert submitted.returncode == 0, submitted.stdout[-4000:] + submitted.stderr[-2000:]
        assert "MLflow run id:" in submitted.stdout
    finally:
        stopped = run([RAY, "stop", "--force"], env, 120)
    assert stopped.returncode == 0
    runs = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").search_runs(
        [MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_experiment_by_name("mvit").experiment_id]
    )
    assert len(runs) == 1 and "val/top1" in runs[0].data.metrics
    assert (tmp_path / "runs" / "submitted").is_dir()
