"""The Ray Train loop that runs on every worker: DDP MViT, mixed precision, checkpoints, rank-0 MLflow logging."""

from __future__ import annotations

import logging
import math
import tempfile
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import mvit
from pipeline import checkpointing, tracking
from pipeline.config import flatten
from pipeline.metrics import topk_hits
from pipeline.mixup import MixupCutmix, soft_target_cross_entropy
from pipeline.optim import WarmupCosine, build_optimizer, scaled_lr, set_lr
from pipeline.skips import skip_counter

log = logging.getLogger(__name__)

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps with a NaN or inf loss or gradient: the run stops, its checkpoints intact."""


@dataclass
class LoopState:
    """What a checkpoint carries besides the weights: where training is, and what MLflow has not been told yet."""

    epoch: int = 0  # the epoch in progress (or the next one, at an epoch boundary)
    step: int = 0  # optimizer steps taken over the whole run
    step_in_epoch: int = 0
    best_top1: float = -1.0
    skipped_before: int = 0  # skip-counter total when the epoch began
    pending: list = field(default_factory=list)  # metrics waiting for their checkpoint to commit


def resolve_precision(requested: str, device: torch.device) -> str:
    if requested == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return requested


def normalise(clips: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 (B, T, H, W, C) from Ray Data → float (B, C, T, H, W) normalised, on the training device."""
    clips = clips.permute(0, 4, 1, 2, 3).float().div_(255.0)
    return clips.sub_(mean).div_(std)


def _unwrap(model: nn.Module) -> nn.Module:
    """The MViT inside torch.compile's and DDP's wrappers: what checkpoints and MLflow models hold."""
    model = getattr(model, "_orig_mod", model)
    return model.module if hasattr(model, "module") else model


def _all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor.tolist()


