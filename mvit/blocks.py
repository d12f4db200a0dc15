"""The pre-norm multiscale transformer block: pooling attention, MLP, and the residual paths that match them."""

from __future__ import annotations

import torch
from torch import nn

from .attention import MultiHeadPoolingAttention
from .config import BlockConfig, skip_pool_config
from .pooling import Grid, PoolMemoryFormat, TokenPool


class DropPath(nn.Module):
    """Stochastic depth: drop a residual branch for whole samples, scaling survivors by 1 / (1 − p)."""

    def __init__(self, drop_prob: float) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.drop_prob == 0.0:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class Mlp(nn.Module):
    """Linear(d, hidden) → GELU → Linear(hidden, d_out); d_out > d at the end of a stage widens the channels."""

    def __init__(self, dim_in: int, hidden: int, dim_out: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim_in, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class MultiscaleBlock(nn.Module):
    """X₁ = P(X; Θ_skip) + MHPA(LN(X));  out = skip(LN(X₁)) + MLP(LN(X₁)).

    When queries are pooled the attention output lies on a coarser grid, so the residual is pooled to match.
    Where the block widens the channels, the residual is widened by a Linear on a normalised input: in MViT v1 the
    MLP widens and the Linear takes the MLP's input LN(X₁) (paper, Fig. A.5a); with ``dim_mul_in_att`` (MViTv2)
    attention widens and the Linear takes LN(X) before the pooling, so that skip(·) is the identity.
    """

    def __init__(
        self,
        block: BlockConfig,
        grid: Grid,
        mlp_ratio: float,
        drop_path: float,
        norm_eps: float = 1e-6,
        pool_norm_eps: float = 1e-6,
        pool_memory_format: PoolMemoryFormat = "contiguous",
        class_token: bool = True,
    ) -> None:
        super().__init__()
        self.dim_mul_in_att = block.dim_mul_in_att
        self.norm1 = nn.LayerNorm(block.dim_in, eps=norm_eps)
        self.attn = MultiHeadPoolingAttention(block, grid, pool_norm_eps, pool_memory_format, class_token)
        skip = skip_pool_config(block.pool_q)
        self.skip_pool = (
            None
            if skip is None
            else TokenPool(
                "max",
                block.dim_in,
                skip.kernel,
                skip.stride,
                skip.resolved_padding,
                memory_format=pool_memory_format,
                class_token=class_token,
            )
        )
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(block.attn_dim, eps=norm_eps)
        self.mlp = Mlp(block.attn_dim, int(block.attn_dim * mlp_ratio), block.dim_out)
        self.skip_proj = nn.Linear(block.dim_in, block.dim_out) if block.dim_in != block.dim_out else None

    def forward(self, x: torch.Tensor, grid: Grid) -> tuple[torch.Tensor, Grid]:
        normed = self.norm1(x)
        attended, out_grid = self.attn(normed, grid)
        residual = x
        if self.skip_proj is not None and self.dim_mul_in_att:
            residual = self.skip_proj(normed)
        if self.skip_pool is not None:
            residual = self.skip_pool(residual, grid)[0]
        x = residual + self.drop_path(attended)
        normed = self.norm2(x)
        residual = x
        if self.skip_proj is not None and not self.dim_mul_in_att:
            residual = self.skip_proj(normed)
        return residual + self.drop_path(self.mlp(normed)), out_grid
