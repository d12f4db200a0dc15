"""Weight import from torchvision, PySlowFast, pytorchvideo and this project's own checkpoints.

Every checkpoint is first taken apart the way its source saves it (a bare state dict, or one under "model_state" or
"model"; wrapper prefixes such as ``module.`` stripped), checked to be of the source and the model family it is
given as, renamed into this package's key layout ("native") and fitted to the model: positional embeddings and
relative-position tables of another grid are interpolated, a classifier of another size is re-initialised with a
warning, and anything else that is missing, unexpected or misshapen is a ValueError naming the keys. The model then
takes the source's pooling-norm epsilon (see :mod:`mvit.sources`).
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
from .relative_position import resize_table
from .sources import SOURCE_INFO, SOURCES

__all__ = ["SOURCES", "convert_state_dict", "load_pretrained", "load_weights"]

_BLOCK = r"^(blocks\.\d+)"
_ATTN = r"^(blocks\.\d+\.attn)"

# PySlowFast and pytorchvideo share the block layout: attn.{qkv | q, k, v}, attn.pool_x (a bare Conv3d),
# attn.norm_x, mlp.fc1/fc2, blocks.i.proj for the widening skip, attn.rel_pos_{h,w,t} as here.
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
        (r"^pos_embed$", "pos_embed.joint"),
        *_SLOWFAST_BLOCK_RULES,
        (r"^head\.projection\.", "head."),
    ],
    "pytorchvideo": [
        (r"^patch_embed\.patch_model\.", "patch_embed."),
        (r"^cls_positional_encoding\.cls_token$", "pos_embed.class_token"),
        (r"^cls_positional_encoding\.pos_embed_class$", "pos_embed.class_pos"),
        (r"^cls_positional_encoding\.pos_embed_spatial$", "pos_embed.spatial"),
        (r"^cls_positional_encoding\.pos_embed_temporal$", "pos_embed.temporal"),
        (r"^cls_positional_encoding\.pos_embed$", "pos_embed.joint"),
        *_SLOWFAST_BLOCK_RULES,
        (r"^norm_embed\.", "norm."),
        (r"^head\.proj\.", "head."),
    ],
}

# Keys that only one layout has, with the name an error message shows for them.
_LAYOUT_MARKERS: dict[str, list[tuple[str, str]]] = {
    "native": [
        (r"^patch_embed\.(weight|bias)$", "patch_embed.weight"),
        (r"^pos_embed\.(class_token|spatial)$", "pos_embed.class_token"),
        (r"\.attn\.pool_[qkv]\.pool\.weight$", "attn.pool_k.pool"),
        (r"^head\.(weight|bias)$", "head.weight"),
    ],
    "torchvision": [
        (r"^conv_proj\.", "conv_proj"),
        (r"^pos_encoding\.", "pos_encoding"),
        (r"\.attn\.project\.0\.", "attn.project.0"),
        (r"^head\.1\.", "head.1"),
    ],
    "pyslowfast": [
        (r"^patch_embed\.proj\.", "patch_embed.proj"),
        (r"^cls_token$", "cls_token"),
        (r"^pos_embed(_spatial)?$", "pos_embed"),
        (r"^head\.projection\.", "head.projection"),
    ],
    "pytorchvideo": [
        (r"^patch_embed\.patch_model\.", "patch_embed.patch_model"),
        (r"^cls_positional_encoding\.", "cls_positional_encoding"),
        (r"^norm_embed\.", "norm_embed"),
        (r"^head\.proj\.", "head.proj"),
    ],
}
_LAYOUT_TITLES = {
    "native": "this package's own layout",
    "torchvision": "torchvision",
    "pyslowfast": "PySlowFast",
    "pytorchvideo": "pytorchvideo",
}

_CONTAINERS = ("model_state", "model", "state_dict")  # PySlowFast and pytorchvideo zoo; native training; others
_WRAPPER_PREFIXES = ("module.", "model.", "_orig_mod.")  # DDP; PySlowFast's pytorchvideo-backed models; compile
_SEPARATE_QKV = re.compile(_ATTN + r"\.([qkv])\.(weight|bias)$")
_POOL_ALIAS = re.compile(_ATTN + r"\._attention_pool_([qkv])\.(pool|norm)\.(weight|bias)$")
_REL_POS = re.compile(r"\.attn\.rel_pos_[hwt]$")


def _check_source(source: str) -> None:
    if source not in SOURCES:
        raise ValueError(f"unknown weight source {source!r}; expected one of {SOURCES}")


def _state_dict_of(checkpoint: object) -> dict[str, torch.Tensor]:
    """The tensors of a bare state dict, or of the one a training checkpoint keeps under a known container key."""
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"expected a state dict or a checkpoint dict, got {type(checkpoint).__name__}")
    if not all(isinstance(value, torch.Tensor) for value in checkpoint.values()):
        container = next((key for key in _CONTAINERS if isinstance(checkpoint.get(key), Mapping)), None)
        if container is None:
            entries = [key for key, value in checkpoint.items() if not isinstance(value, torch.Tensor)]
            raise ValueError(
                f"a checkpoint dict with non-tensor entries {_short(sorted(map(str, entries)))} and no weights "
                f"under {' or '.join(repr(key) for key in _CONTAINERS)}"
            )
        checkpoint = checkpoint[container]
    for key, value in checkpoint.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"checkpoint entry {key!r} is a {type(value).__name__}, not a tensor")
    return dict(checkpoint)


def _strip_wrappers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove prefixes that every key shares (``module.model.`` is stripped in two steps)."""
    while state:
        prefix = next((p for p in _WRAPPER_PREFIXES if all(key.startswith(p) for key in state)), None)
        if prefix is None:
            return state
        state = {key.removeprefix(prefix): value for key, value in state.items()}
    return state


