"""The driver side of training: resolve paths, probe the data, open the MLflow run, and run Ray Train's TorchTrainer."""

from __future__ import annotations

import copy
import logging
import math
import uuid
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import ray.train
import torch
from omegaconf import DictConfig, OmegaConf
from ray.train import (
    CheckpointConfig,
    FailureConfig,
    LoggingConfig,
    Result,
    RunConfig,
    ScalingConfig,
    WorkerGroupError,
)
from ray.train.torch import TorchTrainer

import mvit
from pipeline import storage, tracking
from pipeline.config import DataConfig, ModelConfig, TrainingJobConfig, typed
from pipeline.data import index, manifest
from pipeline.data.dataset import DecodeTasks, train_dataset, val_dataset
from pipeline.data.demo import DemoDataset, make_demo_dataset
from pipeline.data.sampling import ClipSpec
from pipeline.data.transforms import EvalTransform, TrainTransform
from pipeline.errors import ConfigError, DataError, ModelError, UserError
from pipeline.training.job import TrainJob
from pipeline.training.worker import train_loop_per_worker

log = logging.getLogger(__name__)

PATH_KEYS = (
    "data.train",
    "data.val",
    "data.test",
    "data.root",
    "data.labels",
    "data.index_cache",
    "data.demo.out",
    "run.storage_path",
    "model.pretrained",
)


class ValidationSplit(ray.train.DataConfig):
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


def resolve_paths(cfg: DictConfig, base: Path) -> DictConfig:
    """Every local path made absolute on the driver (Ray workers and `ray job submit` run in other directories);
    URIs (s3://...) stay as they are."""
    cfg = copy.deepcopy(cfg)  # still the structured schema, so it converts to the typed config
    OmegaConf.set_readonly(cfg, False)
    OmegaConf.resolve(cfg)
    for key in PATH_KEYS:
        value = OmegaConf.select(cfg, key)
        if value and not storage.is_uri(value):
            OmegaConf.update(cfg, key, str((base / storage.local(value)).resolve()))
    cfg.mlflow.tracking_uri = tracking.resolve_tracking_uri(cfg.mlflow.tracking_uri, base)
    return cfg


def cfg_classes(cfg: TrainingJobConfig, plan: DataPlan) -> int:
    return cfg.model.num_classes or len(plan.labels)


def announce_pretrained(model: ModelConfig, num_classes: int) -> None:
    """Check `model.pretrained` on the driver (not in every worker) and say once if fine-tuning re-initialises its
    head: a deliberate step when the new dataset has other classes, and one line rather than a warning per worker."""
    if not model.pretrained:
        return
    if not Path(model.pretrained).is_file():
        raise ModelError(f"model.pretrained {model.pretrained}: no such file")
    try:
        checkpoint = torch.load(model.pretrained, map_location="cpu", weights_only=True, mmap=True)
        state = mvit.convert_state_dict(checkpoint, model.pretrained_source, mvit.create_model(model.name))
    except Exception as error:
        raise ModelError(f"model.pretrained {model.pretrained}: {str(error).splitlines()[0]}") from None
    head = state.get("head.weight")
    if head is not None and head.shape[0] != num_classes:
        print(
            f"fine-tuning from {model.pretrained}: its head has {head.shape[0]} classes, this run {num_classes}; "
            "the head starts from random weights",
            flush=True,
        )


def use_demo_if_unset(data: DataConfig) -> None:
    """With no `data.train`, generate the demo dataset (if absent) and train on it."""
    if data.train:
        return
    out = Path(data.demo.out)
    demo = DemoDataset(out, out / "train.csv", out / "val.csv", out / manifest.LABEL_MAP_NAME)
    if not all(path.is_file() for path in (demo.train_manifest, demo.val_manifest, demo.label_map)):
        print(f"making the demo dataset in {out}")
        demo = make_demo_dataset(out, seed=data.demo.seed, videos_per_class=data.demo.videos_per_class)
    data.train, data.val = str(demo.train_manifest), str(demo.val_manifest)
    data.labels = data.labels or str(demo.label_map)
    data.root = data.root or str(demo.root)


def plan_data(cfg: TrainingJobConfig) -> DataPlan:
    """Probe each manifest once into a Parquet index (cached by what was probed); unusable videos are left out here.

    One label map (`data.labels`, else the train manifest's) resolves the manifests' class names and is checked
    against the labels and `model.num_classes`, here on the driver rather than in every worker.
    """
    data = cfg.data
    labels_path = data.labels or manifest.label_map_path(data.train)
    labels = manifest.read_label_map(labels_path)
    check_num_classes(cfg.model.num_classes, labels, labels_path)
    cache_dir = data.index_cache or str(index.default_cache_dir())
    tables, excluded = [], []
    for split in ("train", "val"):
        source = getattr(data, split)
        if not source:
            raise DataError(f"data.{split} is not set (a manifest or an index)")
        if not storage.is_file(source):
            raise DataError(f"data.{split} {storage.redact(source)}: no such file")
        probed = index.ensure_index(
            source,
            cache_dir,
            data.root or None,
            data.allow_outside_root,
            labels_path,
            data.cpus_per_task,
            data.decode_concurrency,
        )
        usable, unusable = index.read_usable(probed)
        index.require_usable(usable, unusable, f"data.{split} {storage.redact(source)}")
        if pc.max(usable.column("label")).as_py() >= len(labels):
            shown = storage.redact(source), storage.redact(labels_path)
            raise DataError(f"data.{split} {shown[0]}: a label is past the {len(labels)} names of {shown[1]}")
        tables.append(usable)
        excluded.extend(unusable)
    for path, reason in excluded:
        log.warning("excluded before training: %s (%s)", path, reason)
    return DataPlan(tables[0], tables[1], labels, excluded)


