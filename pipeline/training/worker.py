"""The Ray Train loop that runs on every worker: epochs of DDP steps, validation, checkpoints, rank-0 logging."""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterator

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
from torch import nn

import mvit
from pipeline.data.augment import RandomErasing
from pipeline.data.order import set_epoch
from pipeline.data.skips import epoch_counts
from pipeline.data.transforms import Normalise
from pipeline.precision import resolve_precision
from pipeline.tracking import TrainingLogger
from pipeline.training.checkpointer import Checkpointer, LoopState
from pipeline.training.job import TrainJob
from pipeline.training.mixup import MixupCutmix
from pipeline.training.optim import ensure_fused
from pipeline.training.progress import EpochProgress, say, set_ray_train_log_level
from pipeline.training.step import Batch, TrainStep
from pipeline.training.validation import validate
from pipeline.training.window import NonFiniteLossError, StepWindow

__all__ = ["NonFiniteLossError", "WorkerLoop", "build_model", "train_loop_per_worker", "unwrap"]


def unwrap(model: nn.Module) -> nn.Module:
    """The MViT inside torch.compile's and DDP's wrappers: what checkpoints and MLflow models hold."""
    model = getattr(model, "_orig_mod", model)
    return model.module if hasattr(model, "module") else model


def build_model(job: TrainJob) -> tuple[mvit.MViT, str | None]:
    """The configured preset at the training clip size, with pretrained weights if given; and the one line that
    says what loading them did (None without `model.pretrained`)."""
    settings = job.config.model
    model = mvit.create_model(
        settings.name,
        num_classes=job.num_classes,
        input_size=job.input_size,
        drop_path_rate=settings.drop_path_rate,
        head_dropout=settings.head_dropout,
        activation_checkpointing=settings.activation_checkpointing,
        pool_memory_format=settings.pool_memory_format,
    )
    if not settings.pretrained:
        return model, None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mvit.load_pretrained(model, settings.pretrained, source=settings.pretrained_source)
    head = next((str(w.message) for w in caught if "head is re-initialised" in str(w.message)), None)
    loaded = f"model.pretrained {settings.pretrained} ({settings.pretrained_source}) loaded"
    return model, (f"{loaded}; fine-tuning a new head: {head}" if head else f"{loaded}, head included")


def device_augments(
    job: TrainJob, seed: int, device: torch.device
) -> tuple[Normalise, RandomErasing | None, MixupCutmix]:
    """What the step does to a batch on the device before the forward: normalise, erase, mix."""
    cfg = job.config
    augment = cfg.data.augment
    erasing = None
    if augment.erase_prob > 0:
        erasing = RandomErasing(
            augment.erase_prob, augment.erase_mode, augment.erase_count, np.random.default_rng(seed)
        )
    mixup = MixupCutmix.from_config(cfg.train, job.num_classes, seed=seed)
    return Normalise(cfg.data.mean, cfg.data.std, device), erasing, mixup


def open_logger(job: TrainJob, checkpointer: Checkpointer, pretrained_line: str | None) -> TrainingLogger:
    """Rank 0's MLflow run, committing what the checkpointer commits, with a note of what loading the weights did."""
    logger = TrainingLogger.open(job, checkpointer.run_id)
    checkpointer.on_commit = logger.commit_or_keep
    # Metrics of a checkpoint that was reported but not yet committed when the last attempt died.
    checkpointer.state.pending = logger.commit_or_keep(checkpointer.state.pending)
    if pretrained_line:  # the driver has said it on the terminal already; the run keeps it
        logger.log_text(pretrained_line + "\n", "pretrained.txt")
    return logger


