"""One optimizer step: normalise, mixup/cutmix, forward under autocast, backward, clip, and the optimizer step.

A step whose gradient norm is not finite changes nothing (weights and AdamW state are left alone); in fp16 the
GradScaler makes that decision itself and lowers its scale.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.config import TrainConfig
from pipeline.data.transforms import Normalise
from pipeline.precision import autocast
from pipeline.training.mixup import MixupCutmix, soft_target_cross_entropy
from pipeline.training.optim import WarmupCosine, build_optimizer, scaled_lr, set_lr


class TrainStep:
    """The model-side work of a training step, for a model already wrapped by DDP (and compiled, if asked)."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        schedule: WarmupCosine,
        scaler: torch.amp.GradScaler,
        normalise: Normalise,
        mixup: MixupCutmix,
        precision: str,
        grad_clip: float,
    ) -> None:
        self.model, self.optimizer, self.schedule, self.scaler = model, optimizer, schedule, scaler
        self.normalise, self.mixup = normalise, mixup
        self.precision, self.grad_clip = precision, grad_clip
        self.device = normalise.mean.device

    @classmethod
    def build(
        cls,
        model: nn.Module,
        bare: nn.Module,
        train: TrainConfig,
        world_size: int,
        normalise: Normalise,
        mixup: MixupCutmix,
        precision: str,
    ) -> TrainStep:
        """The recipe's AdamW and schedule (lr scaled to the global batch) for `model`, whose unwrapped module is
        `bare` (the parameter groups are named after its parameters)."""
        peak_lr = scaled_lr(train.lr, train.lr_reference_batch, train.batch_size * world_size)
        optimizer = build_optimizer(bare, peak_lr, train.weight_decay, tuple(train.betas))
        schedule = WarmupCosine(peak_lr, train.min_lr, train.warmup_start_lr, train.warmup_epochs, train.epochs)
        device = normalise.mean.device
        scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        return cls(model, optimizer, schedule, scaler, normalise, mixup, precision, train.grad_clip)

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def __call__(self, batch: dict[str, torch.Tensor], epoch: float) -> tuple[float, bool]:
        """One optimizer step at fractional `epoch` of the schedule; returns the loss and whether the step was
        applied (finite gradients)."""
        set_lr(self.optimizer, self.schedule(epoch))
        clips, targets = self.mixup(self.normalise(batch["clip"]), batch["label"].long())
        with autocast(self.precision, self.device):
            logits = self.model(clips)
        loss = soft_target_cross_entropy(logits, targets)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        # Gradients are identical on every rank after DDP's all-reduce, so every rank takes the same decision.
        grad_norm = nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        finite = bool(torch.isfinite(grad_norm))
        if self.precision == "fp16":
            self.scaler.step(self.optimizer)  # skips the step itself on overflow, and lowers the scale
            self.scaler.update()
        elif finite:
            self.optimizer.step()
        return float(loss.detach()), finite
