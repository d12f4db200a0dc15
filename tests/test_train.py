"""Training end to end on a real local Ray: 2 DDP workers, real encoded videos, a real sqlite MLflow store."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest
import ray.train
from mlflow.tracking import MlflowClient
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from pipeline.checkpoints import load_state
from pipeline.config import load_config
from pipeline.data import dataset, index
from pipeline.data.manifest import write_manifest
from pipeline.data.sampling import ClipSpec
from pipeline.errors import ConfigError
from pipeline.training.driver import ValidationSplit, run_training
from tests.clips import decode_tasks, eval_transform, train_transform


@pytest.fixture()
def small_run(tmp_path: Path, demo, run_overrides):
    """The config of a small run on the shared demo, writing under this test's folder."""

    def config(*overrides: str):
        return load_config(overrides=run_overrides(tmp_path, demo.train_manifest, demo.val_manifest, *overrides))

    return config


def metric_history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def test_two_workers_train_and_track(ray_session, small_run):
    cfg = small_run("train.epochs=3", "train.lr=4e-3", "mlflow.log_models=true")
    outcome = run_training(cfg)
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


def test_resume_continues_the_same_run(ray_session, small_run, capsys):
    first = run_training(small_run("train.epochs=1", "mlflow.log_models=false"))
    with pytest.raises(ConfigError, match="already has 1 checkpoint"):  # a new command is never a silent no-op
        run_training(small_run("train.epochs=2", "mlflow.log_models=false"))
    second = run_training(small_run("train.epochs=2", "mlflow.log_models=false", "run.resume=latest"))
    assert second.run_id == first.run_id
    client = MlflowClient(first.tracking_uri)
    assert [value for _, value in metric_history(client, first.run_id, "train/epoch")] == [1.0, 2.0]
    steps = [step for step, _ in metric_history(client, first.run_id, "train/loss")]
    assert steps == sorted(set(steps)) and steps[0] == 1
    assert second.metrics["epoch"] == 2
    state = load_state(second.result.checkpoint.path)
    assert state["loop"]["epoch"] == 2 and state["mlflow_run_id"] == first.run_id
    runs = client.search_runs([client.get_experiment_by_name("mvit").experiment_id])
    assert len(runs) == 1
    capsys.readouterr()
    again = run_training(small_run("train.epochs=2", "mlflow.log_models=false", "run.resume=latest"))
    assert again.result is None and again.run_id == first.run_id and again.metrics["epoch"] == 2
    assert "run 'test' is already finished: epoch 2 of train.epochs=2" in capsys.readouterr().out


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