class WorkerLoop:
    """One worker's run: epochs of training steps, then (every N epochs) validation and a checkpoint."""

    def __init__(self, job: TrainJob) -> None:
        self.job, cfg = job, job.config
        context = ray.train.get_context()
        self.rank = context.get_world_rank()
        self.device = ray.train.torch.get_device()
        self.precision = resolve_precision(cfg.train.precision, self.device)
        torch.manual_seed(cfg.train.seed + self.rank)
        model, self.pretrained_line = build_model(job)
        self.model = ray.train.torch.prepare_model(model)
        if cfg.train.compile:
            self.model = torch.compile(self.model)
        augments = device_augments(job, cfg.train.seed + self.rank, self.device)
        self.normalise, bare = augments[0], unwrap(self.model)
        self.step = TrainStep.build(self.model, bare, cfg.train, context.get_world_size(), augments, self.precision)
        self.checkpointer = Checkpointer(job, self.rank, bare, self.step.optimizer, self.step.scaler, self.step.ema)
        self.checkpointer.restore(self.device)
        ensure_fused(self.step.optimizer)
        self.progress = EpochProgress(cfg.train.epochs, self.state.epoch, self.device)
        self.logger = open_logger(job, self.checkpointer, self.pretrained_line) if self.rank == 0 else None

    @property
    def state(self) -> LoopState:
        return self.checkpointer.state

    def _batches(self, name: str, drop_last: bool) -> Iterator[Batch]:
        shard = ray.train.get_dataset_shard(name)
        cfg = self.job.config
        batches = shard.iter_torch_batches(
            batch_size=cfg.train.batch_size,
            drop_last=drop_last,
            prefetch_batches=cfg.data.prefetch_batches,
            device=self.device,
        )
        return iter(batches)

    def train_epoch(self, steps_per_epoch: int) -> None:
        """`steps_per_epoch` optimizer steps (each of `train.accumulate_steps` micro-batches) from where the epoch
        stands; the host reads the device's loss and step flags only when a window is logged."""
        train = self.job.config.train
        self.model.train()
        set_epoch(self.job.epoch_clock, self.state.epoch)  # before iterating: the epoch's data order and crops
        batches = self._batches("train", drop_last=True)
        window = StepWindow(self.device, train.max_bad_steps)
        self.progress.start_epoch()
        for _ in range(max(steps_per_epoch - self.state.step_in_epoch, 0)):
            waited = time.perf_counter()
            group = [batch for _, batch in zip(range(train.accumulate_steps), batches)]
            if len(group) < train.accumulate_steps:
                break
            waited = time.perf_counter() - waited
            window.wait += waited
            self.progress.wait += waited
            loss, applied = self.step(group, self.state.step / steps_per_epoch)
            self.state.step += 1
            self.state.step_in_epoch += 1
            clips = sum(batch["label"].shape[0] for batch in group)
            window.add(loss, applied, self.state.step, clips)
            self.progress.add(loss, applied, clips)
            every = train.checkpoint_every_steps
            due = every and self.state.step % every == 0 and self.state.step_in_epoch < steps_per_epoch
            if self.state.step % train.log_every_steps == 0 or due:
                in_streak = self._log_window(window)
                # None inside a streak of non-finite steps: should it stop the run, the checkpoints kept (and not
                # rotated out by num_to_keep) are the ones from before it.
                if due and not in_streak:
                    self.checkpointer.save({"epoch": self.state.epoch, "step": self.state.step})
        if window.pending:
            self._log_window(window)

    def _log_window(self, window: StepWindow) -> bool:
        """Record the window's figures (rank 0); True inside a streak of non-finite steps."""
        figures, in_streak = window.flush(self.step.lr)
        if self.rank == 0:
            for key, value in figures.items():
                self.checkpointer.record(key, value)
        return in_streak

    def validate(self) -> tuple[dict[str, float], torch.Tensor]:
        """val/* of the raw weights with their confusion matrix, and val_ema/* of the EMA (a second pass over the
        validation split)."""
        classes = self.job.num_classes
        confusion = torch.zeros(classes, classes, dtype=torch.int64, device=self.device)
        batches = self._batches("val", False)
        figures = validate(unwrap(self.model), batches, self.normalise, self.precision, self.device, confusion)
        if self.step.ema is not None:
            ema = validate(
                self.step.ema.module, self._batches("val", False), self.normalise, self.precision, self.device
            )
            figures.update({key.replace("val/", "val_ema/"): value for key, value in ema.items()})
        return figures, confusion

    def _logged_model(self) -> nn.Module:
        """The weights `train.model_to_log` names: the raw model or its EMA."""
        return self.step.ema.module if self.job.config.train.model_to_log == "ema" else unwrap(self.model)

    def end_epoch(self) -> None:
        """Validate every `train.eval_every_epochs` (and after the last epoch) and keep the best model; checkpoint
        every `train.checkpoint_every_epochs` (and after the last) with the epoch's metrics."""
        train = self.job.config.train
        finished = self.state.epoch + 1
        last = finished == train.epochs
        val, confusion = self.validate() if last or finished % train.eval_every_epochs == 0 else ({}, None)
        counts = epoch_counts(self.job.skip_counter, self.state.epoch)  # None: the counter was lost
        data = {"data/skipped_videos": counts.skipped, "data/clamped_clips": counts.clamped} if counts else {}
        figures = self.progress.epoch_figures()
        if self.rank == 0:
            for key, value in {**val, **data}.items():
                self.checkpointer.record(key, value)
            self.checkpointer.record("train/epoch", finished)
        chosen = val.get("val_ema/top1" if train.model_to_log == "ema" else "val/top1")
        if self.rank == 0 and chosen is not None and chosen > self.state.best_top1:
            self.state.best_top1 = chosen
            self.checkpointer.keep_best(self._logged_model())
            if self.logger is not None:
                self.logger.log_best_classes(confusion.cpu().numpy(), self.job.labels, finished)
        if self.rank == 0:
            say(self.progress.epoch_line(finished, self.state.step, figures, val))
        self.state.epoch += 1
        self.state.step_in_epoch = 0
        if last or finished % train.checkpoint_every_epochs == 0:
            self.checkpointer.save({"epoch": self.state.epoch, "step": self.state.step, **val, **data})
            if self.logger is not None:
                self.logger.log_curves()

    def fit(self) -> None:
        while self.state.epoch < self.job.config.train.epochs:
            self.train_epoch(self.job.steps_per_epoch)
            self.end_epoch()
        if self.logger is not None:
            model, best = self._logged_model(), self.checkpointer.best_model
            self.logger.finish(self.state.pending, lambda: self.logger.log_models(model, best, self.job))
            say(self.progress.summary(self.state))


def train_loop_per_worker(job: TrainJob) -> None:
    """Ray Train entry point (one call per worker, and again on every restart of the worker group)."""
    set_ray_train_log_level(job.config.run.ray_train_log_level)
    WorkerLoop(job.resolved()).fit()
