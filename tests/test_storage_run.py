"""A run that keeps everything in a bucket of a real local S3 server: videos, manifests, label map, indexes (written
by `jobs.prepare index`, and the index cache of `jobs.train`), checkpoints (`run.storage_path=s3://...`) and MLflow's
artifacts. The training is killed with its Ray once a checkpoint is in the bucket, and the same command resumes it
from there; `jobs.evaluate` finds the newest checkpoint by searching the bucket. A video that vanishes after it was
indexed is skipped and counted, and the epoch goes on. The commands run in subprocesses whose Ray workers inherit
the server's endpoint and credentials from the environment, as on a cluster. The model is mvit_v2_tiny, so that the
MViTv2 family also trains, resumes and exports end to end (mvit_tiny does in tests/test_train.py, test_faults.py)."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import boto3
import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from pipeline import checkpoints, storage
from tests.conftest import REPO_ROOT
from tests.mlflow_server import tracking_server
from tests.videos import VideoSpec, write_indexed_video

pytestmark = [pytest.mark.ray, pytest.mark.bucket_run]

CLASSES = ("left", "right")


def upload_dataset(tmp_path: Path, data: str) -> None:
    """2 classes × 3 small videos; train takes 2 of each, val and test the third."""
    rows: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for label, name in enumerate(CLASSES):
        for number in range(3):
            local = write_indexed_video(tmp_path / f"{name}{number}.mp4", VideoSpec(num_frames=40 + 5 * label))
            storage.write_bytes(f"{data}/videos/{name}/{number}.mp4", local.read_bytes())
            split = "train" if number < 2 else "val"
            rows[split].append(f"videos/{name}/{number}.mp4,{name}")
            if split == "val":
                rows["test"].append(f"videos/{name}/{number}.mp4,{name}")
    storage.write_text(f"{data}/labels.txt", "".join(f"{name}\n" for name in CLASSES))
    for split, lines in rows.items():
        storage.write_text(f"{data}/{split}.csv", "path,label\n" + "\n".join(lines) + "\n")


def job_environment(s3, tmp_path: Path) -> dict[str, str]:
    """What a driver on a cluster node has: the store's endpoint and credentials in its environment."""
    env = {
        **os.environ,
        **s3.env,
        "PYTHONPATH": str(REPO_ROOT),
        "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
        "HOME": str(tmp_path),  # no ~/.aws of whoever runs the tests
    }
    env.pop("RAY_ADDRESS", None)
    return env


def start_jobs(s3, tmp_path: Path, *commands: tuple[str, list[str]], log: str) -> subprocess.Popen:
    """The commands, one after another, in one new process group (it and its local Ray can be killed together)."""
    script = [sys.executable, str(REPO_ROOT / "tests" / "jobs_in_one_ray.py"), json.dumps(commands)]
    with open(tmp_path / log, "w") as out:
        return subprocess.Popen(
            script,
            env=job_environment(s3, tmp_path),
            cwd=tmp_path,
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )


def kill_after_first_checkpoint(jobs: subprocess.Popen, runs: str, run_name: str, timeout: float = 400) -> Path:
    """SIGKILL the jobs and their Ray (a lost driver node) as soon as a complete checkpoint is in the bucket."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert jobs.poll() is None, "the first command ended before it could be killed"
        complete = checkpoints.latest_checkpoint(runs, run_name)
        if complete is not None:
            os.killpg(jobs.pid, signal.SIGKILL)
            jobs.wait()
            return complete
        time.sleep(0.25)
    raise TimeoutError(f"no checkpoint in {runs}/{run_name} within {timeout} s")


def test_index_train_kill_resume_and_evaluate_with_everything_in_a_bucket(s3, tmp_path, run_overrides):
    """MLflow's artifacts go to the same bucket through an `mlflow server --artifacts-destination s3://...` (the
    README's cluster recipe), and the logged model loads back from it as an MLflow user loads it."""
    bucket = s3.bucket("run-tests")
    data, runs, artifacts = f"{bucket}/k400", f"{bucket}/runs", f"{bucket}/mlflow"
    (tmp_path / "server").mkdir()
    with tracking_server(tmp_path / "server", artifacts, env=job_environment(s3, tmp_path)) as server:
        upload_dataset(tmp_path, data)
        chain(s3, tmp_path, run_overrides, data, runs, server.url)
        experiment = MlflowClient(server.url).get_experiment_by_name("mvit")
        assert experiment.artifact_location.startswith("mlflow-artifacts:"), experiment.artifact_location
        run = only_training_run(server.url, experiment.experiment_id)
        stored = boto3.client("s3", endpoint_url=s3.server.url).list_objects_v2(Bucket="run-tests", Prefix="mlflow/")
        keys = [entry["Key"] for entry in stored.get("Contents", [])]
        assert any(key.endswith(f"{run.info.run_id}/artifacts/config.yaml") for key in keys), keys
        assert not list((tmp_path / "server").rglob("config.yaml"))  # nothing kept beside the server instead
        mlflow.set_tracking_uri(server.url)
        exported = mlflow.pytorch.load_model(f"runs:/{run.info.run_id}/best_model")
        with torch.no_grad():
            assert exported(torch.randn(1, 3, 4, 32, 32)).shape == (1, len(CLASSES))


