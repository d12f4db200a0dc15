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
    interpolated on its own when the model meets another number of frames or crop size. MViTv2 models keep only
    the class token (``absolute=False``: positions come from the relative embeddings in attention), and PySlowFast's
    ImageNet MViTv2 has neither (``class_token=False``), which leaves this module without parameters.
    """

    def __init__(self, dim: int, grid: Grid, class_token: bool = True, absolute: bool = True) -> None:
        super().__init__()
        self.class_token = nn.Parameter(torch.zeros(dim)) if class_token else None
        self.class_pos = nn.Parameter(torch.zeros(dim)) if class_token and absolute else None
        self.spatial = nn.Parameter(torch.zeros(grid[1], grid[2], dim)) if absolute else None
        self.temporal = nn.Parameter(torch.zeros(grid[0], dim)) if absolute else None

    def forward(self, tokens: torch.Tensor, grid: Grid) -> torch.Tensor:
        """``tokens``: (B, T·H·W, C) from the patch embedding, laid out on ``grid``; returns (B, [1 +] T·H·W, C)."""
        if self.spatial is not None and self.temporal is not None:
            spatial = resize_spatial(self.spatial, grid[1:]).flatten(0, 1)
            temporal = resize_temporal(self.temporal, grid[0])
            tokens = tokens + (temporal[:, None, :] + spatial[None, :, :]).flatten(0, 1)
        if self.class_token is None:
            return tokens
        class_token = self.class_token if self.class_pos is None else self.class_token + self.class_pos
        return torch.cat((class_token.expand(tokens.shape[0], 1, -1), tokens), dim=1)