def _detect_layout(keys: list[str]) -> tuple[str | None, list[str]]:
    """The layout whose marker keys the checkpoint has most of, with the markers found (None: none found)."""
    found = {
        layout: [label for pattern, label in markers if any(re.search(pattern, key) for key in keys)]
        for layout, markers in _LAYOUT_MARKERS.items()
    }
    layout = max(found, key=lambda name: len(found[name]))
    return (layout, found[layout]) if found[layout] else (None, [])


def _sources_for(layout: str, has_aliases: bool) -> str:
    if layout == "pyslowfast":
        return "source=pyslowfast (pyslowfast_v1 for checkpoints of its MViT v1 model zoo)"
    if layout == "pytorchvideo":
        return "source=pytorchvideo_main" if has_aliases else "source=pytorchvideo (0.1.5) or pytorchvideo_main"
    return f"source={layout}"


def _check_layout(state: dict[str, torch.Tensor], source: str) -> None:
    """A one-line error when the keys are another source's, or another version's of the same library."""
    keys = list(state)
    layout, markers = _detect_layout(keys)
    has_aliases = any(_POOL_ALIAS.match(key) for key in keys)
    expected = SOURCE_INFO[source].layout
    if layout is not None and layout != expected:
        evidence = ", ".join(markers[:2])
        raise ValueError(f"looks like {_LAYOUT_TITLES[layout]} ({evidence}): use {_sources_for(layout, has_aliases)}")
    if source == "pytorchvideo" and has_aliases:
        raise ValueError(
            "looks like pytorchvideo's main branch (_attention_pool_* alias keys, which 0.1.5 does not have): "
            "use source=pytorchvideo_main"
        )
    if source == "pyslowfast_v1" and any(_SEPARATE_QKV.match(key) for key in keys):
        raise ValueError(
            "separate q/k/v projections: PySlowFast's v1-era code only had them while it pooled before projecting "
            "(commit 00eb2b4c), which this model does not compute; its model zoo has a fused qkv. A checkpoint of "
            "PySlowFast since 1aebd71a (SEPARATE_QKV) loads with source=pyslowfast"
        )


