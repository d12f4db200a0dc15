"""The paper's optimiser: AdamW without decay on biases and 1-D parameters, linear warm-up, then half-cosine; and
layer-wise learning-rate decay for fine-tuning.

Layer-wise decay (BEiT, MAE, MViTv2 fine-tuning) scales each parameter's lr by ``layer_decay ** (L - layer)``, with
MViT's layers numbered in depth order: the patch and positional embeddings (and class token) 0, block i at i + 1,
and the final norm and head at L = blocks + 1, which keep the full lr.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import nn

POSITION_PREFIX = "pos_embed."  # MViT's positional embeddings and class token


def scaled_lr(base_lr: float, reference_batch: int, global_batch: int) -> float:
    """The linear scaling rule: the recipe's lr is for `reference_batch` clips a step."""
    return base_lr * global_batch / reference_batch


def layer_of(name: str, num_blocks: int) -> int:
    """MViT's depth index of a parameter: embeddings 0, blocks.i i + 1, final norm and head num_blocks + 1."""
    if name.startswith(("patch_embed.", POSITION_PREFIX)):
        return 0
    block = re.match(r"blocks\.(\d+)\.", name)
    if block:
        return int(block.group(1)) + 1
    if name.startswith(("norm.", "head.")):
        return num_blocks + 1
    raise ValueError(f"layer-wise lr decay: parameter '{name}' is not in MViT's embeddings, blocks, norm or head")


def _decays(name: str, parameter: nn.Parameter, zero_decay_pos_cls: bool) -> bool:
    """PySlowFast's rule: no decay on 1-D parameters and biases (ZERO_WD_1D_PARAM); positional embeddings and the
    class token decay unless ZERO_DECAY_POS_CLS (here 1-D, in PySlowFast 3-D, so they are named, not shaped)."""
    if name.startswith(POSITION_PREFIX):
        return not zero_decay_pos_cls
    return parameter.ndim > 1 and not name.endswith(".bias")


def parameter_groups(
    model: nn.Module, weight_decay: float, zero_decay_pos_cls: bool = True, layer_decay: float = 1.0
) -> list[dict]:
    """AdamW groups, one per (layer, decayed or not) with layer-wise decay, else two; each group carries its
    `lr_scale`. Every trainable parameter is in exactly one group."""
    num_blocks = len(model.blocks) if layer_decay != 1.0 else 0
    groups: dict[tuple[int, bool], dict] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        layer = layer_of(name, num_blocks) if layer_decay != 1.0 else 0
        decays = _decays(name, parameter, zero_decay_pos_cls)
        group = groups.setdefault(
            (layer, decays),
            {
                "params": [],
                "weight_decay": weight_decay if decays else 0.0,
                "lr_scale": layer_decay ** (num_blocks + 1 - layer) if layer_decay != 1.0 else 1.0,
            },
        )
        group["params"].append(parameter)
    return [groups[key] for key in sorted(groups, key=lambda key: (key[0], not key[1]))]


def build_optimizer(model: nn.Module, groups: list[dict], lr: float, betas: tuple[float, float]) -> torch.optim.AdamW:
    """Fused AdamW on any device: one kernel over the parameters, and it skips a step on device when its
    `found_inf` flag is set (how the training step skips a non-finite step without reading it on the host)."""
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True)


def ensure_fused(optimizer: torch.optim.Optimizer) -> None:
    """After `load_state_dict`: a checkpoint saved by a non-fused AdamW brings `fused=None` into the groups, and only
    the fused step can skip a non-finite step on the device."""
    for group in optimizer.param_groups:
        group["fused"], group["foreach"] = True, None


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
    """`lr` times each group's layer-wise scale."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
