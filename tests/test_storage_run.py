"""A run that keeps everything in a bucket of a real local S3 server: videos, manifests, label map, indexes (written
by `jobs.prepare index`, and the index cache of `jobs.train`), checkpoints (`run.storage_path=s3://...`), read back
by a resumed run and by `jobs.evaluate`'s checkpoint search. A video that vanishes after it was indexed is skipped
and counted, and the epoch goes on. One chain of commands in one subprocess and one Ray, whose workers inherit the
server's endpoint and credentials from the environment, as on a cluster."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipeline import checkpoints, storage
from tests.conftest import REPO_ROOT
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


def run_jobs(s3, tmp_path: Path, *commands: tuple[str, list[str]]) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        **s3.env,
        "PYTHONPATH": str(REPO_ROOT),
        "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
        "HOME": str(tmp_path),  # no ~/.aws of whoever runs the tests
    }
    env.pop("RAY_ADDRESS", None)
    script = [sys.executable, str(REPO_ROOT / "tests" / "jobs_in_one_ray.py"), json.dumps(commands)]
    return subprocess.run(script, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)


def test_index_train_resume_and_evaluate_with_everything_in_a_bucket(s3, tmp_path, run_overrides):
    bucket = s3.bucket("run-tests")
    data, runs = f"{bucket}/k400", f"{bucket}/runs"
    upload_dataset(tmp_path, data)
    tiny = [
        "scaling.num_workers=1",  # epoch 1: 2 steps; epoch 2, a video short: 1 step (a partial batch)
        "train.batch_size=2",
        "data.num_frames=4",
        "data.crop_size=32",
        "data.augment.min_short_side=32",
        "data.augment.max_short_side=36",
        "data.test_short_side=32",
        "data.num_clips=1",
        "data.videos_per_task=2",
        f"data.index_cache={bucket}/index-cache",
        f"run.storage_path={runs}",
    ]
    overrides = run_overrides(tmp_path, f"{data}/train.csv", f"{data}/val_index.parquet", *tiny)
    index = ["index", "--manifest", f"{data}/val.csv", "--out", f"{data}/val_index.parquet"]
    evaluate = [
        "run.name=test",
        f"run.storage_path={runs}",
        f"data.test={data}/test.csv",
        "data.test_clips=1",
        f"data.index_cache={bucket}/index-cache",
        f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
    ]
    done = run_jobs(
        s3,
        tmp_path,
        ("prepare", index),
        ("train", [*overrides, "train.epochs=1"]),
        ("remove", [f"{data}/videos/left/0.mp4"]),  # indexed as fine, gone by the second epoch: skipped, counted
        ("train", [*overrides, "train.epochs=2", "run.resume=latest"]),
        ("evaluate", evaluate),
    )
    (tmp_path / "jobs.log").write_text(done.stdout + done.stderr)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert storage.read_parquet(f"{data}/val_index.parquet").column("status").to_pylist() == ["ok", "ok"]
    cached = sorted(entry.name for entry in storage.list_dir(f"{bucket}/index-cache"))
    assert [name.split("-")[0] for name in cached] == ["test", "train"], cached
    first, second = sorted(checkpoints.checkpoint_folders(f"{runs}/test"))
    assert isinstance(first, storage.UriPath) and checkpoints.verify(first)["loop"]["epoch"] == 1
    assert checkpoints.verify(second)["loop"]["epoch"] == 2
    assert f"training from {first} (step" in done.stdout  # the resumed command started from the bucket's checkpoint
    assert f"model: {second}" in done.stdout and "videos evaluated: 2" in done.stdout  # evaluate found the newest
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    found = client.search_runs([experiment.experiment_id for experiment in client.search_experiments()])
    skipped = [
        metric.value for run in found for metric in client.get_metric_history(run.info.run_id, "data/skipped_videos")
    ]
    assert max(skipped) >= 1, (skipped, tmp_path / "jobs.log")
    assert all("testing-secret-key" not in json.dumps(run.data.params) for run in found)
