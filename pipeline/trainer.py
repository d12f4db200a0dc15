"""The driver side of training: resolve paths, probe the data, open the MLflow run, and run Ray Train's TorchTrainer."""

from __future__ import annotations

import logging
import math
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
from omegaconf import DictConfig, OmegaConf
from ray.train import CheckpointConfig, DataConfig, FailureConfig, Result, RunConfig, ScalingConfig, WorkerGroupError
from ray.train.torch import TorchTrainer

from pipeline import dataset, index, manifest, tracking
from pipeline.config import to_container
from pipeline.demo import DemoDataset, make_demo_dataset
from pipeline.train_loop import NonFiniteLossError, train_loop_per_worker

log = logging.getLogger(__name__)


class ValidationSplit(DataConfig):
    """Split "train" with equal shards (every worker takes the same number of steps, as DDP needs), and "val"
    without equalising: `equal=True` may drop rows, and validation must count every video exactly once."""

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        equalised = {name: ds for name, ds in datasets.items() if name != "val"}
        output = super().configure(equalised, world_size, worker_handles, worker_node_ids, **kwargs)
        if "val" in datasets:
            val = datasets["val"]
            val.context.execution_options = self._resolve_execution_options("val")
            for shard, split in zip(output, val.streaming_split(world_size, equal=False)):
                shard["val"] = split
        return output


@dataclass
class DataPlan:
    """Everything the driver learnt about the data before training starts."""

    train_index: pa.Table
    val_index: pa.Table
    labels: list[str]
    excluded: list[tuple[str, str]]


def absolute(path: str, base: Path) -> str:
    return str((base / path).resolve()) if path else ""


def resolve_paths(cfg: DictConfig, base: Path) -> DictConfig:
    """Every path made absolute on the driver: Ray workers and `ray job submit` run in other directories."""
    cfg = OmegaConf.create(to_container(cfg))
    for key in (
        "data.train",
        "data.val",
        "data.test",
        "data.root",
        "data.labels",
        "data.demo.out",
        "run.storage_path",
        "model.pretrained",
    ):
        value = OmegaConf.select(cfg, key)
        if value and "://" not in value:
            OmegaConf.update(cfg, key, absolute(value, base))
    cfg.mlflow.tracking_uri = tracking.resolve_tracking_uri(cfg.mlflow.tracking_uri, base)
    return cfg


def use_demo_if_unset(cfg: DictConfig) -> None:
    """With no `data.train`, generate the demo dataset (if absent) and train on it."""
    if cfg.data.train:
        return
    out = Path(cfg.data.demo.out)
    demo = DemoDataset(out, out / "train.csv", out / "val.csv", out / manifest.LABEL_MAP_NAME)
    if not all(path.is_file() for path in (demo.train_manifest, demo.val_manifest, demo.label_map)):
        print(f"making the demo dataset in {out}")
        demo = make_demo_dataset(out, seed=cfg.data.demo.seed, videos_per_class=cfg.data.demo.videos_per_class)
    cfg.data.train, cfg.data.val = str(demo.train_manifest), str(demo.val_manifest)
    cfg.data.labels = cfg.data.labels or str(demo.label_map)
    cfg.data.root = cfg.data.root or str(demo.root)


def is_index(path: str) -> bool:
    """An index (probed already) rather than a manifest: a Parquet file with the probe's `status` column."""
    return path.endswith((".parquet", ".pq")) and "status" in pq.read_schema(path).names


def ensure_index(
    source: str,
    cached: Path,
    root: str | None,
    allow_outside_root: bool,
    cpus_per_task: float,
    concurrency: int | None,
) -> str:
    """The index of `source`: itself if already probed, else a probe of the manifest, cached until it changes."""
    if is_index(source):
        return source
    if cached.is_file() and cached.stat().st_mtime >= Path(source).stat().st_mtime:
        return str(cached)
    summary = index.build_index(
        source,
        cached,
        root,
        allow_outside_root=allow_outside_root,
        cpus_per_task=cpus_per_task,
        concurrency=concurrency,
    )
    print(f"probed {source}: {summary.usable} of {summary.total} videos usable")
    return str(summary.path)


def plan_data(cfg: DictConfig) -> DataPlan:
    """Probe each manifest once into a Parquet index (cached beside the run); unusable videos are left out here."""
    labels = manifest.read_label_map(cfg.data.labels or manifest.label_map_path(cfg.data.train))
    index_dir = Path(cfg.run.storage_path) / cfg.run.name / "index"
    tables, excluded = [], []
    for split in ("train", "val"):
        source = getattr(cfg.data, split)
        if not source:
            raise ValueError(f"data.{split} is not set (a manifest or an index)")
        if not Path(source).is_file():
            raise ValueError(f"data.{split} {source}: no such file")
        usable, unusable = index.read_usable(
            ensure_index(
                source,
                index_dir / f"{split}.parquet",
                cfg.data.root or None,
                cfg.data.allow_outside_root,
                cfg.data.cpus_per_task,
                cfg.data.decode_concurrency,
            )
        )
        if usable.num_rows == 0:
            raise ValueError(f"data.{split} {source}: no usable videos ({len(unusable)} unusable)")
        out_of_range = pc.max(usable.column("label")).as_py() >= len(labels)
        if out_of_range:
            raise ValueError(f"data.{split} {source}: a label is past the {len(labels)} names of the label map")
        tables.append(usable)
        excluded.extend(unusable)
    for path, reason in excluded:
        log.warning("excluded before training: %s (%s)", path, reason)
    return DataPlan(tables[0], tables[1], labels, excluded)


