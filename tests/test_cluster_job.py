"""The README's cluster recipe: `ray start --head` with token auth, then the jobs through `ray job submit` (which sets
RAY_ADDRESS) and run directly beside a `ray start` cluster (which they find by its address file).

One cluster for the module, started with its own temp dir, and stopped by ending only the processes whose command
line names that dir: `ray stop` would end every Ray on the machine, other test sessions' included.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import REPO_ROOT
from tests.test_benchmark_pipeline import SMALL_CLIPS
from tests.test_evaluate import _checkpoint
from tests.videos import H264_BFRAMES_LONG_GOP, write_indexed_video

pytestmark = pytest.mark.cluster
RAY = str(Path(sys.executable).with_name("ray"))
AGENT_PORTS = (
    "dashboard-agent-listen-port",
    "dashboard-agent-grpc-port",
    "runtime-env-agent-port",
    "metrics-export-port",
    "ray-client-server-port",
)
EXCLUDES = json.dumps({"excludes": [".venv/", "data/", "runs/", "mlruns/", "mlflow.db", ".git/", "*.egg-info/"]})


@dataclass
class Cluster:
    env: dict[str, str]  # RAY_TMPDIR points at the cluster's temp dir; no RAY_ADDRESS
    dashboard: str
    folder: Path  # scratch space for the jobs' outputs


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(args: list[str], env: dict, timeout: int) -> subprocess.CompletedProcess:
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT)


def _of_cluster(process: psutil.Process, temp_dir: str) -> bool:
    """Whether a process belongs to the cluster of `temp_dir`: named in its command line, inherited in its RAY_TMPDIR,
    or open among its files (Ray renames some processes, e.g. `ray::DashboardAgent`, which hides the first)."""
    try:
        return (
            temp_dir in " ".join(process.cmdline())
            or process.environ().get("RAY_TMPDIR") == temp_dir
            or any(temp_dir in file.path for file in process.open_files())
        )
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False


def stop_own_ray(temp_dir: Path) -> list[int]:
    """End the processes of the cluster whose temp dir is `temp_dir` (and their children), and no other; returns
    their pids."""
    mine = {os.getpid(), *(parent.pid for parent in psutil.Process().parents())}
    own = {process.pid: process for process in psutil.process_iter() if _of_cluster(process, str(temp_dir))}
    for process in list(own.values()):
        with contextlib.suppress(psutil.NoSuchProcess):
            own.update({child.pid: child for child in process.children(recursive=True)})
    own = {pid: process for pid, process in own.items() if pid not in mine}
    for process in own.values():
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()  # at once, as `ray stop --force` does: some wait out a SIGTERM's whole grace period
    return sorted(own)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("cluster")
    temp_dir = Path(tempfile.mkdtemp(prefix="rc", dir="/tmp"))  # short: Ray's unix sockets live under it
    env = {**os.environ, "HOME": str(folder), "RAY_AUTH_MODE": "token", "RAY_TMPDIR": str(temp_dir)}
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
            # Ports of its own: Ray's defaults (e.g. the job agent's 52365) may be held by another Ray here, and
            # then `ray job submit` answers "No available agent" forever.
            *(f"--{name}={free_port()}" for name in AGENT_PORTS),
            "--dashboard-host=127.0.0.1",
            "--disable-usage-stats",
            '--resources={"decode": 2}',  # decoding is pinned to this node's "decode" resource
            f"--temp-dir={temp_dir / 'ray'}",  # the default temp dir under RAY_TMPDIR: jobs find its address file
        ],
        env,
        180,
    )
    try:
        assert started.returncode == 0, started.stderr[-2000:]
        yield Cluster(env, f"http://127.0.0.1:{dashboard}", folder)
    finally:
        stop_own_ray(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def submit(cluster: Cluster, *entrypoint: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """`ray job submit` of a job, retried while the head's job agent is still starting (it answers "No available
    agent" for a while after `ray start` returns, longer on a busy machine)."""
    args = [RAY, "job", "submit", "--address", cluster.dashboard, "--working-dir", "."]
    args += ["--runtime-env-json", EXCLUDES, "--", sys.executable, *entrypoint]
    deadline = time.monotonic() + 120
    while True:
        submitted = run(args, cluster.env, timeout)
        if "No available agent" not in submitted.stderr or time.monotonic() > deadline:
            assert submitted.returncode == 0, submitted.stdout[-4000:] + submitted.stderr[-2000:]
            return submitted
        time.sleep(5)


def test_train_through_ray_job_submit(cluster):
    tmp_path = cluster.folder
    submitted = submit(
        cluster,
        "-m",
        "jobs.train",
        f"data.demo.out={tmp_path / 'demo'}",
        "data.demo.videos_per_class=6",
        f"run.storage_path={tmp_path / 'runs'}",
        "run.name=submitted",
        f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        f"data.index_cache={tmp_path / 'index_cache'}",
        "mlflow.log_models=false",
        "mlflow.system_metrics=false",
        "train.epochs=1",
        "data.decode_resources={decode: 1}",
    )
    assert "MLflow run id:" in submitted.stdout and "epoch 1/1" in submitted.stdout
    assert "Reporting training result" not in submitted.stdout  # Ray Train's per-worker dumps: quiet by default
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("mvit")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1 and "val/top1" in runs[0].data.metrics
    assert (tmp_path / "runs" / "submitted").is_dir()
    # The job ran in a working directory Ray deletes: the artifacts must be beside the store instead.
    assert runs[0].info.artifact_uri.startswith((tmp_path / "mlruns").as_uri())
    assert (tmp_path / "mlruns").is_dir()


def test_index_and_evaluate_through_ray_job_submit(cluster, demo):
    tmp_path = cluster.folder
    index = tmp_path / "val_index.parquet"
    indexed = submit(cluster, "-m", "jobs.prepare", "index", "--manifest", str(demo.val_manifest), "--out", str(index))
    assert "8 usable, 0 left out" in indexed.stdout
    checkpoint = _checkpoint(tmp_path / "checkpoint", [f"class{i}" for i in range(8)])
    evaluated = submit(
        cluster,
        "-m",
        "jobs.evaluate",
        f"model={checkpoint}",
        f"data.test={index}",
        f"data.root={demo.root}",
        "data.test_clips=1",
        f"mlflow.tracking_uri=sqlite:///{tmp_path / 'eval.db'}",
    )
    assert "videos evaluated: 8" in evaluated.stdout and "MLflow evaluation run id:" in evaluated.stdout


def test_the_pipeline_benchmark_through_ray_job_submit_and_beside_a_ray_start_cluster(cluster):
    video = write_indexed_video(cluster.folder / "video.mp4", H264_BFRAMES_LONG_GOP)
    arguments = ["-m", "jobs.benchmark", "pipeline", str(video), "--repeat", "2", "--rounds", "1", *SMALL_CLIPS]
    submitted = submit(cluster, *arguments)
    assert "ray/loop" in submitted.stdout
    # No RAY_ADDRESS: the job finds the cluster `ray start` left its address for, and does not size it.
    direct = run([sys.executable, *arguments], cluster.env, 600)
    assert direct.returncode == 0, direct.stdout[-2000:] + direct.stderr[-2000:]
    assert "joining the Ray cluster at" in direct.stdout and "ray/loop" in direct.stdout
