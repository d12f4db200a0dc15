"""Weight import from torchvision, PySlowFast, pytorchvideo and this project's own checkpoints.

Every source is first renamed into this package's key layout ("native"), then fitted to the model: positional
embeddings of another grid are interpolated, a classifier of another size is re-initialised with a warning, and
anything else that is missing, unexpected or misshapen is a ValueError naming the keys.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from collections.abc import Mapping

import torch

from .embedding import resize_spatial, resize_temporal
from .model import MViT

SOURCES: tuple[str, ...] = ("native", "torchvision", "pyslowfast", "pytorchvideo")

_BLOCK = r"^(blocks\.\d+)"
_ATTN = r"^(blocks\.\d+\.attn)"

# PySlowFast and pytorchvideo share the block layout: attn.{qkv | q, k, v}, attn.pool_x (a bare Conv3d),
# attn.norm_x, mlp.fc1/fc2, and blocks.i.proj for the widening skip.
_SLOWFAST_BLOCK_RULES = [
    (_ATTN + r"\.pool_([qkv])\.weight$", r"\1.pool_\2.pool.weight"),
    (_ATTN + r"\.norm_([qkv])\.", r"\1.pool_\2.norm."),
    (_BLOCK + r"\.proj\.", r"\1.skip_proj."),
]

_RENAME_RULES: dict[str, list[tuple[str, str]]] = {
    "native": [],
    "torchvision": [
        (r"^conv_proj\.", "patch_embed."),
        (r"^pos_encoding\.class_token$", "pos_embed.class_token"),
        (r"^pos_encoding\.class_pos$", "pos_embed.class_pos"),
        (r"^pos_encoding\.spatial_pos$", "pos_embed.spatial"),
        (r"^pos_encoding\.temporal_pos$", "pos_embed.temporal"),
        (_ATTN + r"\.project\.0\.", r"\1.proj."),
        (_ATTN + r"\.pool_([qkv])\.norm_act\.0\.", r"\1.pool_\2.norm."),
        (_BLOCK + r"\.mlp\.0\.", r"\1.mlp.fc1."),
        (_BLOCK + r"\.mlp\.3\.", r"\1.mlp.fc2."),
        (_BLOCK + r"\.project\.", r"\1.skip_proj."),
        (r"^head\.1\.", "head."),
    ],
    "pyslowfast": [
        (r"^patch_embed\.proj\.", "patch_embed."),
        (r"^cls_token$", "pos_embed.class_token"),
        (r"^pos_embed_class$", "pos_embed.class_pos"),
        (r"^pos_embed_spatial$", "pos_embed.spatial"),
        (r"^pos_embed_temporal$", "pos_embed.temporal"),
        *_SLOWFAST_BLOCK_RULES,
        (r"^head\.projection\.", "head."),
    ],
    "pytorchvideo": [
        (r"^patch_embed\.patch_model\.", "patch_embed."),
        (r"^cls_positional_encoding\.cls_token$", "pos_embed.class_token"),
        (r"^cls_positional_encoding\.pos_embed_class$", "pos_embed.class_pos"),
        (r"^cls_positional_encoding\.pos_embed_spatial$", "pos_embed.spatial"),
        (r"^cls_positional_encoding\.pos_embed_temporal$", "pos_embed.temporal"),
        *_SLOWFAST_BLOCK_RULES,
        (r"^norm_embed\.", "norm."),
        (r"^head\.proj\.", "head."),
    ],
}

# Where each source keeps the state dict inside a saved checkpoint dict, if it is not saved bare.
_CONTAINERS = {"native": "model", "torchvision": "model", "pyslowfast": "model_state", "pytorchvideo": "model_state"}
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DistributedDataParallel, torch.compile
_SEPARATE_QKV = re.compile(_ATTN + r"\.([qkv])\.(weight|bias)$")


def _check_source(source: str) -> None:
    if source not in SOURCES:
        raise ValueError(f"unknown weight source {source!r}; expected one of {SOURCES}")


def _unwrap(checkpoint: object, source: str) -> dict[str, torch.Tensor]:
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"expected a state dict or a checkpoint dict, got {type(checkpoint).__name__}")
    container = _CONTAINERS[source]
    if isinstance(checkpoint.get(container), Mapping):
        checkpoint = checkpoint[container]
    state = {}
    for key, value in checkpoint.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"checkpoint entry {key!r} is a {type(value).__name__}, not a tensor")
        for prefix in _WRAPPER_PREFIXES:
            key = key.removeprefix(prefix)
        state[key] = value
    return state


def _rename(state: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    rules = [(re.compile(pattern), replacement) for pattern, replacement in _RENAME_RULES[source]]
    renamed = {}
    for key, value in state.items():
        for pattern, replacement in rules:
            key, count = pattern.subn(replacement, key)
            if count:
                break
        renamed[key] = value
    return renamed


def _fuse_separate_qkv(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Older PySlowFast / pytorchvideo checkpoints have attn.q, attn.k, attn.v; stack them into attn.qkv."""
    groups: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    fused = {}
    for key, value in state.items():
        match = _SEPARATE_QKV.match(key)
        if match:
            prefix, which, kind = match.groups()
            groups.setdefault((prefix, kind), {})[which] = value
        else:
            fused[key] = value
    for (prefix, kind), parts in groups.items():
        absent = [f"{prefix}.{which}.{kind}" for which in "qkv" if which not in parts]
        if absent:
            raise ValueError(f"separate q/k/v projection is incomplete: missing {absent}")
        fused[f"{prefix}.qkv.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return fused


def _token_grid_of(tokens: torch.Tensor, model_grid: tuple[int, int], key: str) -> tuple[int, int]:
    count = tokens.shape[0]
    if count == model_grid[0] * model_grid[1]:
        return model_grid
    side = math.isqrt(count)
    if side * side != count:
        raise ValueError(f"{key}: cannot infer the spatial grid of {count} positions (not square, not the model's)")
    return side, side


def _foreign_layouts(state: dict[str, torch.Tensor], model: MViT) -> dict[str, torch.Tensor]:
    """Reshape foreign tensors into native layout: (1, 1, C) tokens → (C,), flat (H·W, C) → (H, W, C), ..."""
    for key in ("pos_embed.class_token", "pos_embed.class_pos"):
        if key in state:
            state[key] = state[key].reshape(-1)
    if "pos_embed.temporal" in state:
        temporal = state["pos_embed.temporal"]
        state["pos_embed.temporal"] = temporal.reshape(-1, temporal.shape[-1])
    if "pos_embed.spatial" in state:
        spatial = state["pos_embed.spatial"]
        spatial = spatial.reshape(-1, spatial.shape[-1])
        grid = _token_grid_of(spatial, model.pos_embed.spatial.shape[:2], "pos_embed.spatial")
        state["pos_embed.spatial"] = spatial.reshape(*grid, spatial.shape[-1])
    if "patch_embed.weight" in state and state["patch_embed.weight"].ndim == 4:  # 2-D patch conv of image models
        state["patch_embed.weight"] = state["patch_embed.weight"].unsqueeze(2)
    return state


def convert_state_dict(checkpoint: Mapping[str, object], source: str, model: MViT) -> dict[str, torch.Tensor]:
    """A checkpoint (or bare state dict) of ``source`` renamed and reshaped into ``model``'s key layout."""
    _check_source(source)
    state = _fuse_separate_qkv(_rename(_unwrap(checkpoint, source), source))
    return state if source == "native" else _foreign_layouts(state, model)


def _short(keys: list[str]) -> str:
    return str(keys[:6])[:-1] + (f", ... {len(keys) - 6} more]" if len(keys) > 6 else "]")


def _fit_into(model: MViT, state: dict[str, torch.Tensor], source: str) -> None:
    """Load a native-layout state dict, interpolating positional embeddings and re-initialising a mismatched head."""
    expected = model.state_dict()
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    misshapen = []
    reset_head = False
    fitted = dict(state)
    for key, target in expected.items():
        tensor = state.get(key)
        if tensor is None or tensor.shape == target.shape:
            continue
        if key == "pos_embed.spatial" and tensor.ndim == 3 and tensor.shape[2] == target.shape[2]:
            fitted[key] = resize_spatial(tensor.float(), tuple(target.shape[:2])).to(tensor.dtype)
        elif key == "pos_embed.temporal" and tensor.ndim == 2 and tensor.shape[1] == target.shape[1]:
            fitted[key] = resize_temporal(tensor.float(), target.shape[0]).to(tensor.dtype)
        elif key in ("head.weight", "head.bias") and tensor.shape[1:] == target.shape[1:]:
            reset_head = True
        else:
            misshapen.append(f"{key} {tuple(tensor.shape)} != model {tuple(target.shape)}")
    if missing or unexpected or misshapen:
        problems = [
            f"{label} {_short(keys)}"
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("misshapen", misshapen))
            if keys
        ]
        raise ValueError(f"cannot load {source} weights into MViT: {'; '.join(problems)}")
    if reset_head:
        warnings.warn(
            f"checkpoint head has {state['head.weight'].shape[0]} classes, the model {model.num_classes}: "
            "the head is re-initialised",
            stacklevel=3,
        )
        fitted = {key: value for key, value in fitted.items() if not key.startswith("head.")}
        model.reset_head()
    model.load_state_dict(fitted, strict=not reset_head)


def load_weights(model: MViT, checkpoint: Mapping[str, object], source: str = "native") -> MViT:
    """Load an in-memory checkpoint (or bare state dict) of ``source`` into ``model``; see :func:`load_pretrained`."""
    _fit_into(model, convert_state_dict(checkpoint, source, model), source)
    return model


def load_pretrained(model: MViT, path: str | os.PathLike[str], source: str = "native") -> MViT:
    """Load weights saved by ``source`` ("native", "torchvision", "pyslowfast" or "pytorchvideo") into ``model``.

    Files are read with ``torch.load(weights_only=True)``. Native checkpoints may be a bare state dict or a dict
    holding it under "model"; PySlowFast and pytorchvideo checkpoints hold it under "model_state". Returns ``model``.
    """
    _check_source(source)
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    try:
        return load_weights(model, checkpoint, source)
    except ValueError as error:
        raise ValueError(f"{os.fspath(path)}: {error}") from None
