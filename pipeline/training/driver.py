"""The driver side of training: name and lock the run, resolve paths, check the settings, probe the data, open
the MLflow run, and run Ray Train's TorchTrainer."""

from __future__ import annotations

import copy
import logging
import math
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import ray.train
import torch
from omegaconf import DictConfig, OmegaConf
from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, Result, RunConfig, ScalingConfig

import mvit
from pipeline import secrets, storage, tracking
from pipeline.config import RESUME_LATEST, DataConfig, ModelConfig, TrainingJobConfig, typed
from pipeline.data import index, manifest
from pipeline.data.augment import clip_augments
from pipeline.data.dataset import DecodeTasks, train_dataset, val_dataset
from pipeline.data.demo import DEMO_VERSION, DemoDataset, demo_settings, make_demo_dataset
from pipeline.data.sampling import ClipSpec
from pipeline.data.transforms import EvalTransform, TrainTransform
from pipeline.errors import ConfigError, DataError, ModelError
from pipeline.training import lifecycle, preflight
from pipeline.training.failures import RunTrainer, unfixable
from pipeline.training.job import ResumePoint, TrainJob
from pipeline.training.run_lock import run_lock
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
    "run.resume",
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
        if value and not storage.is_uri(value) and not (key == "run.resume" and value == RESUME_LATEST):
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
    made = demo_settings(out)
    if made is None or (made.version, made.seed, made.videos_per_class) != wanted_demo(data):
        print(f"making the demo dataset in {out}" + (" (the one there is of other settings)" if out.exists() else ""))
        demo = make_demo_dataset(out, seed=data.demo.seed, videos_per_class=data.demo.videos_per_class)
    data.train, data.val = str(demo.train_manifest), str(demo.val_manifest)
    data.labels = data.labels or str(demo.label_map)
    data.root = data.root or str(demo.root)


