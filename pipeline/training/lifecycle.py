"""Which run a training command is: a new one, or the continuation of a checkpoint, decided before anything starts.

Every command gets its own run unless it asks to resume. `run.name` empty: a new name from the preset, the dataset
and the time. `run.resume` empty: a new run, and a `run.name` that already has checkpoints is refused rather than
silently continued. `run.resume=latest`: the newest complete checkpoint of `run.name` (a broken newer one is passed
over, with the reason), or a new run of that name if it has none, so the same command again after a crash
continues it. `run.resume=PATH`: that checkpoint. A resumed run must have the same recipe and data as its
checkpoint (`check_resumable`); a finished one is reported as such and not trained again.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from pipeline import storage
from pipeline.checkpoints import STATE_FILE, CheckpointError, checkpoint_folders, newest_complete, verify
from pipeline.config import RESUME_LATEST, DataConfig, TrainingJobConfig, flatten
from pipeline.data import manifest
from pipeline.errors import ConfigError, DataError

# Keys a resumed run may change: how long, where and how fast it runs, and how it is logged. Any other key is the
# recipe, and a change to it is refused (unless run.allow_recipe_change). The data paths may change, since the data
# is compared by content (`data_identity`).
MAY_CHANGE_ON_RESUME = (
    "train.epochs",
    "train.precision",
    "train.compile",
    "train.checkpoint_every_steps",
    "train.checkpoint_every_epochs",
    "train.eval_every_epochs",
    "train.log_every_steps",
    "train.max_bad_steps",
    "scaling",
    "run",
    "mlflow",
    "model.pretrained",
    "model.pretrained_source",
    "model.activation_checkpointing",
    "model.pool_memory_format",
    "data.train",
    "data.val",
    "data.test",
    "data.root",
    "data.labels",
    "data.allow_outside_root",
    "data.index_cache",
    "data.demo",
    "data.cpus_per_task",
    "data.decode_concurrency",
    "data.decode_resources",
    "data.videos_per_task",
    "data.prefetch_batches",
    "data.test_clips",
    "data.test_crops",
)


@dataclass
class RunPlan:
    """The run a command trains, and the checkpoint it starts from."""

    name: str
    run_dir: Path
    start: Path | None = None  # the checkpoint to continue; None: from scratch
    manifest: dict[str, Any] = field(default_factory=dict)  # of `start`
    preexisting: tuple[str, ...] = ()  # checkpoint folder names before this command
    notes: list[str] = field(default_factory=list)  # what the driver prints about its choice


def dataset_name(data: DataConfig) -> str:
    """A short name of the training data for run names: the manifest's folder (`k400/train.parquet` → k400)."""
    name = storage.name(storage.parent(data.train)) if data.train else Path(data.demo.out).name
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "data"


def generated_name(cfg: TrainingJobConfig, runs: Path, now: datetime) -> str:
    """`preset-dataset-YYYYmmdd-HHMMSS`, with a suffix if a run of that name exists already."""
    base = f"{cfg.model.name}-{dataset_name(cfg.data)}-{now:%Y%m%d-%H%M%S}"
    name, number = base, 1
    while storage.exists(runs / name):
        number += 1
        name = f"{base}-{number}"
    return name


def run_name(cfg: TrainingJobConfig, now: datetime) -> str:
    """`run.name`, or the run of `run.resume=PATH` when that lies in `run.storage_path`, or a new name."""
    runs, resume = storage.as_path(cfg.run.storage_path), cfg.run.resume
    if cfg.run.name:
        name = cfg.run.name
    elif resume == RESUME_LATEST:
        raise ConfigError("config key 'run.resume': 'latest' needs run.name, the run to continue")
    elif resume and checkpoint_path(resume).parent.parent == runs:
        name = checkpoint_path(resume).parent.name
    else:
        name = generated_name(cfg, runs, now)
    if _leaves(runs, name):
        raise ConfigError(f"config key 'run.name': {name!r} leaves run.storage_path {runs}")
    return name


def _leaves(runs: Path, name: str) -> bool:
    if storage.is_uri(runs):
        return "/" in name or name in ("", ".", "..")
    return (runs / name).resolve().parent != runs.resolve()


