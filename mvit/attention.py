"""Multi Head Pooling Attention (MHPA), section 3.1 of the MViT paper, with the MViTv2 additions of section 4.1."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import BlockConfig, PoolConfig, rel_pos_lengths
from .pooling import Grid, PoolMemoryFormat, TokenPool
from .relative_position import rel_pos_bias


def _make_pool(
    pool: PoolConfig,
    block: BlockConfig,
    head_dim: int,
    norm_eps: float,
    memory_format: PoolMemoryFormat,
    class_token: bool,
) -> TokenPool | None:
    if pool.is_identity:
        return None
    padding = pool.resolved_padding
    return TokenPool(block.pool_mode, head_dim, pool.kernel, pool.stride, padding, norm_eps, memory_format, class_token)


class MultiHeadPoolingAttention(nn.Module):
    """Q, K and V are projected, pooled per head with their own Θ, then attended; the output has the query length.

    Pooling queries shortens the output sequence (a new, coarser grid); pooling keys and values only makes the
    attention cheaper. Attention is one ``scaled_dot_product_attention`` call, so that the scores never exist as a
    tensor: under bf16 autocast q, k and v stay bf16 and a flash or memory-efficient kernel keeps the softmax on chip.
    MViT v1 blocks pass no mask. MViTv2 blocks with relative positions pass their bias as an additive float mask
    (see :mod:`mvit.relative_position`), and with residual pooling add the pooled query to the output of every grid
    token (the class token excepted, as in PySlowFast and torchvision).

    ``grid`` is the block's input token grid at the model's ``input_size``; it sizes the relative-position tables.
    """

    def __init__(
        self,
        block: BlockConfig,
        grid: Grid,
        pool_norm_eps: float = 1e-6,
        pool_memory_format: PoolMemoryFormat = "contiguous",
        class_token: bool = True,
    ) -> None:
        super().__init__()
        self.num_heads = block.num_heads
        self.head_dim = block.attn_dim // block.num_heads
        self.class_token = class_token
        self.residual_pooling = block.residual_pooling
        self.qkv = nn.Linear(block.dim_in, 3 * block.attn_dim)
        pool_args = (block, self.head_dim, pool_norm_eps, pool_memory_format, class_token)
        self.pool_q = _make_pool(block.pool_q, *pool_args)
        self.pool_k = _make_pool(block.pool_k, *pool_args)
        self.pool_v = _make_pool(block.pool_v, *pool_args)
        self.proj = nn.Linear(block.attn_dim, block.attn_dim)
        spatial, temporal = rel_pos_lengths(block, grid)
        self.rel_pos_h = nn.Parameter(torch.zeros(spatial, self.head_dim)) if block.rel_pos_spatial else None
        self.rel_pos_w = nn.Parameter(torch.zeros(spatial, self.head_dim)) if block.rel_pos_spatial else None
        self.rel_pos_t = nn.Parameter(torch.zeros(temporal, self.head_dim)) if block.rel_pos_temporal else None

    @property
    def has_rel_pos(self) -> bool:
        return self.rel_pos_h is not None or self.rel_pos_t is not None

    def forward(self, x: torch.Tensor, grid: Grid) -> tuple[torch.Tensor, Grid]:
        batch, length, _ = x.shape
        qkv = self.qkv(x).reshape(batch, length, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, [1 +] THW, head_dim)
        q_grid, kv_grid = grid, grid
        if self.pool_q is not None:
            q, q_grid = self.pool_q(q, grid)
        if self.pool_k is not None:
            k, kv_grid = self.pool_k(k, grid)
        if self.pool_v is not None:
            v, _ = self.pool_v(v, grid)
        mask = None
        if self.has_rel_pos:
            mask = rel_pos_bias(q, q_grid, kv_grid, self.rel_pos_h, self.rel_pos_w, self.rel_pos_t, self.class_token)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # softmax(q kᵀ / √head_dim + mask) v
        if self.residual_pooling:
            out = self._add_pooled_query(out, q)
        out = out.transpose(1, 2).reshape(batch, -1, self.num_heads * self.head_dim)
        return self.proj(out), q_grid

    def _add_pooled_query(self, out: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        if not self.class_token:
            return out + q
        return torch.cat((out[:, :, :1], out[:, :, 1:] + q[:, :, 1:]), dim=2)