def wanted_demo(data: DataConfig) -> tuple[int, int, int]:
    """(version, seed, videos per class) of the demo dataset that `data.demo` asks for."""
    return DEMO_VERSION, data.demo.seed, data.demo.videos_per_class


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
    """The training crops, flips and clip augmentations that `data.crop_size` and `data.augment` describe."""
    augment = data.augment
    return TrainTransform(
        crop_size=data.crop_size,
        short_side=(augment.min_short_side, augment.max_short_side),
        random_resized_crop=augment.crop == "inception",
        crop_area=(augment.min_area, augment.max_area),
        crop_aspect=(augment.min_aspect, augment.max_aspect),
        flip=augment.flip,
        augments=clip_augments(augment.rand_augment, augment.rand_augment_interpolation, augment.color_jitter),
        interpolation=augment.crop_interpolation,
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


def make_job(
    cfg: TrainingJobConfig,
    plan: DataPlan,
    run_id: str,
    raw: DictConfig | None = None,
    resume: ResumePoint | None = None,
    data_identity: dict[str, str] | None = None,
) -> TrainJob:
    """What every worker gets: the config with environment values left for the worker to resolve (`raw`: the config
    as the user wrote it), the public config that may be written, and where to start."""
    raw = raw if raw is not None else OmegaConf.structured(cfg)
    data, train = cfg.data, cfg.train
    public = secrets.public_config(raw, cfg)
    # One counter per training call: a counter left by an earlier call in this process may be dying (it lives only
    # while something references it), and a fresh name can't be handed such a one.
    skip_counter = f"skips-{cfg.run.name}-{uuid.uuid4().hex[:8]}"
    clips_per_epoch = plan.train_index.num_rows * data.num_clips
    return TrainJob(
        config=secrets.for_workers(raw, cfg, PATH_KEYS),
        public_config=public,
        config_yaml=OmegaConf.to_yaml(public),
        labels=plan.labels,
        num_classes=cfg_classes(cfg, plan),
        input_size=(data.num_frames, data.crop_size, data.crop_size),
        excluded=plan.excluded,
        # optimizer steps: each takes train.accumulate_steps batches on every worker
        steps_per_epoch=max(
            clips_per_epoch // (train.batch_size * cfg.scaling.num_workers * train.accumulate_steps), 1
        ),
        mlflow_run_id=run_id,
        skip_counter=skip_counter,
        epoch_clock=f"epoch-{skip_counter}",
        resume=resume or ResumePoint(),
        data_identity=data_identity or {},
    )


def build_trainer(cfg: TrainingJobConfig, plan: DataPlan, run_id: str, job: TrainJob | None = None) -> RunTrainer:
    """The TorchTrainer of `job` (default: a job made from `cfg` alone)."""
    job = job or make_job(cfg, plan, run_id)
    datasets = build_datasets(cfg.data, plan, job.skip_counter, cfg.train.seed, job.epoch_clock)
    storage_path, storage_filesystem = storage.for_ray(cfg.run.storage_path)
    return RunTrainer(
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
    run_name: str = ""
    shown_tracking_uri: str = ""  # what may be printed: no credentials, environment values unresolved


@dataclass
class OpenRun:
    """A run named, locked and planned on the driver, before anything is trained."""

    raw: DictConfig  # the config as the user wrote it (environment interpolations unresolved)
    config: TrainingJobConfig  # resolved, paths absolute, run.name set
    plan: lifecycle.RunPlan
    notes: list[str] = field(default_factory=list)


@contextmanager
def open_run(cfg: DictConfig, base: Path | None = None) -> Iterator[OpenRun]:
    """Name the run, hold its lock for the duration and choose where it starts; needs no Ray, so that a refused
    command ends in a second."""
    config: TrainingJobConfig = typed(resolve_paths(cfg, base or Path.cwd()))
    config.run.name = lifecycle.run_name(config, datetime.now())
    lock = run_lock(storage.join(config.run.storage_path, config.run.name), config.run.name)
    note = lock.acquire()
    try:
        plan = lifecycle.plan_run(config, config.run.name)
        yield OpenRun(cfg, config, plan, [note, *plan.notes] if note else plan.notes)
    finally:
        lock.release()


def run_training(cfg: DictConfig, base: Path | None = None) -> TrainingOutcome:
    """Train as configured: a new run, or the one `run.resume` names (see `pipeline/training/lifecycle.py`)."""
    with open_run(cfg, base) as run:
        return train(run)


def train(run: OpenRun) -> TrainingOutcome:
    """Check everything a worker would fail on, then train the run (or say that it is finished)."""
    config, plan = run.config, run.plan
    use_demo_if_unset(config.data)
    public = secrets.public_config(run.raw, config)
    identity = lifecycle.data_identity(config.data)
    lifecycle.check_resumable(plan, config, public, identity)
    shown_uri = public["mlflow"]["tracking_uri"]
    for note in run.notes:
        print(note)
    if lifecycle.finished(plan, config.train.epochs):
        return already_finished(plan, config, shown_uri)
    labels = manifest.read_label_map(config.data.labels or manifest.label_map_path(config.data.train))
    preflight.check_model(config, config.model.num_classes or len(labels))
    announce_pretrained(config.model, config.model.num_classes or len(labels))
    data_plan = plan_data(config)
    start = f"from {plan.start} (step {plan.manifest['loop']['step']})" if plan.start else "from scratch"
    print(f"run '{plan.name}' in {plan.run_dir}: training {start}")
    tracking_uri = tracking.credentials_to_environment(config.mlflow.tracking_uri)  # this process's MLflow calls
    run_id = mlflow_run(config, plan, tracking_uri)
    print(f"MLflow run {run_id} in experiment '{config.mlflow.experiment}' at {shown_uri}")
    resume = ResumePoint(str(plan.start) if plan.start else None, plan.preexisting)
    job = make_job(config, data_plan, run_id, run.raw, resume, identity)
    try:
        result = fit(build_trainer(config, data_plan, run_id, job))
    except Exception:
        try:
            tracking.end_run(tracking_uri, run_id, "FAILED")  # a rerun reopens it
        except Exception as error:  # a store that does not answer: the error that stopped training comes first
            log.warning("could not mark MLflow run %s FAILED: %s", run_id, error)
        raise
    tracking.check_record(tracking_uri, run_id, models_expected=config.mlflow.log_models)
    metrics = {k: v for k, v in (result.metrics or {}).items() if isinstance(v, int | float) and math.isfinite(v)}
    return TrainingOutcome(run_id, tracking_uri, result, metrics, plan.name, shown_uri)


def mlflow_run(config: TrainingJobConfig, plan: lifecycle.RunPlan, tracking_uri: str) -> str:
    """The MLflow run this command logs to: its checkpoint's (or a new one tagged with it), else a new one."""
    experiment, key = config.mlflow.experiment, storage.redact(storage.join(config.run.storage_path, plan.name))
    if plan.start is not None:
        previous, step = plan.manifest.get("mlflow_run_id"), plan.manifest["loop"]["step"]
        branch = config.run.resume != RESUME_LATEST  # a checkpoint chosen by path
        run_id, note = tracking.continue_run(tracking_uri, experiment, key, plan.name, previous, step, branch)
        if note:
            print(note)
        return run_id
    if config.run.resume == RESUME_LATEST:  # started before but never checkpointed: the same MLflow run
        return tracking.get_or_create_run(tracking_uri, experiment, key, plan.name)
    return tracking.create_run(tracking_uri, experiment, key, plan.name)


def already_finished(plan: lifecycle.RunPlan, config: TrainingJobConfig, shown_uri: str) -> TrainingOutcome:
    loop = plan.manifest["loop"]
    print(
        f"run '{plan.name}' is already finished: epoch {loop['epoch']} of train.epochs={config.train.epochs}, step "
        f"{loop['step']} ({plan.start}); nothing to train (a larger train.epochs continues it)"
    )
    metrics = dict(plan.manifest.get("metrics", {}))
    uri = tracking.credentials_to_environment(config.mlflow.tracking_uri)
    return TrainingOutcome(plan.manifest.get("mlflow_run_id", ""), uri, None, metrics, plan.name, shown_uri)


def fit(trainer: RunTrainer) -> Result:
    """Run `trainer`; a run that failed on a user error (a restart would not help) raises that one-line error, not
    Ray's traceback report."""
    try:
        return trainer.fit()
    except Exception as error:
        found = unfixable(error)
        if found is not None:
            raise found from None
        raise
