"""Mixed precision in one place: the names a config may use, what `auto` means on a device, and the autocast.

Training, evaluation and the benchmarks all go through here, so `bf16` means the same thing in each.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
AUTOCAST_DTYPES: dict[str, torch.dtype | None] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def resolve_precision(requested: str, device: torch.device) -> str:
    """`auto` is bf16 on a GPU (tensor cores, no loss scaling needed) and fp32 on a CPU (bf16 is emulated there)."""
    if requested == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if requested not in AUTOCAST_DTYPES:
        raise ValueError(f"precision {requested!r} is not one of {', '.join(PRECISIONS)}")
    return requested


def autocast(precision: str, device: torch.device) -> AbstractContextManager:
    """The forward pass's autocast context for a resolved precision (fp32: none)."""
    dtype = AUTOCAST_DTYPES[precision]
    return nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def compute_dtype(precision: str) -> torch.dtype:
    """The dtype the matmuls of a resolved precision run in (fp32: float32)."""
    return AUTOCAST_DTYPES[precision] or torch.float32
