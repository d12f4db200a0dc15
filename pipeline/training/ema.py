"""An exponential moving average of the weights, kept on the training device and updated without a host sync."""

from __future__ import annotations

import copy

import torch
from torch import nn


class WeightEma:
    """`ema ← ema + (1 − decay)·(weights − ema)` after every applied optimizer step (timm's ModelEmaV3 rule).

    The update is scaled by the step's on-device `applied` flag, so a skipped non-finite step leaves the EMA as it
    was without the host ever reading the flag. Buffers are copied, not averaged.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, applied: torch.Tensor) -> None:
        weight = applied.to(torch.float32) * (1.0 - self.decay)
        for average, current in zip(self.module.parameters(), model.parameters()):
            average.lerp_(current.detach(), weight)
        for average, current in zip(self.module.buffers(), model.buffers()):
            average.copy_(current)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state)
