"""Class token and separable space-time positional embedding, resizable to other token grids."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .pooling import Grid


def resize_spatial(spatial: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bicubic resize of an (H, W, C) spatial embedding to (H', W', C)."""
    if tuple(spatial.shape[:2]) == tuple(size):
        return spatial
    image = spatial.permute(2, 0, 1).unsqueeze(0)
    return F.interpolate(image, size=size, mode="bicubic", align_corners=False).squeeze(0).permute(1, 2, 0)


def resize_temporal(temporal: torch.Tensor, length: int) -> torch.Tensor:
    """Linear resize of a (T, C) temporal embedding to (T', C)."""
    if temporal.shape[0] == length:
        return temporal
    series = temporal.transpose(0, 1).unsqueeze(0)
    return F.interpolate(series, size=length, mode="linear", align_corners=False).squeeze(0).transpose(0, 1)


class PositionalEmbedding(nn.Module):
    """Prepends the class token and adds temporal[t] + spatial[h, w] to the token at index t·HW + h·W + w.

    Space and time are kept apart (paper Table 11): fewer parameters than a joint embedding, and each part can be
    interpolated on its own when the model meets another number of frames or crop size.
    """

    def __init__(self, dim: int, grid: Grid) -> None:
        super().__init__()
        self.class_token = nn.Parameter(torch.zeros(dim))
        self.class_pos = nn.Parameter(torch.zeros(dim))
        self.spatial = nn.Parameter(torch.zeros(grid[1], grid[2], dim))
        self.temporal = nn.Parameter(torch.zeros(grid[0], dim))

    def forward(self, tokens: torch.Tensor, grid: Grid) -> torch.Tensor:
        """``tokens``: (B, T·H·W, C) from the patch embedding, laid out on ``grid``; returns (B, 1 + T·H·W, C)."""
        spatial = resize_spatial(self.spatial, grid[1:]).flatten(0, 1)
        temporal = resize_temporal(self.temporal, grid[0])
        positions = (temporal[:, None, :] + spatial[None, :, :]).flatten(0, 1)
        positions = torch.cat((self.class_pos[None], positions), dim=0)
        class_token = self.class_token.expand(tokens.shape[0], 1, -1)
        return torch.cat((class_token, tokens), dim=1) + positions
