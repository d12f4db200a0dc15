"""The Ray Train loop that runs on every worker: epochs of DDP steps, validation, checkpoints, rank-0 logging."""

from __future__ import annotations

import time
from collections.abc import Iterator

import ray
import ray.train
import ray.train.torch
import torch
from torch import nn

import mvit
from pipeline.data.skips import skip_counter
from pipeline.data.transforms import Normalise
from pipeline.errors import TrainingStopped
from pipeline.precision import resolve_precision
from pipeline.tracking import TrainingLogger
from pipeline.training.checkpointer import Checkpointer, LoopState
from pipeline.training.job import TrainJob
from pipeline.training.mixup import MixupCutmix
from pipeline.training.step import TrainStep
from pipeline.training.validation import all_reduce_sum, validate


class NonFiniteLossError(TrainingStopped):
    """Too many consecutive steps with a NaN or inf loss or gradient: the run stops, its checkpoints intact."""

    @classmethod
    def streak(cls, last_step: int, length: int, loss: float, limit: int) -> NonFiniteLossError:
        return cls(
            f"stopped at step {last_step}: steps {last_step - length + 1}-{last_step} all had a non-finite loss or "
            f"gradient (last loss {loss}; train.max_bad_steps={limit}). The last good checkpoint is intact."
        )


def unwrap(model: nn.Module) -> nn.Module:
    """The MViT inside torch.compile's and DDP's wrappers: what checkpoints and MLflow models hold."""
    model = getattr(model, "_orig_mod", model)
    return model.module if hasattr(model, "module") else model


def build_model(job: TrainJob) -> mvit.MViT:
    """The configured preset at the training clip size, with pretrained weights if given."""
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
    if settings.pretrained:
        mvit.load_pretrained(model, settings.pretrained, source=settings.pretrained_source)
    return model


class _Window:
    """Sums over the steps since the last train/* log line, and their figures summed over every worker."""

    def __init__(self) -> None:
        self.loss, self.steps, self.clips, self.wait = 0.0, 0, 0, 0.0
        self.start = time.perf_counter()

    def add(self, loss: float, applied: bool, clips: int) -> None:
        if applied:
            self.loss, self.steps = self.loss + loss, self.steps + 1
        self.clips += clips

    def figures(self, lr: float, device: torch.device) -> dict[str, float]:
        """The train/* metrics of the window (every rank must call this: it all-reduces); {} if no step applied."""
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        loss_sum, steps, clips = all_reduce_sum([self.loss, self.steps, self.clips], device)
        if not steps:
            return {}
        return {
            "train/loss": loss_sum / steps,
            "train/lr": lr,
            "train/clips_per_sec": clips / elapsed,
            "train/data_wait_frac": self.wait / elapsed,
        }


