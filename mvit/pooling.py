"""The pooling operator P(·; Θ) of the paper, applied to a token sequence that lies on a (T, H, W) grid."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

Grid = tuple[int, int, int]
PoolMode = Literal["conv", "avg", "max"]
POOL_MODES: tuple[str, ...] = ("conv", "avg", "max")
PoolMemoryFormat = Literal["contiguous", "channels_last_3d"]
POOL_MEMORY_FORMATS: dict[str, torch.memory_format] = {
    "contiguous": torch.contiguous_format,
    "channels_last_3d": torch.channels_last_3d,
}


def pooled_grid(grid: Sequence[int], kernel: Sequence[int], stride: Sequence[int], padding: Sequence[int]) -> Grid:
    """Output grid of a pooling: L̃ = ⌊(L + 2p − k) / s⌋ + 1 per dimension.

    A dimension comes out ≤ 0 when the kernel is larger than the padded input; callers treat that as an error.
    """
    return tuple((size + 2 * p - k) // s + 1 for size, k, s, p in zip(grid, kernel, stride, padding, strict=True))


class TokenPool(nn.Module):
    """P(·; Θ) on tokens ``(..., 1 + T·H·W, C)`` whose first token is the class token (``(..., T·H·W, C)`` for a
    model without one, ``class_token=False``).

    The class token goes around the pooling: it is split off, the grid tokens are pooled as a (C, T, H, W) volume,
    and the class token is put back in front. In ``conv`` mode the pooling is a depthwise Conv3d followed by a
    LayerNorm over channels (class token included, as in PySlowFast and torchvision); ``avg`` and ``max`` pool
    without parameters and without a norm.

    ``memory_format`` is the layout of the pooled volume: ``contiguous`` (NCDHW) or ``channels_last_3d`` (NDHWC).
    The tokens already lie channels-last in memory, so NDHWC spares the transposes around the pooling; which one
    is faster depends on the device's depthwise-conv kernels. Both give the same result up to float rounding.
    """

    def __init__(
        self,
        mode: PoolMode,
        channels: int,
        kernel: Sequence[int],
        stride: Sequence[int],
        padding: Sequence[int],
        norm_eps: float = 1e-6,
        memory_format: PoolMemoryFormat = "contiguous",
        class_token: bool = True,
    ) -> None:
        super().__init__()
        self.kernel, self.stride, self.padding = tuple(kernel), tuple(stride), tuple(padding)
        self.class_tokens = int(class_token)
        self.memory_format = POOL_MEMORY_FORMATS[memory_format]
        self.norm: nn.LayerNorm | None = None
        if mode == "conv":
            self.pool: nn.Module = nn.Conv3d(
                channels, channels, self.kernel, self.stride, self.padding, groups=channels, bias=False
            )
            self.norm = nn.LayerNorm(channels, eps=norm_eps)
        elif mode == "avg":
            self.pool = nn.AvgPool3d(self.kernel, self.stride, self.padding)
        elif mode == "max":
            self.pool = nn.MaxPool3d(self.kernel, self.stride, self.padding)
        else:
            raise ValueError(f"pool mode must be one of {POOL_MODES}, got {mode!r}")

    def forward(self, tokens: torch.Tensor, grid: Grid) -> tuple[torch.Tensor, Grid]:
        *leading, length, channels = tokens.shape
        tokens = tokens.reshape(-1, length, channels)
        class_token, grid_tokens = tokens[:, : self.class_tokens], tokens[:, self.class_tokens :]
        volume = grid_tokens.transpose(1, 2).reshape(-1, channels, *grid).contiguous(memory_format=self.memory_format)
        volume = self.pool(volume)
        out_grid: Grid = tuple(volume.shape[2:])
        pooled = torch.cat((class_token, volume.flatten(2).transpose(1, 2)), dim=1)
        if self.norm is not None:
            # under autocast LayerNorm computes (and on CUDA returns) fp32; attention gets back the input's dtype
            pooled = self.norm(pooled).to(tokens.dtype)
        return pooled.reshape(*leading, pooled.shape[1], channels), out_grid