def build_trainer(cfg: DictConfig, plan: DataPlan, run_id: str) -> TorchTrainer:
    data, train = cfg.data, cfg.train
    input_size = (data.num_frames, data.crop_size, data.crop_size)
    num_classes = cfg.model.num_classes or len(plan.labels)
    # One counter per training call: a counter left by an earlier call in this process may be dying (it lives only
    # while something references it), and a fresh name can't be handed such a one.
    skip_counter = f"skips-{cfg.run.name}-{uuid.uuid4().hex[:8]}"
    clip_args = dict(
        num_frames=data.num_frames,
        sampling_rate=data.sampling_rate,
        target_fps=data.target_fps,
        crop_size=data.crop_size,
        cpus_per_task=data.cpus_per_task,
        concurrency=data.decode_concurrency,
        resources=dict(data.decode_resources),
        skip_counter_name=skip_counter,
    )
    augment = data.augment
    datasets = {
        "train": dataset.train_dataset(
            plan.train_index,
            num_clips=data.num_clips,
            random_resized_crop=augment.crop == "inception",
            short_side=(augment.min_short_side, augment.max_short_side),
            crop_area=(augment.min_area, augment.max_area),
            crop_aspect=(augment.min_aspect, augment.max_aspect),
            flip=augment.flip,
            **clip_args,
        ),
        "val": dataset.val_dataset(plan.val_index, short_side=data.test_short_side, **clip_args),
    }
    clips_per_epoch = plan.train_index.num_rows * data.num_clips
    steps_per_epoch = max(clips_per_epoch // (train.batch_size * cfg.scaling.num_workers), 1)
    job = {
        "config": to_container(cfg),
        "config_yaml": OmegaConf.to_yaml(cfg),
        "labels": plan.labels,
        "num_classes": num_classes,
        "input_size": input_size,
        "excluded": plan.excluded,
        "steps_per_epoch": steps_per_epoch,
        "tracking_uri": cfg.mlflow.tracking_uri,
        "mlflow_run_id": run_id,
        "skip_counter": skip_counter,
    }
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=job,
        scaling_config=ScalingConfig(
            num_workers=cfg.scaling.num_workers,
            use_gpu=cfg.scaling.use_gpu,
            resources_per_worker={"CPU": cfg.scaling.cpus_per_worker},
        ),
        run_config=RunConfig(
            name=cfg.run.name,
            storage_path=cfg.run.storage_path,
            failure_config=FailureConfig(max_failures=cfg.scaling.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.run.checkpoints_to_keep),
        ),
        datasets=datasets,
        dataset_config=ValidationSplit(datasets_to_split=["train"]),
    )


@dataclass
class TrainingOutcome:
    run_id: str
    tracking_uri: str
    result: Result | None
    metrics: dict[str, float]


def run_training(cfg: DictConfig, base: Path | None = None) -> TrainingOutcome:
    """Train as configured; re-running with the same `run.name` and `run.storage_path` resumes."""
    cfg = resolve_paths(cfg, base or Path.cwd())
    use_demo_if_unset(cfg)
    if cfg.model.pretrained and not Path(cfg.model.pretrained).is_file():
        raise ValueError(f"model.pretrained {cfg.model.pretrained}: no such file")  # here, not in every worker
    plan = plan_data(cfg)
    run_key = f"{cfg.run.storage_path}/{cfg.run.name}"
    run_id = tracking.get_or_create_run(cfg.mlflow.tracking_uri, cfg.mlflow.experiment, run_key, cfg.run.name)
    print(f"MLflow run {run_id} in experiment '{cfg.mlflow.experiment}' at {tracking.redact(cfg.mlflow.tracking_uri)}")
    try:
        result = fit(build_trainer(cfg, plan, run_id))
    except Exception:
        tracking.end_run(cfg.mlflow.tracking_uri, run_id, "FAILED")  # a rerun reopens it
        raise
    metrics = {k: v for k, v in (result.metrics or {}).items() if isinstance(v, (int, float)) and math.isfinite(v)}
    return TrainingOutcome(run_id, cfg.mlflow.tracking_uri, result, metrics)


def fit(trainer: TorchTrainer) -> Result:
    """Run `trainer`; a run stopped by non-finite losses raises that one-line error, not Ray's traceback report."""
    try:
        return trainer.fit()
    except WorkerGroupError as error:
        stopped = [failure for failure in error.worker_failures.values() if isinstance(failure, NonFiniteLossError)]
        if stopped:
            raise NonFiniteLossError(str(stopped[0])) from None
        raise


def ensure_ray(cfg: DictConfig) -> None:
    """Join the cluster named by `scaling.address` or RAY_ADDRESS (as under `ray job submit`), else start one."""
    if ray.is_initialized():
        return
    address = cfg.scaling.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        ray.init(num_cpus=cfg.scaling.num_cpus)