def chain(s3, tmp_path: Path, run_overrides, data: str, runs: str, tracking_uri: str) -> None:
    """`jobs.prepare index` and a 2-epoch `jobs.train`, killed with its Ray once its first checkpoint (epoch 1's) is
    in the bucket; a video removed; the same command with `run.resume=latest`; `jobs.evaluate` by checkpoint search.
    The tracking server, still starting, is waited for only before the first training (its start-up overlaps this
    process's and its Ray's)."""
    bucket = runs.rsplit("/", 1)[0]
    tiny = [
        "model.name=mvit_v2_tiny",
        "scaling.num_workers=1",  # an epoch: 2 steps, or 1 (a partial batch) once a video is gone
        "train.batch_size=2",
        "train.epochs=2",
        "data.num_frames=4",
        "data.crop_size=32",
        "data.augment.min_short_side=32",
        "data.augment.max_short_side=36",
        "data.test_short_side=32",
        "data.num_clips=1",
        "data.videos_per_task=2",
        f"data.index_cache={bucket}/index-cache",
        f"run.storage_path={runs}",
        f"mlflow.tracking_uri={tracking_uri}",
    ]
    overrides = run_overrides(tmp_path, f"{data}/train.csv", f"{data}/val_index.parquet", *tiny)
    index = ["index", "--manifest", f"{data}/val.csv", "--out", f"{data}/val_index.parquet"]
    steps = ("prepare", index), ("wait", [tracking_uri]), ("train", overrides)
    first = start_jobs(s3, tmp_path, *steps, log="first.log")
    killed_after = kill_after_first_checkpoint(first, runs, "test")
    assert storage.read_parquet(f"{data}/val_index.parquet").column("status").to_pylist() == ["ok", "ok"]
    evaluate = [
        "run.name=test",
        f"run.storage_path={runs}",
        f"data.test={data}/test.csv",
        "data.test_clips=1",
        f"data.index_cache={bucket}/index-cache",
        f"mlflow.tracking_uri={tracking_uri}",
    ]
    second = start_jobs(
        s3,
        tmp_path,
        ("remove", [f"{data}/videos/left/0.mp4"]),  # indexed as fine, gone by the resumed epochs: skipped, counted
        ("train", [*overrides, "run.resume=latest"]),
        ("evaluate", evaluate),
        log="second.log",
    )
    second.wait(timeout=600)
    printed = (tmp_path / "second.log").read_text()
    assert second.returncode == 0, printed[-5000:]
    assert f"took over the lock of pid {first.pid} on " in printed  # the killed driver's lock object
    resumed_from = re.search(r"training from (s3://\S+) \(step (\d+)\)", printed)
    assert resumed_from and int(resumed_from.group(2)) >= 2, printed[-5000:]  # from a checkpoint in the bucket
    assert resumed_from.group(1) >= str(killed_after)  # that checkpoint, or a later one the kill left whole
    cached = sorted(entry.name for entry in storage.list_dir(f"{bucket}/index-cache"))
    assert [name.split("-")[0] for name in cached] == ["test", "train"], cached
    newest = sorted(checkpoints.checkpoint_folders(f"{runs}/test"))[-1]
    assert isinstance(newest, storage.UriPath) and checkpoints.verify(newest)["loop"]["epoch"] == 2
    assert f"model: {newest}" in printed and "videos evaluated: 2" in printed  # evaluate found the newest


def only_training_run(tracking_uri: str, experiment_id: str):
    """The one training run (the killed command's, continued by the resumed one), finished, of mvit_v2_tiny, every
    epoch logged with finite losses and a validation, the vanished video counted, no credential in its params."""
    client = MlflowClient(tracking_uri)
    found = client.search_runs([experiment_id])
    training = [run for run in found if "train.epochs" in run.data.params]
    assert len(training) == 1, [run.info.run_id for run in found]
    run = training[0]
    assert run.info.status == "FINISHED" and run.data.params["model.name"] == "mvit_v2_tiny"
    epochs = client.get_metric_history(run.info.run_id, "train/epoch")
    assert sorted(metric.value for metric in epochs) == [1.0, 2.0], epochs
    losses = [metric.value for metric in client.get_metric_history(run.info.run_id, "train/loss")]
    assert losses and all(math.isfinite(loss) for loss in losses), losses
    # A validation at each epoch's end (the logged models repeat their epoch's figures in the run's history).
    top1 = client.get_metric_history(run.info.run_id, "val/top1")
    assert {metric.step for metric in top1} == {metric.step for metric in epochs}, top1
    assert all(0.0 <= metric.value <= 1.0 for metric in top1), top1
    skipped = [metric.value for metric in client.get_metric_history(run.info.run_id, "data/skipped_videos")]
    assert max(skipped) >= 1, skipped
    assert all("testing-secret-key" not in json.dumps(other.data.params) for other in found)
    return run
