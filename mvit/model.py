"""The Multiscale Vision Transformer: MViT v1 (Fan et al., ICCV 2021) and MViTv2 (Li et al., CVPR 2022)."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .blocks import MultiscaleBlock
from .config import MViTConfig, block_grids, patch_grid, validate_config
from .embedding import PositionalEmbedding
from .pooling import Grid


class MViT(nn.Module):
    """cube₁ patch embedding → class token + positional embedding → multiscale blocks → LayerNorm → class token →
    dropout → linear. Without a class token the head takes the mean of the normalised tokens.

    Takes ``(B, C, T, H, W)`` clips, or ``(B, C, H, W)`` images as one-frame clips. The model is built for
    ``config.input_size``; another input size works too: the absolute positional embeddings (spatial bicubic,
    temporal linear) and the relative-position tables (linear) are interpolated on the fly, after checking that
    every pooling can take the new grid.
    """

    def __init__(self, config: MViTConfig) -> None:
        super().__init__()
        grids = validate_config(config)
        self.config = config
        self.token_grid = patch_grid(config, config.input_size)
        embed_dim, out_dim = config.blocks[0].dim_in, config.blocks[-1].dim_out
        self.patch_embed = nn.Conv3d(
            config.in_channels, embed_dim, config.patch_kernel, config.patch_stride, config.patch_padding
        )
        self.pos_embed = PositionalEmbedding(embed_dim, self.token_grid, config.class_token, config.abs_pos_embed)
        depth = len(config.blocks)
        self.blocks = nn.ModuleList(
            MultiscaleBlock(
                block,
                grid,
                config.mlp_ratio,
                config.drop_path_rate * i / max(depth - 1, 1),
                config.norm_eps,
                config.pool_norm_eps,
                config.pool_memory_format,
                config.class_token,
            )
            for i, (block, grid) in enumerate(zip(config.blocks, [self.token_grid, *grids[:-1]]))
        )
        self.norm = nn.LayerNorm(out_dim, eps=config.norm_eps)
        self.head_dropout = nn.Dropout(config.head_dropout)
        self.head = nn.Linear(out_dim, config.num_classes)
        self._checked_grids = {self.token_grid}
        self.reset_parameters()

    @property
    def input_size(self) -> tuple[int, int, int]:
        """(T, H, W) of the clips the model was built for."""
        return self.config.input_size

    @property
    def num_classes(self) -> int:
        return self.head.out_features

    def reset_parameters(self) -> None:
        """Truncated-normal (std 0.02) linears and embeddings, unit LayerNorms, as in PySlowFast and torchvision."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        for name, parameter in self.named_parameters():
            if name.startswith("pos_embed.") or ".rel_pos_" in name:
                nn.init.trunc_normal_(parameter, std=0.02)

    def set_pool_norm_eps(self, eps: float) -> None:
        """Use ``eps`` in the LayerNorms after the q/k/v pooling (how weights of another implementation load)."""
        if not eps > 0.0:
            raise ValueError(f"pool_norm_eps must be > 0, got {eps}")
        self.config = dataclasses.replace(self.config, pool_norm_eps=eps)
        for block in self.blocks:
            for pool in (block.attn.pool_q, block.attn.pool_k, block.attn.pool_v):
                if pool is not None and pool.norm is not None:
                    pool.norm.eps = eps

    def reset_head(self) -> None:
        """Fresh classifier weights, e.g. when a checkpoint's head has another number of classes."""
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def no_weight_decay(self) -> set[str]:
        """Names of parameters that AdamW should not decay: biases, other 1-D parameters, embeddings, class token,
        relative-position tables (as PySlowFast's ZERO_DECAY_POS_CLS)."""
        return {
            name
            for name, parameter in self.named_parameters()
            if parameter.ndim <= 1 or name.endswith(".bias") or name.startswith("pos_embed.") or ".rel_pos_" in name
        }

    def _check_grid(self, grid: Grid, input_size: tuple[int, ...]) -> None:
        if grid not in self._checked_grids:
            block_grids(self.config.blocks, grid, f" (input (T, H, W) = {input_size}, token grid {grid})")
            self._checked_grids.add(grid)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised class-token features (the mean of the normalised tokens without one), (B, blocks[-1].dim_out)."""
        if x.ndim == 4:
            x = x.unsqueeze(2)
        if x.ndim != 5 or x.shape[1] != self.config.in_channels:
            raise ValueError(
                f"MViT expects input of shape (B, {self.config.in_channels}, T, H, W) or "
                f"(B, {self.config.in_channels}, H, W), got {tuple(x.shape)}"
            )
        input_grid = tuple(x.shape[2:])
        if input_grid != self.input_size:
            patch_grid(self.config, input_grid)
        x = self.patch_embed(x)
        grid: Grid = tuple(x.shape[2:])
        if grid != self.token_grid:
            self._check_grid(grid, input_grid)
        x = self.pos_embed(x.flatten(2).transpose(1, 2), grid)
        recompute = self.config.activation_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            if recompute:  # keep only each block's input; rerun the block (same RNG draws) in the backward pass
                x, grid = checkpoint(block, x, grid, use_reentrant=False)
            else:
                x, grid = block(x, grid)
        if self.config.class_token:
            return self.norm(x[:, 0])
        return self.norm(x).mean(dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.head_dropout(self.forward_features(x)))