def _check_family(state: dict[str, torch.Tensor], source: str, model: MViT) -> None:
    """A one-line error when an MViTv2 checkpoint meets an MViT v1 model or the reverse (native key names), or when
    the file is no MViT at all (its family guesses would mislead)."""
    if not any(key.startswith(("blocks.", "patch_embed.")) for key in state):
        raise ValueError(
            f"cannot load {source} weights into MViT: no patch_embed or blocks keys, not an MViT checkpoint "
            f"(keys {_short(list(state))})"
        )
    rel_pos_keys = sorted({key.rsplit(".", 1)[1] for key in state if _REL_POS.search(key)})
    model_rel_pos = any(block.rel_pos_spatial or block.rel_pos_temporal for block in model.config.blocks)
    if rel_pos_keys and source == "pyslowfast_v1":
        raise ValueError(
            f"an MViTv2 checkpoint ({', '.join(rel_pos_keys)} keys): PySlowFast's v1-era code has no MViTv2; "
            "use source=pyslowfast"
        )
    if rel_pos_keys and not model_rel_pos:
        raise ValueError(
            f"an MViTv2 checkpoint ({', '.join(rel_pos_keys)} keys); build an MViTv2 preset such as mvit_v2_s_16x4"
        )
    if model_rel_pos and not rel_pos_keys:
        what = "absolute positional embeddings" if any("pos_embed.spatial" in k for k in state) else "no rel_pos keys"
        raise ValueError(f"an MViT v1 checkpoint ({what}); build an MViT v1 preset such as mvit_b_16x4")
    has_class_token = "pos_embed.class_token" in state
    if has_class_token != model.config.class_token:
        if has_class_token:
            raise ValueError("a checkpoint with a class token; build a preset with class_token=True")
        raise ValueError(
            "a checkpoint without a class token (as PySlowFast's ImageNet MViTv2); build a preset with "
            "class_token=False such as mvit_v2_s_image"
        )