class Trainer:
    """One worker's view of the run. Built from the plain config dict that the driver sends."""

    def __init__(self, job: dict[str, Any]) -> None:
        self.job = job
        cfg = job["config"]
        self.cfg = cfg
        context = ray.train.get_context()
        self.rank, self.world = context.get_world_rank(), context.get_world_size()
        self.device = ray.train.torch.get_device()
        self.precision = resolve_precision(cfg["train"]["precision"], self.device)
        torch.manual_seed(cfg["train"]["seed"] + self.rank)

        model = mvit.create_model(
            cfg["model"]["name"],
            num_classes=job["num_classes"],
            input_size=job["input_size"],
            drop_path_rate=cfg["model"]["drop_path_rate"],
            head_dropout=cfg["model"]["head_dropout"],
            activation_checkpointing=cfg["model"]["activation_checkpointing"],
            pool_memory_format=cfg["model"]["pool_memory_format"],
        )
        if cfg["model"]["pretrained"]:
            mvit.load_pretrained(model, cfg["model"]["pretrained"], source=cfg["model"]["pretrained_source"])
        self.model = ray.train.torch.prepare_model(model)
        if cfg["train"]["compile"]:
            self.model = torch.compile(self.model)
        global_batch = cfg["train"]["batch_size"] * self.world
        self.peak_lr = scaled_lr(cfg["train"]["lr"], cfg["train"]["lr_reference_batch"], global_batch)
        self.optimizer = build_optimizer(
            _unwrap(self.model), self.peak_lr, cfg["train"]["weight_decay"], tuple(cfg["train"]["betas"])
        )
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        self.schedule = WarmupCosine(
            self.peak_lr,
            cfg["train"]["min_lr"],
            cfg["train"]["warmup_start_lr"],
            cfg["train"]["warmup_epochs"],
            cfg["train"]["epochs"],
        )
        self.mixup = MixupCutmix(
            job["num_classes"],
            cfg["train"]["mixup_alpha"],
            cfg["train"]["cutmix_alpha"],
            cfg["train"]["mixup_prob"],
            cfg["train"]["mixup_switch_prob"],
            cfg["train"]["label_smoothing"],
            seed=cfg["train"]["seed"] + self.rank,
        )
        self.mean = torch.tensor(cfg["data"]["mean"], device=self.device).view(1, 3, 1, 1, 1)
        self.std = torch.tensor(cfg["data"]["std"], device=self.device).view(1, 3, 1, 1, 1)
        self.state = LoopState()
        self.best_model: dict[str, torch.Tensor] | None = None
        self.run_id: str = job["mlflow_run_id"]
        self._restore()
        self.logger = self._open_logger() if self.rank == 0 else None

    # ---- checkpoints -------------------------------------------------------------------------------------------
    def _restore(self) -> None:
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return
        with checkpoint.as_directory() as folder:
            saved = checkpointing.load_state(folder, map_location=self.device)
        _unwrap(self.model).load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        if saved["scaler"]:  # empty when saved without fp16: a run may switch precision when it resumes
            self.scaler.load_state_dict(saved["scaler"])
        self.state = LoopState(**saved["loop"])
        self.best_model = saved.get("best_model")
        self.run_id = saved["mlflow_run_id"]
        log.info("rank %d resumed at epoch %d, step %d", self.rank, self.state.epoch, self.state.step)

    def _checkpoint(self, metrics: dict[str, float]) -> None:
        """Report metrics with a checkpoint (rank 0 writes it), then commit the buffered metrics to MLflow."""
        with tempfile.TemporaryDirectory() as folder:
            checkpoint = None
            if self.rank == 0:
                checkpointing.save_state(
                    folder,
                    {
                        "model": _unwrap(self.model).state_dict(),
                        "model_name": self.cfg["model"]["name"],
                        "num_classes": self.job["num_classes"],
                        "input_size": list(self.job["input_size"]),
                        "labels": self.job["labels"],
                        "optimizer": self.optimizer.state_dict(),
                        "scaler": self.scaler.state_dict(),
                        "loop": self.state.__dict__,
                        "best_model": self.best_model,
                        "mlflow_run_id": self.run_id,
                        "config": self.cfg,
                    },
                )
                checkpoint = ray.train.Checkpoint.from_directory(folder)
            ray.train.report(metrics, checkpoint=checkpoint)
        if self.logger is not None:
            self.logger.commit(self.state.pending)
        self.state.pending = []

    # ---- MLflow ------------------------------------------------------------------------------------------------
    def _open_logger(self) -> tracking.RunLogger:
        logger = tracking.RunLogger(self.job["tracking_uri"], self.run_id, self.cfg["mlflow"]["system_metrics"])
        logger.log_params_once(flatten(self.cfg))
        logger.log_text(self.job["config_yaml"], "config.yaml")
        logger.log_text("\n".join(self.job["labels"]) + "\n", "labels.txt")
        if self.job["excluded"]:
            logger.log_text(
                "\n".join(f"{path}\t{reason}" for path, reason in self.job["excluded"]) + "\n", "excluded_videos.tsv"
            )
        # Metrics of a checkpoint that was reported but not yet committed when the last attempt died.
        logger.commit(self.state.pending)
        return logger

    def _record(self, key: str, value: float) -> None:
        self.state.pending.append((key, float(value), self.state.step, tracking.now_ms()))

    # ---- steps -------------------------------------------------------------------------------------------------
    def _batches(self, name: str, drop_last: bool) -> Iterator[dict[str, torch.Tensor]]:
        shard = ray.train.get_dataset_shard(name)
        return iter(
            shard.iter_torch_batches(
                batch_size=self.cfg["train"]["batch_size"],
                drop_last=drop_last,
                prefetch_batches=self.cfg["data"]["prefetch_batches"],
                device=self.device,
            )
        )

    def _autocast(self):
        dtype = AUTOCAST_DTYPES[self.precision]
        return torch.autocast(self.device.type, dtype=dtype) if dtype is not None else nullcontext()

    def _train_step(self, batch: dict[str, torch.Tensor]) -> tuple[float, bool]:
        """One optimizer step; returns the loss and whether the step was applied (finite gradients)."""
        clips = normalise(batch["clip"], self.mean, self.std)
        clips, targets = self.mixup(clips, batch["label"].long())
        with self._autocast():
            logits = self.model(clips)
        loss = soft_target_cross_entropy(logits, targets)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        # Gradients are identical on every rank after DDP's all-reduce, so every rank takes the same decision.
        grad_norm = nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg["train"]["grad_clip"])
        finite = bool(torch.isfinite(grad_norm))
        if self.precision == "fp16":
            self.scaler.step(self.optimizer)  # skips the step itself on overflow, and lowers the scale
            self.scaler.update()
        elif finite:
            self.optimizer.step()
        return float(loss.detach()), finite

    def train_epoch(self, steps_per_epoch: int) -> None:
        cfg = self.cfg["train"]
        self.model.train()
        batches = self._batches("train", drop_last=True)
        remaining = max(steps_per_epoch - self.state.step_in_epoch, 0)
        window = {"loss": 0.0, "steps": 0, "clips": 0, "wait": 0.0, "start": time.perf_counter()}
        bad_in_a_row = 0
        for _ in range(remaining):
            waited = time.perf_counter()
            try:
                batch = next(batches)
            except StopIteration:
                break
            window["wait"] += time.perf_counter() - waited
            set_lr(self.optimizer, self.schedule(self.state.step / steps_per_epoch))
            loss, applied = self._train_step(batch)
            bad_in_a_row = 0 if applied else bad_in_a_row + 1
            if bad_in_a_row > cfg["max_bad_steps"]:
                step = self.state.step + 1  # numbered as MLflow numbers it
                raise NonFiniteLossError(
                    f"stopped at step {step}: steps {step - bad_in_a_row + 1}-{step} all had a non-finite loss or "
                    f"gradient (last loss {loss}; train.max_bad_steps={cfg['max_bad_steps']}). The last good "
                    f"checkpoint is intact."
                )
            self.state.step += 1
            self.state.step_in_epoch += 1
            if applied:
                window["loss"] += loss
                window["steps"] += 1
            window["clips"] += batch["label"].shape[0]
            if self.state.step % cfg["log_every_steps"] == 0:
                self._log_window(window)
            every = cfg["checkpoint_every_steps"]
            due = every and self.state.step % every == 0 and self.state.step_in_epoch < steps_per_epoch
            # None inside a streak of non-finite steps: should it stop the run, the checkpoints kept (and not rotated
            # out by num_to_keep) are the ones from before it.
            if due and not bad_in_a_row:
                self._checkpoint({"epoch": self.state.epoch, "step": self.state.step})
        if window["steps"]:
            self._log_window(window)

    def _log_window(self, window: dict[str, float]) -> None:
        elapsed = time.perf_counter() - window["start"]
        loss_sum, steps, clips = _all_reduce_sum([window["loss"], window["steps"], window["clips"]], self.device)
        if self.rank == 0 and steps:
            self._record("train/loss", loss_sum / steps)
            self._record("train/lr", self.optimizer.param_groups[0]["lr"])
            self._record("train/clips_per_sec", clips / max(elapsed, 1e-9))
            self._record("train/data_wait_frac", window["wait"] / max(elapsed, 1e-9))
        window.update(loss=0.0, steps=0, clips=0, wait=0.0, start=time.perf_counter())

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Loss, top-1 and top-5 over the whole validation set.

        Each worker reads a disjoint, non-equalised split of the val dataset (see `trainer.ValidationSplit`), so
        every video is seen exactly once; the sums are then all-reduced.
        """
        model = _unwrap(self.model)  # no DDP forward: workers may hold different numbers of val batches
        model.eval()
        loss_sum, hits1, hits5, count = 0.0, 0, 0, 0
        for batch in self._batches("val", drop_last=False):
            clips = normalise(batch["clip"], self.mean, self.std)
            labels = batch["label"].long()
            with self._autocast():
                logits = model(clips).float()
            loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
            top1, top5 = topk_hits(logits, labels)
            hits1, hits5, count = hits1 + top1, hits5 + top5, count + labels.shape[0]
        loss_sum, hits1, hits5, count = _all_reduce_sum([loss_sum, hits1, hits5, count], self.device)
        if count == 0:
            return {"val/loss": math.nan, "val/top1": 0.0, "val/top5": 0.0, "val/count": 0}
        return {"val/loss": loss_sum / count, "val/top1": hits1 / count, "val/top5": hits5 / count, "val/count": count}

    # ---- the run -----------------------------------------------------------------------------------------------
    def fit(self) -> None:
        steps_per_epoch = self.job["steps_per_epoch"]
        epochs = self.cfg["train"]["epochs"]
        while self.state.epoch < epochs:
            self.train_epoch(steps_per_epoch)
            val = self.validate()
            skipped_now = ray.get(skip_counter(self.job["skip_counter"]).total.remote())
            # A driver that died and came back brings a new counter that starts from zero.
            skipped = (
                skipped_now - self.state.skipped_before if skipped_now >= self.state.skipped_before else skipped_now
            )
            self.state.skipped_before = skipped_now
            if self.rank == 0:
                for key, value in val.items():
                    self._record(key, value)
                self._record("data/skipped_videos", skipped)
                self._record("train/epoch", self.state.epoch + 1)
                if val["val/top1"] > self.state.best_top1:
                    self.state.best_top1 = val["val/top1"]
                    self.best_model = {k: v.detach().cpu().clone() for k, v in _unwrap(self.model).state_dict().items()}
            self.state.epoch += 1
            self.state.step_in_epoch = 0
            self._checkpoint(
                {"epoch": self.state.epoch, "step": self.state.step, **val, "data/skipped_videos": skipped}
            )
            if self.logger is not None:
                self.logger.log_curves()
        if self.logger is not None:
            self._log_models()
            self.logger.close()

    def _log_models(self) -> None:
        """The final and best models, each with an input example; the best one registered if configured."""
        mlflow_cfg = self.cfg["mlflow"]
        if not mlflow_cfg["log_models"]:
            return
        if self.logger.client.get_run(self.run_id).data.tags.get("mvit.models_logged") == "true":
            return
        frames, height, width = self.job["input_size"]
        # Batch 2: torch.export specialises a dimension whose example size is 0 or 1.
        example = np.zeros((2, 3, frames, height, width), dtype=np.float32)
        final = _unwrap(self.model).to("cpu").eval()
        self.logger.log_model(final, "model", example, None)
        if self.best_model is not None:
            final.load_state_dict(self.best_model)
            self.logger.log_model(final, "best_model", example, mlflow_cfg["registered_model_name"])
        self.logger.client.set_tag(self.run_id, "mvit.models_logged", "true")


def train_loop_per_worker(job: dict[str, Any]) -> None:
    """Ray Train entry point (one call per worker, and again on every restart of the worker group)."""
    Trainer(job).fit()
