"""torchvision's MViT as the independent reference of the benchmarks and parity tests; never imported by ``mvit/``.

torchvision 0.28's C extension cannot load with the CPU-only torch of this project, and its import fails while
registering meta kernels for those ops. A placeholder ``torchvision._meta_registrations`` module skips that step;
the pure-Python video models do not need the extension.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from collections.abc import Callable

import torch


def load_torchvision_mvit(name: str = "mvit_v1_b") -> Callable[..., torch.nn.Module] | None:
    """torchvision's ``mvit_v1_b`` or ``mvit_v2_s`` builder, or None where torchvision cannot be imported."""
    if importlib.util.find_spec("torchvision") is None:
        return None
    sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
    try:
        from torchvision.models import video
    except Exception:
        return None
    return getattr(video, name)


def load_torchvision_mvit_v1_b() -> Callable[..., torch.nn.Module] | None:
    """torchvision's ``mvit_v1_b`` builder, or None when torchvision is absent or cannot be imported."""
    return load_torchvision_mvit("mvit_v1_b")