def _drop_pool_aliases(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """pytorchvideo's main branch registers each pooling conv and norm twice (``attn.pool_q`` and
    ``attn._attention_pool_q.pool``); keep one, after checking that the two are equal."""
    kept = dict(state)
    for key, alias in state.items():
        match = _POOL_ALIAS.match(key)
        if not match:
            continue
        prefix, which, part, kind = match.groups()
        original = f"{prefix}.{part}_{which}.{kind}"
        del kept[key]
        if original not in state:
            kept[original] = alias
        elif not torch.equal(state[original], alias):
            raise ValueError(f"{key} differs from {original}, which it aliases in pytorchvideo: inconsistent file")
    return kept


def _rename(state: dict[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
    rules = [(re.compile(pattern), replacement) for pattern, replacement in _RENAME_RULES[layout]]
    renamed = {}
    for key, value in state.items():
        for pattern, replacement in rules:
            key, count = pattern.subn(replacement, key)
            if count:
                break
        renamed[key] = value
    return renamed


def _fuse_separate_qkv(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """PySlowFast (SEPARATE_QKV) and pytorchvideo checkpoints may have attn.q, attn.k, attn.v: stack them."""
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


def _split_joint_pos_embed(joint: torch.Tensor, model: MViT, state: dict[str, torch.Tensor]) -> None:
    """PySlowFast's ImageNet MViT-B-16 (SEP_POS_EMBED off) has one (1, [1 +] H·W, C) ``pos_embed``: on a one-frame
    grid it is exactly class_pos + spatial, with a zero temporal part."""
    joint = joint.reshape(-1, joint.shape[-1])
    if model.config.class_token:
        state["pos_embed.class_pos"], joint = joint[0], joint[1:]
    if model.token_grid[0] != 1:
        raise ValueError(
            f"a joint space-time pos_embed ({joint.shape[0]} positions): it splits into this model's separate space "
            f"and time embeddings only for one-frame models, and this one has {model.token_grid[0]} time steps"
        )
    state["pos_embed.spatial"] = joint
    state["pos_embed.temporal"] = joint.new_zeros(1, joint.shape[-1])


def _foreign_layouts(state: dict[str, torch.Tensor], model: MViT) -> dict[str, torch.Tensor]:
    """Reshape foreign tensors into native layout: (1, 1, C) tokens → (C,), flat (H·W, C) → (H, W, C), ..."""
    if "pos_embed.joint" in state:
        _split_joint_pos_embed(state.pop("pos_embed.joint"), model, state)
    for key in ("pos_embed.class_token", "pos_embed.class_pos"):
        if key in state:
            state[key] = state[key].reshape(-1)
    if "pos_embed.temporal" in state:
        temporal = state["pos_embed.temporal"]
        state["pos_embed.temporal"] = temporal.reshape(-1, temporal.shape[-1])
    if "pos_embed.spatial" in state and model.pos_embed.spatial is not None:
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
    state = _strip_wrappers(_state_dict_of(checkpoint))
    _check_layout(state, source)
    if source == "pytorchvideo_main":
        state = _drop_pool_aliases(state)
    state = _fuse_separate_qkv(_rename(state, SOURCE_INFO[source].layout))
    if source != "native":
        state = _foreign_layouts(state, model)
    _check_family(state, source, model)
    return state


def _short(keys: list[str]) -> str:
    return str(keys[:6])[:-1] + (f", ... {len(keys) - 6} more]" if len(keys) > 6 else "]")


def _resized(key: str, tensor: torch.Tensor, target: torch.Tensor) -> torch.Tensor | None:
    """``tensor`` interpolated to ``target``'s shape where ``key`` is an embedding of another grid, else None."""
    if key == "pos_embed.spatial" and tensor.ndim == 3 and tensor.shape[2] == target.shape[2]:
        return resize_spatial(tensor.float(), tuple(target.shape[:2])).to(tensor.dtype)
    if key == "pos_embed.temporal" and tensor.ndim == 2 and tensor.shape[1] == target.shape[1]:
        return resize_temporal(tensor.float(), target.shape[0]).to(tensor.dtype)
    if _REL_POS.search(key) and tensor.ndim == 2 and tensor.shape[1] == target.shape[1]:
        return resize_table(tensor.float(), target.shape[0]).to(tensor.dtype)
    return None


def _fit_into(model: MViT, state: dict[str, torch.Tensor], source: str) -> None:
    """Load a native-layout state dict, interpolating embeddings of another grid and re-initialising a mismatched
    head."""
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
        resized = _resized(key, tensor, target)
        if resized is not None:
            fitted[key] = resized
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
    eps = SOURCE_INFO[source].pool_norm_eps
    if eps is not None:
        model.set_pool_norm_eps(eps)
    return model


def load_pretrained(model: MViT, path: str | os.PathLike[str], source: str = "native") -> MViT:
    """Load weights saved by ``source`` (one of :data:`mvit.SOURCES`) into ``model``, which then computes as that
    source does: its pooling-norm epsilon is set to the source's (see :mod:`mvit.sources`).

    Files are read with ``torch.load(weights_only=True)``: a bare state dict, or a checkpoint dict holding it under
    "model_state" (PySlowFast, pytorchvideo's zoo) or "model" (native training checkpoints). Wrapper prefixes
    (``module.``, ``model.``, ``_orig_mod.``) are stripped. A checkpoint of another source, library version or model
    family is a one-line ValueError that says what the file looks like. Returns ``model``.
    """
    _check_source(source)
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    try:
        return load_weights(model, checkpoint, source)
    except ValueError as error:
        raise ValueError(f"{os.fspath(path)}: {error}") from None
