"""MViT: Multiscale Vision Transformers (Fan et al., ICCV 2021) and MViTv2 (Li et al., CVPR 2022) in pure PyTorch.

Build a preset with :func:`create_model`, list them with :func:`list_models`, import weights of torchvision,
PySlowFast or pytorchvideo with :func:`load_pretrained` (the weight sources are :data:`SOURCES`), count parameters
and multiply-adds with :func:`count_parameters` and :func:`count_gmacs`, and see which attention kernel every block
gets with :func:`sdpa_backends`. Custom architectures are a :class:`MViTConfig` of per-block :class:`BlockConfig`.
"""

from .backends import attention_shapes, sdpa_backends
from .config import BlockConfig, MViTConfig, PoolConfig, validate_config
from .counting import count_gmacs, count_parameters
from .model import MViT
from .pooling import TokenPool, pooled_grid
from .presets import create_model, get_preset, list_models, multiscale_blocks, preset_config
from .weights import SOURCES, convert_state_dict, load_pretrained, load_weights

__all__ = [
    "SOURCES",
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
