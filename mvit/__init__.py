"""MViT: Multiscale Vision Transformers (Fan et al., ICCV 2021) and MViTv2 (Li et al., CVPR 2022) in pure PyTorch.

Build a preset with :func:`create_model`, list them with :func:`list_models`, import weights of torchvision,
PySlowFast or pytorchvideo with :func:`load_pretrained` (the weight sources are :data:`SOURCES`), count parameters
and multiply-adds with :func:`count_parameters` and :func:`count_gmacs`, and see which attention kernel every block
gets with :func:`sdpa_backends`. Custom architectures are a :class:`MViTConfig` of per-block :class:`BlockConfig`.

The names are imported on first use, so that ``from mvit.sources import SOURCES`` (configuration checks) does not
import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "SOURCES": "sources",
    "SOURCE_INFO": "sources",
    "BlockConfig": "config",
    "MViTConfig": "config",
    "PoolConfig": "config",
    "validate_config": "config",
    "MViT": "model",
    "TokenPool": "pooling",
    "pooled_grid": "pooling",
    "attention_shapes": "backends",
    "sdpa_backends": "backends",
    "count_gmacs": "counting",
    "count_parameters": "counting",
    "create_model": "presets",
    "get_preset": "presets",
    "list_models": "presets",
    "multiscale_blocks": "presets",
    "preset_config": "presets",
    "convert_state_dict": "weights",
    "load_pretrained": "weights",
    "load_weights": "weights",
}
__all__ = [
    "SOURCES",
    "SOURCE_INFO",
    "BlockConfig",
    "MViT",
    "MViTConfig",
    "PoolConfig",
    "TokenPool",
    "attention_shapes",
    "convert_state_dict",
    "count_gmacs",
    "count_parameters",
    "create_model",
    "get_preset",
    "list_models",
    "load_pretrained",
    "load_weights",
    "multiscale_blocks",
    "pooled_grid",
    "preset_config",
    "sdpa_backends",
    "validate_config",
]

if TYPE_CHECKING:
    from .backends import attention_shapes, sdpa_backends
    from .config import BlockConfig, MViTConfig, PoolConfig, validate_config
    from .counting import count_gmacs, count_parameters
    from .model import MViT
    from .pooling import TokenPool, pooled_grid
    from .presets import create_model, get_preset, list_models, multiscale_blocks, preset_config
    from .sources import SOURCE_INFO, SOURCES
    from .weights import convert_state_dict, load_pretrained, load_weights


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'mvit' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
