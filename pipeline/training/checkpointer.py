"""The worker's saved state: where training is, the best weights, the MLflow run, and the metrics not yet logged.

Metrics wait in :class:`LoopState` until the checkpoint that covers their step is reported; only then are they
handed to MLflow. The buffer travels inside the checkpoint, so a worker group restarted from it logs exactly the
steps MLflow has not seen: none lost, none twice.

Where a worker starts: after a restart, from the newest complete checkpoint this call of the run reported (Ray
Train's `get_checkpoint()` first); on the first attempt, from the checkpoint the driver chose (`job.resume`). A
checkpoint that does not load is passed over with a warning naming it and why.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import ray.train
import torch
from torch import nn

from pipeline import checkpoints, storage
from pipeline.tracking import Metric, now_ms
from pipeline.training.job import TrainJob
from pipeline.training.persist import upload_whole

if TYPE_CHECKING:
    from pipeline.training.ema import WeightEma

log = logging.getLogger(__name__)


@dataclass
class LoopState:
    """What a checkpoint carries besides the weights: where training is, and what MLflow has not been told yet."""

    epoch: int = 0  # the epoch in progress (or the next one, at an epoch boundary)
    step: int = 0  # optimizer steps taken over the whole run
    step_in_epoch: int = 0
    best_top1: float = -1.0
    skipped_before: int = 0  # unused since skips are counted per epoch; kept so that older checkpoints load
    pending: list[Metric] = field(default_factory=list)  # metrics waiting for their checkpoint to commit


class Checkpointer:
    """Restores and saves one worker's state through Ray Train; rank 0 writes, every rank reports."""

    def __init__(
        self,
        job: TrainJob,
        rank: int,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler,
        ema: WeightEma | None = None,
    ) -> None:
        self.job, self.rank = job, rank
        self.model, self.optimizer, self.scaler, self.ema = model, optimizer, scaler, ema
        self.state = LoopState()
        self.best_model: dict[str, torch.Tensor] | None = None
        self.run_id = job.mlflow_run_id
        # Rank 0's MLflow logger, once it is open: commits metrics and returns those the store did not take.
        self.on_commit: Callable[[list[Metric]], list[Metric]] | None = None

    def candidates(self) -> list[str]:
        """The checkpoint folders to try, best first: this call's own (after a restart), then the driver's choice."""
        found: list[str] = []
        latest = ray.train.get_checkpoint()
        resume = self.job.resume
        newest = storage.as_path(storage.uri_of(latest.filesystem, latest.path)) if latest is not None else None
        if newest is not None and newest.name not in resume.preexisting:
            older = [
                folder
                for folder in checkpoints.checkpoint_folders(newest.parent)
                if folder.name < newest.name and folder.name not in resume.preexisting
            ]
            found = [str(newest), *map(str, older)]
        return [*found, resume.checkpoint] if resume.checkpoint else found

    def restore(self, device: torch.device) -> None:
        """Continue from the best checkpoint that loads, if there is one."""
        candidates = self.candidates()
        for folder in candidates:
            try:
                saved = checkpoints.load_state(folder, map_location=device)
            except checkpoints.CheckpointError as error:
                log.warning("rank %d: skipped checkpoint %s: %s", self.rank, folder, error)
                continue
            self._apply(saved)
            state = self.state
            log.info("rank %d resumed from %s at epoch %d, step %d", self.rank, folder, state.epoch, state.step)
            return
        if self.job.resume.checkpoint:  # the driver verified it: it broke since, and nothing newer loads
            raise checkpoints.CheckpointError(f"no checkpoint of {candidates} loads (see the warnings above)")
        if candidates:
            log.warning("rank %d: no checkpoint of this run loads; starting it from step 0", self.rank)

    def _apply(self, saved: dict[str, Any]) -> None:
        self.model.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        if saved["scaler"]:  # empty when saved without fp16: a run may switch precision when it resumes
            self.scaler.load_state_dict(saved["scaler"])
        if self.ema is not None:  # a checkpoint saved without EMA starts it from the restored weights
            self.ema.load_state_dict(saved.get("ema") or saved["model"])
        self.state = LoopState(**saved["loop"])
        self.best_model = saved.get("best_model")

    def record(self, key: str, value: float) -> None:
        """Buffer one metric at the current step until the next checkpoint commits it."""
        self.state.pending.append((key, float(value), self.state.step, now_ms()))

    def keep_best(self, model: nn.Module | None = None) -> None:
        """The current weights of `model` (default: the trained model; the EMA where it is the model to log) become
        the best model (a CPU copy, carried by every later checkpoint)."""
        chosen = model if model is not None else self.model
        self.best_model = {k: v.detach().cpu().clone() for k, v in chosen.state_dict().items()}

    def save(self, metrics: dict[str, Any]) -> None:
        """Report `metrics` with a checkpoint (rank 0 writes it), then commit the buffered metrics to MLflow."""
        with tempfile.TemporaryDirectory() as folder:
            checkpoint = None
            if self.rank == 0:
                checkpoints.save_state(folder, self._payload(), self._summary(metrics))
                checkpoint = ray.train.Checkpoint.from_directory(folder)
            ray.train.report(metrics, checkpoint=checkpoint, checkpoint_upload_fn=upload_whole)
        # What the store did not take stays in the buffer: the next checkpoint carries it and offers it again.
        self.state.pending = self.on_commit(self.state.pending) if self.on_commit is not None else []

    def _payload(self) -> dict[str, Any]:
        job = self.job
        return {
            "model": self.model.state_dict(),
            "model_name": job.config.model.name,
            # numerics the weights came with (e.g. the pooling-norm eps of pytorchvideo 0.1.5 weights fine-tuned here)
            "pool_norm_eps": self.model.config.pool_norm_eps,
            "num_classes": job.num_classes,
            "input_size": list(job.input_size),
            "labels": job.labels,
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "loop": dataclasses.asdict(self.state),
            "best_model": self.best_model,
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "mlflow_run_id": self.run_id,
            "config": job.public_config,
        }

    def _summary(self, metrics: dict[str, Any]) -> dict[str, Any]:
        """What the driver reads from the manifest to decide how to resume, without loading the state."""
        loop = self.state
        return {
            "loop": {"epoch": loop.epoch, "step": loop.step, "step_in_epoch": loop.step_in_epoch},
            "mlflow_run_id": self.run_id,
            "config": self.job.public_config,
            "data": self.job.data_identity,
            "metrics": {k: v for k, v in metrics.items() if isinstance(v, int | float) and math.isfinite(v)},
        }
