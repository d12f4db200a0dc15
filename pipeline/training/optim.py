"""The paper's optimiser: AdamW without decay on biases and 1-D parameters, linear warm-up, then half-cosine."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


def scaled_lr(base_lr: float, reference_batch: int, global_batch: int) -> float:
    """The linear scaling rule: the recipe's lr is for `reference_batch` clips a step."""
    return base_lr * global_batch / reference_batch


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decayed weight matrices, and the undecayed biases, norms, embeddings and class token."""
    no_decay_names = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim <= 1 or name.endswith(".bias") or name in no_decay_names:
            no_decay.append(param)
        else:
            decay.append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float]) -> torch.optim.AdamW:
    """AdamW; fused on CUDA, where it saves a pass over the parameters each step."""
    fused = next(model.parameters()).is_cuda
    return torch.optim.AdamW(parameter_groups(model, weight_decay), lr=lr, betas=betas, fused=fused)


@dataclass(frozen=True)
class WarmupCosine:
    """lr at a fractional epoch: linear from `warmup_start_lr` to `peak_lr`, then half-cosine down to `min_lr`."""

    peak_lr: float
    min_lr: float
    warmup_start_lr: float
    warmup_epochs: float
    total_epochs: float

    def __call__(self, epoch: float) -> float:
        if epoch < self.warmup_epochs:
            progress = epoch / self.warmup_epochs
            return self.warmup_start_lr + (self.peak_lr - self.warmup_start_lr) * progress
        span = max(self.total_epochs - self.warmup_epochs, 1e-8)
        progress = min((epoch - self.warmup_epochs) / span, 1.0)
        return self.min_lr + (self.peak_lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