class WorkerLoop:
    """One worker's run: epochs of training steps, then validation and a checkpoint at each epoch's end."""

    def __init__(self, job: TrainJob) -> None:
        self.job, cfg = job, job.config
        context = ray.train.get_context()
        self.rank = context.get_world_rank()
        self.device = ray.train.torch.get_device()
        self.precision = resolve_precision(cfg.train.precision, self.device)
        torch.manual_seed(cfg.train.seed + self.rank)
        self.model = ray.train.torch.prepare_model(build_model(job))
        if cfg.train.compile:
            self.model = torch.compile(self.model)
        self.normalise = Normalise(cfg.data.mean, cfg.data.std, self.device)
        mixup = MixupCutmix.from_config(cfg.train, job.num_classes, seed=cfg.train.seed + self.rank)
        world = context.get_world_size()
        self.step = TrainStep.build(
            self.model, unwrap(self.model), cfg.train, world, self.normalise, mixup, self.precision
        )
        self.checkpointer = Checkpointer(job, self.rank, unwrap(self.model), self.step.optimizer, self.step.scaler)
        self.checkpointer.restore(self.device)
        self.logger = TrainingLogger.open(job, self.checkpointer.run_id) if self.rank == 0 else None
        if self.logger is not None:
            self.checkpointer.on_commit = self.logger.commit
            # Metrics of a checkpoint that was reported but not yet committed when the last attempt died.
            self.logger.commit(self.checkpointer.state.pending)

    @property
    def state(self) -> LoopState:
        return self.checkpointer.state

    def _batches(self, name: str, drop_last: bool) -> Iterator[dict[str, torch.Tensor]]:
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
        train = self.job.config.train
        self.model.train()
        batches = self._batches("train", drop_last=True)
        window, bad_in_a_row = _Window(), 0
        for _ in range(max(steps_per_epoch - self.state.step_in_epoch, 0)):
            waited = time.perf_counter()
            batch = next(batches, None)
            if batch is None:
                break
            window.wait += time.perf_counter() - waited
            loss, applied = self.step(batch, self.state.step / steps_per_epoch)
            bad_in_a_row = 0 if applied else bad_in_a_row + 1
            if bad_in_a_row > train.max_bad_steps:  # numbered as MLflow numbers steps
                raise NonFiniteLossError.streak(self.state.step + 1, bad_in_a_row, loss, train.max_bad_steps)
            self.state.step += 1
            self.state.step_in_epoch += 1
            window.add(loss, applied, batch["label"].shape[0])
            if self.state.step % train.log_every_steps == 0:
                window = self._log_window(window)
            every = train.checkpoint_every_steps
            due = every and self.state.step % every == 0 and self.state.step_in_epoch < steps_per_epoch
            # None inside a streak of non-finite steps: should it stop the run, the checkpoints kept (and not rotated
            # out by num_to_keep) are the ones from before it.
            if due and not bad_in_a_row:
                self.checkpointer.save({"epoch": self.state.epoch, "step": self.state.step})
        if window.steps:
            self._log_window(window)

    def _log_window(self, window: _Window) -> _Window:
        figures = window.figures(self.step.lr, self.device)
        if self.rank == 0:
            for key, value in figures.items():
                self.checkpointer.record(key, value)
        return _Window()

    def validate(self) -> dict[str, float]:
        batches = self._batches("val", drop_last=False)
        return validate(unwrap(self.model), batches, self.normalise, self.precision, self.device)

    def _skipped_this_epoch(self) -> int:
        skipped_now = ray.get(skip_counter(self.job.skip_counter).totals.remote()).skipped
        before = self.state.skipped_before
        self.state.skipped_before = skipped_now
        # A driver that died and came back brings a new counter that starts from zero.
        return skipped_now - before if skipped_now >= before else skipped_now

    def end_epoch(self) -> None:
        """Validate, keep the best model, and checkpoint with the epoch's metrics."""
        val = self.validate()
        skipped = self._skipped_this_epoch()
        if self.rank == 0:
            for key, value in val.items():
                self.checkpointer.record(key, value)
            self.checkpointer.record("data/skipped_videos", skipped)
            self.checkpointer.record("train/epoch", self.state.epoch + 1)
            if val["val/top1"] > self.state.best_top1:
                self.state.best_top1 = val["val/top1"]
                self.checkpointer.keep_best()
        self.state.epoch += 1
        self.state.step_in_epoch = 0
        self.checkpointer.save(
            {"epoch": self.state.epoch, "step": self.state.step, **val, "data/skipped_videos": skipped}
        )
        if self.logger is not None:
            self.logger.log_curves()

    def fit(self) -> None:
        while self.state.epoch < self.job.config.train.epochs:
            self.train_epoch(self.job.steps_per_epoch)
            self.end_epoch()
        if self.logger is not None:
            self.logger.log_models(unwrap(self.model), self.checkpointer.best_model, self.job)
            self.logger.close()


def train_loop_per_worker(job: TrainJob) -> None:
    """Ray Train entry point (one call per worker, and again on every restart of the worker group)."""
    WorkerLoop(job.resolved()).fit()