def checkpoint_path(resume: str) -> Path:
    path = storage.as_path(resume)
    return path.parent if path.name == STATE_FILE else path


def plan_run(cfg: TrainingJobConfig, name: str) -> RunPlan:
    """The checkpoint this command starts from, chosen by `run.resume`; nothing is loaded, only verified."""
    run_dir = storage.as_path(cfg.run.storage_path) / name
    existing = checkpoint_folders(run_dir)
    plan = RunPlan(name, run_dir, preexisting=tuple(folder.name for folder in existing))
    resume = cfg.run.resume
    if not resume:
        if existing:
            raise ConfigError(
                f"run.name '{name}' already has {len(existing)} checkpoint(s) in {run_dir}: continue it with "
                "run.resume=latest, or choose another run.name"
            )
        return plan
    if resume == RESUME_LATEST:
        found = newest_complete(existing)
        if found is None and existing:
            raise CheckpointError(
                f"run.resume=latest: none of the {len(existing)} checkpoint(s) of run '{name}' is complete "
                f"(newest: {verify_reason(existing[0])})"
            )
        if found is None:
            plan.notes.append(f"run '{name}' has no checkpoint yet: starting it")
            return plan
        plan.start, plan.manifest, skipped = found
        plan.notes += [f"skipped checkpoint {folder}: {reason}" for folder, reason in skipped]
        return plan
    start = checkpoint_path(resume)
    plan.start, plan.manifest = start, verify(start)
    if existing and start.parent != run_dir:
        raise ConfigError(
            f"run.resume {start}: run.name '{name}' has checkpoints of its own; continue another run's checkpoint "
            "under a new run.name"
        )
    return plan


def verify_reason(folder: Path) -> str:
    try:
        verify(folder)
    except CheckpointError as error:
        return str(error)
    return "complete"


def file_digest(path: str | Path) -> str:
    return storage.sha256(path)


def data_identity(data: DataConfig) -> dict[str, str]:
    """What the run trains on, by content: the digests of the train and val manifests (or indexes) and the labels."""
    labels = data.labels or manifest.label_map_path(data.train)
    sources = {"data.train": data.train, "data.val": data.val, "data.labels": labels}
    return {key: file_digest(path) for key, path in sources.items() if path and storage.is_file(path)}


def _may_change(key: str) -> bool:
    return any(key == allowed or key.startswith(allowed + ".") for allowed in MAY_CHANGE_ON_RESUME)


def recipe_changes(saved: dict[str, Any], public: dict[str, Any]) -> list[str]:
    """`key: old → new` for each recipe key whose value differs from the checkpoint's (keys it lacks are new)."""
    before, after = flatten(saved), flatten(public)
    return [
        f"{key}: {before[key]!r} → {after[key]!r}"
        for key in sorted(set(before) & set(after))
        if not _may_change(key) and before[key] != after[key]
    ]


def check_resumable(plan: RunPlan, cfg: TrainingJobConfig, public: dict[str, Any], identity: dict[str, str]) -> None:
    """Refuse to continue `plan.start` on other data, or with another recipe unless that was allowed (then each
    change becomes a note)."""
    if plan.start is None:
        return
    saved_data = plan.manifest.get("data", {})
    changed = [key for key in sorted(set(saved_data) & set(identity)) if saved_data[key] != identity[key]]
    if changed:
        raise DataError(
            f"run.resume: the data of run '{plan.name}' changed since {plan.start} ({', '.join(changed)}: other "
            "content); resume it on the data it was trained on, or start a new run"
        )
    changes = recipe_changes(plan.manifest.get("config", {}), public)
    if changes and not cfg.run.allow_recipe_change:
        raise ConfigError(
            f"run.resume: the recipe of run '{plan.name}' changed since {plan.start}: {'; '.join(changes)}; resume "
            "with its values, start a new run, or set run.allow_recipe_change=true"
        )
    plan.notes += [f"recipe change allowed by run.allow_recipe_change: {change}" for change in changes]


def finished(plan: RunPlan, epochs: int) -> bool:
    """Whether the start checkpoint has done every epoch of `epochs` already."""
    loop = plan.manifest.get("loop", {})
    return plan.start is not None and loop.get("epoch", 0) >= epochs and loop.get("step_in_epoch", 0) == 0