def check_num_classes(num_classes: int, labels: list[str], labels_path: str) -> None:
    """`model.num_classes` (0: the label map's count) must be the label map's count: fewer would crash the workers
    on the first label past the head, more would leave head outputs without a name."""
    if num_classes and num_classes != len(labels):
        raise ConfigError(
            f"model.num_classes={num_classes} but the label map {labels_path} has {len(labels)} names "
            "(set model.num_classes=0 to take the label map's count)"
        )


def train_transform(data: DataConfig) -> TrainTransform:
    """The training crops and flips that `data.crop_size` and `data.augment` describe."""
    augment = data.augment
    return TrainTransform(
        crop_size=data.crop_size,
        short_side=(augment.min_short_side, augment.max_short_side),
        random_resized_crop=augment.crop == "inception",
        crop_area=(augment.min_area, augment.max_area),
        crop_aspect=(augment.min_aspect, augment.max_aspect),
        flip=augment.flip,
    )


def build_datasets(
    data: DataConfig, plan: DataPlan, skip_counter: str, seed: int, epoch_clock: str
) -> dict[str, ray.data.Dataset]:
    """The epoch's training clips (random views, in the order and with the crops that `seed` and the epoch that
    the training loop sets on `epoch_clock` give) and validation clips (the centre view of every video)."""
    spec = ClipSpec(data.num_frames, data.sampling_rate, data.target_fps)
    tasks = DecodeTasks(
        cpus=data.cpus_per_task,
        concurrency=data.decode_concurrency,
        resources=dict(data.decode_resources),
        videos_per_task=data.videos_per_task,
        skip_counter=skip_counter,
    )
    transform = train_transform(data)
    val_transform = EvalTransform(data.test_short_side, data.crop_size, 1)
    return {
        "train": train_dataset(
            plan.train_index,
            spec=spec,
            transform=transform,
            num_clips=data.num_clips,
            tasks=tasks,
            seed=seed,
            epoch=epoch_clock,
        ),
        "val": val_dataset(plan.val_index, spec=spec, transform=val_transform, tasks=tasks, epoch=epoch_clock),
    }


def build_trainer(cfg: TrainingJobConfig, config_yaml: str, plan: DataPlan, run_id: str) -> TorchTrainer:
    data, train = cfg.data, cfg.train
    # One counter per training call: a counter left by an earlier call in this process may be dying (it lives only
    # while something references it), and a fresh name can't be handed such a one.
    skip_counter = f"skips-{cfg.run.name}-{uuid.uuid4().hex[:8]}"
    epoch_clock = f"epoch-{skip_counter}"
    clips_per_epoch = plan.train_index.num_rows * data.num_clips
    job = TrainJob(
        config=cfg,
        config_yaml=config_yaml,
        labels=plan.labels,
        num_classes=cfg_classes(cfg, plan),
        input_size=(data.num_frames, data.crop_size, data.crop_size),
        excluded=plan.excluded,
        steps_per_epoch=max(clips_per_epoch // (train.batch_size * cfg.scaling.num_workers), 1),
        mlflow_run_id=run_id,
        skip_counter=skip_counter,
        epoch_clock=epoch_clock,
    )
    datasets = build_datasets(data, plan, skip_counter, train.seed, epoch_clock)
    storage_path, storage_filesystem = storage.for_ray(cfg.run.storage_path)
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
            storage_path=storage_path,
            storage_filesystem=storage_filesystem,
            failure_config=FailureConfig(max_failures=cfg.scaling.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.run.checkpoints_to_keep),
            logging_config=LoggingConfig(log_level=cfg.run.ray_train_log_level),
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
    resolved = resolve_paths(cfg, base or Path.cwd())
    job_config: TrainingJobConfig = typed(resolved)
    use_demo_if_unset(job_config.data)
    plan = plan_data(job_config)
    announce_pretrained(job_config.model, cfg_classes(job_config, plan))
    mlflow = job_config.mlflow
    run_key = storage.redact(f"{job_config.run.storage_path}/{job_config.run.name}")
    run_id = tracking.get_or_create_run(mlflow.tracking_uri, mlflow.experiment, run_key, job_config.run.name)
    print(f"MLflow run {run_id} in experiment '{mlflow.experiment}' at {tracking.redact(mlflow.tracking_uri)}")
    try:
        result = fit(build_trainer(job_config, OmegaConf.to_yaml(OmegaConf.structured(job_config)), plan, run_id))
    except Exception:
        try:
            tracking.end_run(mlflow.tracking_uri, run_id, "FAILED")  # a rerun reopens it
        except Exception as error:  # a store that does not answer: the error that stopped training comes first
            log.warning("could not mark MLflow run %s FAILED: %s", run_id, error)
        raise
    tracking.check_record(mlflow.tracking_uri, run_id, models_expected=mlflow.log_models)
    metrics = {k: v for k, v in (result.metrics or {}).items() if isinstance(v, int | float) and math.isfinite(v)}
    return TrainingOutcome(run_id, mlflow.tracking_uri, result, metrics)


def fit(trainer: TorchTrainer) -> Result:
    """Run `trainer`; a run stopped by itself raises that one-line error, not Ray's traceback report."""
    try:
        return trainer.fit()
    except WorkerGroupError as error:
        stopped = [failure for failure in error.worker_failures.values() if isinstance(failure, UserError)]
        if stopped:
            raise stopped[0] from None
        raise
