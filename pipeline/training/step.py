"""One optimizer step: normalise, erase, mixup/cutmix, forward under autocast, backward over the accumulated
micro-batches, clip, and the optimizer step, without a host sync.

A step whose gradient norm is not finite changes nothing: the fused AdamW skips it on the device through its
`found_inf` flag (the mechanism GradScaler uses), so weights and AdamW state are left alone and the host never reads
the flag. In fp16 the GradScaler lowers its scale on the same overflow. The step returns its loss and its applied
flag as device tensors; `window.StepWindow` reads them once per log window.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import TYPE_CHECKING

import torch
from torch import nn

from pipeline.config import TrainConfig
from pipeline.data.transforms import Normalise
from pipeline.precision import autocast
from pipeline.training.ema import WeightEma
from pipeline.training.mixup import MixupCutmix, soft_target_cross_entropy
from pipeline.training.optim import WarmupCosine, build_optimizer, parameter_groups, set_lr

if TYPE_CHECKING:
    from collections.abc import Sequence

    from pipeline.data.augment import RandomErasing

Batch = dict[str, torch.Tensor]


def lr_schedule(train: TrainConfig, global_batch: int) -> WarmupCosine:
    """The recipe's schedule with every lr of it scaled linearly to the global batch, as PySlowFast scales BASE_LR,
    WARMUP_START_LR and COSINE_END_LR together (BASE_LR_SCALE_NUM_SHARDS)."""
    factor = global_batch / train.lr_reference_batch
    return WarmupCosine(
        train.lr * factor, train.min_lr * factor, train.warmup_start_lr * factor, train.warmup_epochs, train.epochs
    )


class TrainStep:
    """The model-side work of a training step, for a model already wrapped by DDP (and compiled, if asked)."""

    def __init__(
        self,
        model: nn.Module,
        bare: nn.Module,
        optimizer: torch.optim.Optimizer,
        schedule: WarmupCosine,
        scaler: torch.amp.GradScaler,
        augment: tuple[Normalise, RandomErasing | None, MixupCutmix],
        precision: str,
        grad_clip: float,
        ema: WeightEma | None = None,
    ) -> None:
        self.model, self.bare, self.optimizer, self.schedule, self.scaler = model, bare, optimizer, schedule, scaler
        self.normalise, self.erasing, self.mixup = augment
        self.precision, self.grad_clip, self.ema = precision, grad_clip, ema
        self.device = self.normalise.mean.device
        self.lr = schedule(0.0)

    @classmethod
    def build(
        cls,
        model: nn.Module,
        bare: nn.Module,
        train: TrainConfig,
        world_size: int,
        augment: tuple[Normalise, RandomErasing | None, MixupCutmix],
        precision: str,
    ) -> TrainStep:
        """The recipe's AdamW (groups from the unwrapped module `bare`) and schedule (lr scaled to the global batch:
        batch × workers × accumulated micro-batches), a GradScaler for fp16, and the EMA if asked."""
        schedule = lr_schedule(train, train.batch_size * world_size * train.accumulate_steps)
        groups = parameter_groups(bare, train.weight_decay, train.zero_decay_pos_cls, train.layer_decay)
        optimizer = build_optimizer(bare, groups, schedule.peak_lr, tuple(train.betas))
        scaler = torch.amp.GradScaler(augment[0].mean.device.type, enabled=precision == "fp16")
        ema = WeightEma(bare, train.ema_decay) if train.ema_decay > 0 else None
        return cls(model, bare, optimizer, schedule, scaler, augment, precision, train.grad_clip, ema)

    def _loss(self, batch: Batch) -> torch.Tensor:
        clips = self.normalise(batch["clip"])
        if self.erasing is not None:
            clips = self.erasing(clips)
        clips, targets = self.mixup(clips, batch["label"].long())
        with autocast(self.precision, self.device):
            logits = self.model(clips)
        return soft_target_cross_entropy(logits, targets)

    def __call__(self, batches: Batch | Sequence[Batch], epoch: float) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step over one batch or a list of micro-batches (accumulated; DDP all-reduces only on the
        last), at fractional `epoch` of the schedule. Returns the mean loss and whether the step was applied
        (finite gradient norm), both on the device."""
        batches = [batches] if isinstance(batches, dict) else list(batches)
        self.lr = self.schedule(epoch)
        set_lr(self.optimizer, self.lr)
        self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=self.device)
        for index, batch in enumerate(batches):
            inner = index < len(batches) - 1 and hasattr(self.model, "no_sync")
            with self.model.no_sync() if inner else nullcontext():
                loss = self._loss(batch) / len(batches)
                self.scaler.scale(loss).backward()
            total = total + loss.detach()
        self.scaler.unscale_(self.optimizer)
        # Gradients are identical on every rank after DDP's all-reduce, so every rank takes the same decision.
        grad_norm = nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        applied = torch.isfinite(grad_norm)
        self.optimizer.found_inf = (~applied).to(torch.float32)  # fused AdamW: skip on the device
        self.optimizer.step()
        self.scaler.update()  # fp16: halves the scale after an overflow that unscale_ recorded
        if self.ema is not None:
            self.ema.update(self.bare, applied)
        return total, applied
