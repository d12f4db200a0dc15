"""Multi Head Pooling Attention (MHPA), section 3.1 of the MViT paper."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import BlockConfig, PoolConfig
from .pooling import Grid, PoolMemoryFormat, TokenPool


def _make_pool(
    pool: PoolConfig, block: BlockConfig, head_dim: int, norm_eps: float, memory_format: PoolMemoryFormat
) -> TokenPool | None:
    if pool.is_identity:
        return None
    padding = pool.resolved_padding
    return TokenPool(block.pool_mode, head_dim, pool.kernel, pool.stride, padding, norm_eps, memory_format)


class MultiHeadPoolingAttention(nn.Module):
    """Q, K and V are projected, pooled per head with their own Θ, then attended; the output has the query length.

    Pooling queries shortens the output sequence (a new, coarser grid); pooling keys and values only makes the
    attention cheaper. Runs at ``dim_in`` channels, as in MViT v1. Attention is one
    ``scaled_dot_product_attention`` call, so that the scores never exist as a tensor: under bf16 autocast q, k and
    v stay bf16 and a flash or memory-efficient kernel keeps the softmax on chip.
    """

    def __init__(
        self, block: BlockConfig, norm_eps: float = 1e-6, pool_memory_format: PoolMemoryFormat = "contiguous"
    ) -> None:
        super().__init__()
        self.num_heads = block.num_heads
        self.head_dim = block.dim_in // block.num_heads
        self.qkv = nn.Linear(block.dim_in, 3 * block.dim_in)
        self.pool_q = _make_pool(block.pool_q, block, self.head_dim, norm_eps, pool_memory_format)
        self.pool_k = _make_pool(block.pool_k, block, self.head_dim, norm_eps, pool_memory_format)
        self.pool_v = _make_pool(block.pool_v, block, self.head_dim, norm_eps, pool_memory_format)
        self.proj = nn.Linear(block.dim_in, block.dim_in)

    def forward(self, x: torch.Tensor, grid: Grid) -> tuple[torch.Tensor, Grid]:
        batch, length, channels = x.shape
        qkv = self.qkv(x).reshape(batch, length, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, 1 + THW, head_dim)
        q_grid = grid
        if self.pool_q is not None:
            q, q_grid = self.pool_q(q, grid)
        if self.pool_k is not None:
            k, _ = self.pool_k(k, grid)
        if self.pool_v is not None:
            v, _ = self.pool_v(v, grid)
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q kᵀ / √head_dim) v
        out = out.transpose(1, 2).reshape(batch, -1, channels)
        return self.proj(out), q_grid
