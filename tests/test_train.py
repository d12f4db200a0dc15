"""Training end to end on a real local Ray: 2 DDP workers, real encoded videos, a real sqlite MLflow store."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import ray.train
from mlflow.tracking import MlflowClient
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from pipeline.data import dataset, index
from pipeline.data.manifest import write_manifest
from pipeline.data.sampling import ClipSpec
from pipeline.training.driver import ValidationSplit
from tests.clips import decode_tasks, eval_transform, train_transform


def metric_history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def test_two_workers_train_and_track(tracked_run):
    """What the session's tracked run (3 epochs, 2 DDP workers, `tests/conftest.py`) recorded in MLflow."""
    outcome, _ = tracked_run
    client = MlflowClient(outcome.tracking_uri)
    run = client.get_run(outcome.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["model.name"] == "mvit_tiny" and run.data.params["scaling.num_workers"] == "2"
    losses = [value for _, value in metric_history(client, outcome.run_id, "train/loss")]
    third = max(len(losses) // 3, 1)
    assert sum(losses[-third:]) / third < sum(losses[:third]) / third, losses
    for key in (
        "train/lr",
        "train/clips_per_sec",
        "train/data_wait_frac",
        "val/loss",
        "val/top1",
        "val/top5",
        "data/skipped_videos",
    ):
        assert metric_history(client, outcome.run_id, key), key
    assert [value for _, value in metric_history(client, outcome.run_id, "val/count")] == [8.0] * 3
    steps = [step for step, _ in metric_history(client, outcome.run_id, "train/loss")]
    assert steps == sorted(set(steps)), "a step logged twice"
    artifacts = {a.path for a in client.list_artifacts(outcome.run_id)}
    assert {"config.yaml", "labels.txt", "curves"} <= artifacts
    assert {a.path for a in client.list_artifacts(outcome.run_id, "curves")} == {
        "curves/loss.png",
        "curves/accuracy.png",
    }
    logged = {m.name for m in client.search_logged_models([run.info.experiment_id])}
    assert {"model", "best_model"} <= logged


def _collect_labels(config: dict) -> None:
    """Each worker writes the labels (here: one distinct label per video) it saw in each split."""
    rank = ray.train.get_context().get_world_rank()
    for split in ("train", "val"):
        seen = [
            int(label)
            for batch in ray.train.get_dataset_shard(split).iter_batches(batch_size=2)
            for label in batch["label"]
        ]
        Path(config["out"], f"{split}-{rank}.txt").write_text(" ".join(map(str, seen)))


def test_workers_see_disjoint_shards_and_val_counts_every_video_once(ray_session, tmp_path, demo):
    videos = sorted(Path(demo.root, "videos").rglob("*.mp4"))[:9]
    manifest = tmp_path / "one_class_per_video.csv"
    write_manifest(pa.table({"path": [str(v) for v in videos], "label": list(range(len(videos)))}), manifest)
    usable, _ = index.read_usable(index.build_index(manifest, tmp_path / "index.parquet", allow_outside_root=True).path)
    spec = ClipSpec(num_frames=4, sampling_rate=2, target_fps=30.0)
    trainer = TorchTrainer(
        _collect_labels,
        train_loop_config={"out": str(tmp_path)},
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name="shards", storage_path=str(tmp_path / "runs")),
        datasets={
            "train": dataset.train_dataset(
                usable,
                spec=spec,
                transform=train_transform(short_side=(32, 40)),
                num_clips=1,
                tasks=decode_tasks(),
                seed=0,
                epoch=0,
            ),
            "val": dataset.val_dataset(usable, spec=spec, transform=eval_transform(), tasks=decode_tasks()),
        },
        dataset_config=ValidationSplit(datasets_to_split=["train"]),
    )
    trainer.fit()
    seen = {
        name: [int(x) for x in (tmp_path / f"{name}.txt").read_text().split()]
        for name in ("train-0", "train-1", "val-0", "val-1")
    }
    assert not set(seen["train-0"]) & set(seen["train-1"])
    assert len(seen["train-0"]) == len(seen["train-1"])  # equalised: DDP steps in lockstep
    assert sorted(seen["val-0"] + seen["val-1"]) == list(range(len(videos)))  # 9 videos, odd: none dropped
