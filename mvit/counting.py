"""Parameter and multiply-add counts, comparable with the figures papers publish."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements (shared parameters counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def count_gmacs(model: nn.Module, input_shape: Sequence[int]) -> float:
    """Giga multiply-adds of one inference forward on an input of ``input_shape``, e.g. (1, 3, 16, 224, 224).

    Papers and fvcore call one multiply-add a "FLOP"; ``FlopCounterMode`` counts it as 2, hence the halving.
    The forward runs on the meta device (no arithmetic, no copy of the weights), in eval mode, with the math
    attention backend so that attention shows up as the two matmuls the counter knows.
    """
    meta_state = {name: torch.empty_like(t, device="meta") for name, t in model.state_dict(keep_vars=True).items()}
    meta_input = torch.empty(tuple(input_shape), device="meta")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            functional_call(model, meta_state, (meta_input,))
    finally:
        model.train(was_training)
    return counter.get_total_flops() / 2 / 1e9
