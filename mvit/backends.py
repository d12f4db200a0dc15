"""Which scaled-dot-product-attention kernel each block gets, for a given input, dtype and device.

PyTorch picks flash, memory-efficient, cuDNN or the math fallback per call from the shapes, dtype and device, and
falls back silently. Only the fused kernels keep the attention scores (and the bf16 softmax) on chip; the math
fallback materialises them. This report tries each backend alone on tensors of every block's q/k/v shapes, so a
silent fallback becomes visible before a long run.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from .config import patch_grid
from .model import MViT
from .pooling import pooled_grid

BACKENDS: tuple[SDPBackend, ...] = (
    SDPBackend.FLASH_ATTENTION,
    SDPBackend.EFFICIENT_ATTENTION,
    SDPBackend.CUDNN_ATTENTION,
    SDPBackend.MATH,
)


@dataclass(frozen=True)
class AttentionShape:
    """q is (batch, heads, q_length, head_dim); k and v are (batch, heads, kv_length, head_dim).

    An unpooled q (or k and v) is a strided view of the fused qkv projection, not a contiguous tensor; kernels have
    stride requirements, so the report reproduces that layout. ``mask``: the block passes its relative-position
    bias, a (batch, heads, q_length, kv_length) float tensor in q's dtype (MViTv2); backends differ in whether they
    take one, and in training whether they give its gradient.
    """

    batch: int
    heads: int
    q_length: int
    kv_length: int
    head_dim: int
    q_is_view: bool
    kv_is_view: bool
    mask: bool = False


@dataclass(frozen=True)
class BlockBackends:
    """For one block: its shapes, the backend the dispatcher chooses, and why each backend can or cannot run."""

    block: int
    shape: AttentionShape
    chosen: str
    usable: dict[str, bool]
    reasons: dict[str, str]


def attention_shapes(model: MViT, input_shape: Sequence[int]) -> list[AttentionShape]:
    """The q/k/v shapes of every block for an input of ``input_shape`` (B, C, T, H, W) or (B, C, H, W).

    Lengths count the class token, which goes around every pooling.
    """
    batch, spatial = input_shape[0], tuple(input_shape[2:])
    grid = patch_grid(model.config, spatial if len(spatial) == 3 else (1, *spatial))
    extra = int(model.config.class_token)
    shapes = []
    for block in model.config.blocks:
        q_grid, kv_grid = grid, grid
        if not block.pool_q.is_identity:
            q_grid = pooled_grid(grid, block.pool_q.kernel, block.pool_q.stride, block.pool_q.resolved_padding)
        if not block.pool_k.is_identity:
            kv_grid = pooled_grid(grid, block.pool_k.kernel, block.pool_k.stride, block.pool_k.resolved_padding)
        heads = block.num_heads
        q_length, kv_length = extra + math.prod(q_grid), extra + math.prod(kv_grid)
        shapes.append(
            AttentionShape(
                batch,
                heads,
                q_length,
                kv_length,
                block.attn_dim // heads,
                block.pool_q.is_identity,
                block.pool_k.is_identity,
                block.rel_pos_spatial or block.rel_pos_temporal,
            )
        )
        grid = q_grid
    return shapes


def _attention_input(
    shape: AttentionShape, length: int, is_view: bool, dtype: torch.dtype, device: torch.device, grad: bool
) -> torch.Tensor:
    """(batch, heads, length, head_dim) random values, laid out as the model has them."""
    if not is_view:
        size = (shape.batch, shape.heads, length, shape.head_dim)
        return torch.randn(size, device=device, dtype=dtype, requires_grad=grad)
    qkv = torch.randn(shape.batch, length, 3, shape.heads, shape.head_dim, device=device, dtype=dtype)
    return qkv.permute(2, 0, 3, 1, 4)[0].detach().requires_grad_(grad)


def _try_backend(
    backend: SDPBackend,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    backward: bool,
) -> tuple[bool, str]:
    """Run attention with only ``backend`` allowed; a backend that cannot take these inputs raises, and PyTorch
    warns the reason first."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with sdpa_kernel([backend]):
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
                if backward:
                    out.sum().backward()
        except RuntimeError as error:
            reasons = [str(w.message).splitlines()[0] for w in caught]
            if not reasons:  # CPU builds have no kernel for the CUDA-only backends and say only "no viable backend"
                reasons = [f"no {q.device.type} kernel" if q.device.type == "cpu" else str(error).splitlines()[0]]
            unstated = all(r.split("because:")[-1].strip().startswith("(Triggered") for r in reasons)
            if mask is not None and mask.requires_grad and unstated:
                # PyTorch's CPU checks name no reason here; the kernel takes the mask but not its gradient
                reasons = [f"no {q.device.type} kernel gives the gradient of a float mask"]
            return False, "; ".join(reasons)
    return True, "runs"


def sdpa_backends(
    model: MViT,
    input_shape: Sequence[int],
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    backward: bool = False,
) -> list[BlockBackends]:
    """For each block, which SDPA backends can run its q/k/v shapes (and relative-position mask) in ``dtype`` on
    ``device`` (with their backward pass too when ``backward``), and which one ``scaled_dot_product_attention``
    picks when all are allowed.

    Blocks with the same shapes are tried once. Only the model's configuration is read, not its weights.
    """
    device = torch.device(device)
    tried: dict[AttentionShape, tuple[str, dict[str, bool], dict[str, str]]] = {}
    report = []
    for index, shape in enumerate(attention_shapes(model, input_shape)):
        if shape not in tried:
            q = _attention_input(shape, shape.q_length, shape.q_is_view, dtype, device, backward)
            k = _attention_input(shape, shape.kv_length, shape.kv_is_view, dtype, device, backward)
            v = _attention_input(shape, shape.kv_length, shape.kv_is_view, dtype, device, backward)
            mask = None
            if shape.mask:
                mask_size = (shape.batch, shape.heads, shape.q_length, shape.kv_length)
                mask = torch.randn(mask_size, device=device, dtype=dtype, requires_grad=backward)
            chosen = SDPBackend(torch._fused_sdp_choice(q, k, v, mask)).name  # the dispatcher's own choice
            outcomes = {backend.name: _try_backend(backend, q, k, v, mask, backward) for backend in BACKENDS}
            tried[shape] = (
                chosen,
                {name: ok for name, (ok, _) in outcomes.items()},
                {name: why for name, (_, why) in outcomes.items()},
            )
        chosen, usable, reasons = tried[shape]
        report.append(BlockBackends(index, shape, chosen, usable, reasons))
    return report
