"""Every invalid configuration is a ValueError that names the block and the field."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import mvit
from mvit import BlockConfig, MViT, MViTConfig, PoolConfig


def tiny_config(**overrides: object) -> MViTConfig:
    return mvit.preset_config("mvit_tiny", **overrides)


def with_block(config: MViTConfig, index: int, **changes: object) -> MViTConfig:
    blocks = list(config.blocks)
    blocks[index] = dataclasses.replace(blocks[index], **changes)
    return dataclasses.replace(config, blocks=tuple(blocks))


def test_tiny_preset_is_valid_and_has_two_query_poolings() -> None:
    config = tiny_config()
    grids = mvit.validate_config(config)
    assert len(config.blocks) == 4
    assert grids == [(4, 16, 16), (4, 8, 8), (4, 8, 8), (4, 4, 4)]
    assert sum(block.pool_q.stride != (1, 1, 1) for block in config.blocks) == 2


def test_key_and_value_strides_must_match() -> None:
    config = with_block(tiny_config(), 2, pool_v=PoolConfig((3, 3, 3), (1, 1, 1)))
    with pytest.raises(ValueError, match=r"^block 2 pool_v\.stride: .*s_K = s_V"):
        MViT(config)


def test_kernel_that_empties_a_dimension() -> None:
    # block 3 sees a 4×8×8 grid; a temporal kernel of 7 without padding leaves nothing
    config = with_block(tiny_config(), 3, pool_q=PoolConfig((7, 3, 3), (1, 2, 2), (0, 1, 1)))
    with pytest.raises(ValueError, match=r"^block 3 pool_q\.kernel: .*empties the grid \(4, 8, 8\)"):
        MViT(config)


@pytest.mark.parametrize("stride", [(1, 0, 2), (1, -2, 2)])
def test_stride_below_one(stride: tuple[int, int, int]) -> None:
    config = with_block(tiny_config(), 1, pool_k=PoolConfig((3, 3, 3), stride), pool_v=PoolConfig((3, 3, 3), stride))
    with pytest.raises(ValueError, match=r"^block 1 pool_k\.stride: every entry must be >= 1"):
        MViT(config)


def test_dim_not_divisible_by_heads() -> None:
    config = with_block(tiny_config(), 1, num_heads=3)
    with pytest.raises(ValueError, match=r"^block 1 num_heads: dim_in 64 is not divisible by num_heads 3"):
        MViT(config)


def test_dims_must_chain() -> None:
    config = with_block(tiny_config(), 0, dim_out=48)
    with pytest.raises(ValueError, match=r"^block 1 dim_in: 64 != dim_out 48 of block 0"):
        MViT(config)


def test_unknown_pool_mode() -> None:
    with pytest.raises(ValueError, match=r"^block 0 pool_mode: "):
        MViT(with_block(tiny_config(), 0, pool_mode="median"))


def test_avg_pool_padding_limit() -> None:
    config = with_block(tiny_config(), 1, pool_mode="avg", pool_q=PoolConfig((3, 3, 3), (1, 2, 2), (2, 1, 1)))
    with pytest.raises(ValueError, match=r"^block 1 pool_q\.padding: avg pooling needs padding <= kernel // 2"):
        MViT(config)


def test_query_pool_must_match_the_residual_pool() -> None:
    # an even kernel with padding k // 2 pools queries to a different grid than the max-pooled residual
    config = with_block(tiny_config(), 1, pool_q=PoolConfig((2, 2, 2), (1, 2, 2)))
    with pytest.raises(ValueError, match=r"^block 1 pool_q\.kernel: queries pool to .* residual path"):
        MViT(config)


def test_input_grid_the_configuration_cannot_take() -> None:
    # 8×64×64 clips are fine; a 2-frame clip leaves a 1-frame token grid that an avg pool of kernel 3 cannot take
    blocks = mvit.multiscale_blocks(32, (1, 2, 1), (1, 4, 4), pool_mode="avg")
    with pytest.raises(ValueError, match=r"^block 0 pool_k\.kernel: avg pooling .* \(input_size \(2, 64, 64\)\)"):
        MViT(MViTConfig(blocks=blocks, input_size=(2, 64, 64)))
    # MViT-S embeds non-overlapping 8×8 cubes without padding: a 4×4 crop has none
    with pytest.raises(ValueError, match=r"^input_size \(16, 4, 4\) is too small for the patch embedding"):
        mvit.create_model("mvit_s_16x4", input_size=(16, 4, 4))


def test_forward_on_a_grid_the_configuration_cannot_take_names_it() -> None:
    blocks = mvit.multiscale_blocks(32, (1, 2, 1), (1, 4, 4), pool_mode="avg")
    model = MViT(MViTConfig(blocks=blocks, input_size=(8, 64, 64), num_classes=3))
    with pytest.raises(ValueError, match=r"^block 0 pool_k\.kernel: .*input \(T, H, W\) = \(2, 64, 64\)"):
        model(torch.randn(1, 3, 2, 64, 64))
    with pytest.raises(ValueError, match=r"expects input of shape \(B, 3, T, H, W\)"):
        model(torch.randn(1, 4, 8, 64, 64))


def test_model_level_fields() -> None:
    with pytest.raises(ValueError, match="^blocks: "):
        MViT(MViTConfig(blocks=()))
    with pytest.raises(ValueError, match="^drop_path_rate "):
        MViT(tiny_config(drop_path_rate=1.5))
    with pytest.raises(ValueError, match="^num_classes "):
        MViT(tiny_config(num_classes=0))


def test_unknown_preset_and_override() -> None:
    with pytest.raises(ValueError, match="unknown MViT preset 'mvit_xl'"):
        mvit.create_model("mvit_xl")
    with pytest.raises(ValueError, match=r"unknown override\(s\) \['depth'\]"):
        mvit.create_model("mvit_tiny", depth=3)


def test_block_config_defaults_mean_no_pooling() -> None:
    block = BlockConfig(dim_in=8, dim_out=8, num_heads=2)
    assert block.pool_q.is_identity and block.pool_k.is_identity and block.pool_v.is_identity
    model = MViT(MViTConfig(blocks=(block,), input_size=(2, 16, 16), num_classes=2))
    assert model.blocks[0].attn.pool_q is None and model.blocks[0].skip_pool is None
    assert model(torch.randn(1, 3, 2, 16, 16)).shape == (1, 2)
