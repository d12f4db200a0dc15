"""Per-block configuration that every MViT preset is built from, and its validation.

A model is a patch embedding followed by a list of :class:`BlockConfig`; there is no separate notion of "stage" in
the model itself. Stages are a way presets *write* the block list (see :func:`mvit.presets.multiscale_blocks`).
Validation runs when a model is built and whenever it meets a new input grid; every problem is a ``ValueError``
naming the block and the field.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from .pooling import POOL_MEMORY_FORMATS, POOL_MODES, Grid, PoolMemoryFormat, PoolMode, pooled_grid

Triple = tuple[int, int, int]


@dataclass(frozen=True)
class PoolConfig:
    """Θ = (kernel, stride, padding) of one pooling. ``padding=None`` means the paper's shape-preserving k // 2."""

    kernel: Triple = (1, 1, 1)
    stride: Triple = (1, 1, 1)
    padding: Triple | None = None

    @property
    def resolved_padding(self) -> Triple:
        return self.padding if self.padding is not None else tuple(k // 2 for k in self.kernel)

    @property
    def is_identity(self) -> bool:
        """Kernel and stride all ones: no pooling at all (torchvision and PySlowFast skip such a pool)."""
        return all(k == 1 for k in self.kernel) and all(s == 1 for s in self.stride)


@dataclass(frozen=True)
class BlockConfig:
    """One transformer block: attention with ``num_heads`` heads, then an MLP that ends at ``dim_out`` channels.

    ``pool_q`` pools queries (stride > 1 only in the first block of a stage); ``pool_k`` and ``pool_v`` pool keys and
    values and must share a stride. Where ``dim_out != dim_in`` the block widens the channels for the next stage:
    in MViT v1 the MLP does it (attention runs at ``dim_in``, in the last block of a stage); with ``dim_mul_in_att``
    (MViTv2) the q/k/v projection does it (attention runs at ``dim_out``, in the first block of a stage).

    The MViTv2 options (Li et al., CVPR 2022): ``rel_pos_spatial`` and ``rel_pos_temporal`` add decomposed relative
    positional embeddings (learnt tables over height, width and time distances) to the attention logits, and
    ``residual_pooling`` adds the pooled query to the attention output of every grid token.
    """

    dim_in: int
    dim_out: int
    num_heads: int
    pool_q: PoolConfig = field(default_factory=PoolConfig)
    pool_k: PoolConfig = field(default_factory=PoolConfig)
    pool_v: PoolConfig = field(default_factory=PoolConfig)
    pool_mode: PoolMode = "conv"
    dim_mul_in_att: bool = False
    rel_pos_spatial: bool = False
    rel_pos_temporal: bool = False
    residual_pooling: bool = False

    @property
    def attn_dim(self) -> int:
        """Channels of q, k, v and the attention output: ``dim_out`` with ``dim_mul_in_att``, else ``dim_in``."""
        return self.dim_out if self.dim_mul_in_att else self.dim_in

    @property
    def is_v2(self) -> bool:
        """Uses any MViTv2 feature."""
        return self.dim_mul_in_att or self.rel_pos_spatial or self.rel_pos_temporal or self.residual_pooling


@dataclass(frozen=True)
class MViTConfig:
    """A whole model. The embedding dimension is ``blocks[0].dim_in``; the head width is ``blocks[-1].dim_out``.

    ``class_token`` prepends a learnt token whose final state feeds the head; without it (PySlowFast's ImageNet
    MViTv2) the head takes the mean of the normalised tokens. ``abs_pos_embed`` adds the separable absolute
    positional embedding of MViT v1; MViTv2 models drop it for relative positions. ``norm_eps`` is the epsilon of
    the block and head LayerNorms, ``pool_norm_eps`` that of the LayerNorms after the q/k/v pooling convs: 1e-6 in
    torchvision, PySlowFast since MViTv2 and pytorchvideo's main branch, 1e-5 in pytorchvideo 0.1.5 and PySlowFast's
    earlier code; :func:`mvit.load_pretrained` sets it to the value of the checkpoint's source.

    The last two fields choose how the model runs, not what it computes: ``pool_memory_format`` is the layout of
    the pooled volumes (see :class:`~mvit.pooling.TokenPool`), and ``activation_checkpointing`` recomputes each
    block in the backward pass instead of keeping its activations, trading about a third more compute for memory.
    """

    blocks: tuple[BlockConfig, ...]
    input_size: Triple = (16, 224, 224)
    num_classes: int = 400
    in_channels: int = 3
    patch_kernel: Triple = (3, 7, 7)
    patch_stride: Triple = (2, 4, 4)
    patch_padding: Triple = (1, 3, 3)
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.0
    head_dropout: float = 0.5
    norm_eps: float = 1e-6
    class_token: bool = True
    abs_pos_embed: bool = True
    pool_norm_eps: float = 1e-6
    pool_memory_format: PoolMemoryFormat = "contiguous"
    activation_checkpointing: bool = False


def skip_pool_config(pool_q: PoolConfig) -> PoolConfig | None:
    """Pooling of the residual path of a query-pooled block: a max pool with kernel s + 1 (s where s = 1).

    This is the parameter-free P(X; Θ) that PySlowFast, pytorchvideo and torchvision put on the skip connection.
    """
    if all(s == 1 for s in pool_q.stride):
        return None
    kernel = tuple(s + 1 if s > 1 else s for s in pool_q.stride)
    return PoolConfig(kernel=kernel, stride=pool_q.stride, padding=tuple(k // 2 for k in kernel))


def _block_error(index: int, field_name: str, problem: str) -> ValueError:
    return ValueError(f"block {index} {field_name}: {problem}")


def _check_triple(value: object, index: int, field_name: str, minimum: int) -> None:
    if not (isinstance(value, tuple) and len(value) == 3 and all(isinstance(v, int) for v in value)):
        raise _block_error(index, field_name, f"expected a tuple of 3 ints (T, H, W), got {value!r}")
    if any(v < minimum for v in value):
        raise _block_error(index, field_name, f"every entry must be >= {minimum}, got {value}")


def _check_pool(pool: PoolConfig, mode: str, index: int, name: str) -> None:
    _check_triple(pool.kernel, index, f"{name}.kernel", 1)
    _check_triple(pool.stride, index, f"{name}.stride", 1)
    if pool.padding is not None:
        _check_triple(pool.padding, index, f"{name}.padding", 0)
    if mode in ("avg", "max") and any(p > k // 2 for p, k in zip(pool.resolved_padding, pool.kernel)):
        raise _block_error(
            index,
            f"{name}.padding",
            f"{mode} pooling needs padding <= kernel // 2, got {pool.resolved_padding} for kernel {pool.kernel}",
        )


def _check_block(block: BlockConfig, index: int, previous_dim: int | None) -> None:
    for name in ("dim_in", "dim_out", "num_heads"):
        value = getattr(block, name)
        if not isinstance(value, int) or value < 1:
            raise _block_error(index, name, f"must be a positive int, got {value!r}")
    if previous_dim is not None and block.dim_in != previous_dim:
        raise _block_error(index, "dim_in", f"{block.dim_in} != dim_out {previous_dim} of block {index - 1}")
    for name in ("dim_mul_in_att", "rel_pos_spatial", "rel_pos_temporal", "residual_pooling"):
        if not isinstance(getattr(block, name), bool):
            raise _block_error(index, name, f"must be True or False, got {getattr(block, name)!r}")
    width = "dim_out" if block.dim_mul_in_att else "dim_in"
    if block.attn_dim % block.num_heads:
        where = " (the attention width with dim_mul_in_att)" if block.dim_mul_in_att else ""
        raise _block_error(
            index, "num_heads", f"{width} {block.attn_dim}{where} is not divisible by num_heads {block.num_heads}"
        )
    if block.pool_mode not in POOL_MODES:
        raise _block_error(index, "pool_mode", f"must be one of {POOL_MODES}, got {block.pool_mode!r}")
    for name in ("pool_q", "pool_k", "pool_v"):
        _check_pool(getattr(block, name), block.pool_mode, index, name)
    if block.pool_k.stride != block.pool_v.stride:
        raise _block_error(
            index,
            "pool_v.stride",
            f"{block.pool_v.stride} != pool_k.stride {block.pool_k.stride}; keys and values "
            "must be pooled with the same stride (s_K = s_V)",
        )


def _pool_grid(pool: PoolConfig, mode: str, grid: Grid, index: int, name: str, where: str) -> Grid:
    if pool.is_identity:
        return grid
    if mode == "avg" and any(size < k for size, k in zip(grid, pool.kernel)):
        raise _block_error(
            index,
            f"{name}.kernel",
            f"avg pooling needs a grid at least as large as the kernel {pool.kernel}, got {grid}{where}",
        )
    out = pooled_grid(grid, pool.kernel, pool.stride, pool.resolved_padding)
    if any(size < 1 for size in out):
        raise _block_error(
            index,
            f"{name}.kernel",
            f"kernel {pool.kernel} with padding {pool.resolved_padding} and stride "
            f"{pool.stride} empties the grid {grid} -> {out}{where}",
        )
    return out


def block_grids(blocks: Sequence[BlockConfig], token_grid: Grid, where: str = "") -> list[Grid]:
    """Token grid at the output of each block, checking that every pooling can take its input grid.

    ``where`` is appended to error messages to name the model input that led to ``token_grid``.
    """
    grids = []
    grid = token_grid
    for index, block in enumerate(blocks):
        q_grid = _pool_grid(block.pool_q, block.pool_mode, grid, index, "pool_q", where)
        k_grid = _pool_grid(block.pool_k, block.pool_mode, grid, index, "pool_k", where)
        v_grid = _pool_grid(block.pool_v, block.pool_mode, grid, index, "pool_v", where)
        if k_grid != v_grid:
            raise _block_error(
                index, "pool_v.kernel", f"values pool to {v_grid} but keys to {k_grid} on grid {grid}{where}"
            )
        skip = skip_pool_config(block.pool_q)
        skip_grid = grid if skip is None else pooled_grid(grid, skip.kernel, skip.stride, skip.resolved_padding)
        if skip_grid != q_grid:
            raise _block_error(
                index,
                "pool_q.kernel",
                f"queries pool to {q_grid} but the residual path (max pool, kernel s + 1) "
                f"to {skip_grid} on grid {grid}{where}; use an odd kernel with padding k // 2",
            )
        grid = q_grid
        grids.append(grid)
    return grids


def rel_pos_lengths(block: BlockConfig, grid: Grid) -> tuple[int, int]:
    """Lengths of a block's (spatial, temporal) relative-position tables when its input lies on ``grid``.

    The rule of PySlowFast and torchvision, so that their checkpoints have these shapes: with s = max(H, W), the
    spatial tables cover 2·max(s // q_stride, s // kv_stride) − 1 distances (strides along H), the temporal one
    2·T − 1. Other grids interpolate the tables to the distances they need (see :mod:`mvit.relative_position`).
    """
    size = max(grid[1:])
    spatial = 2 * max(size // block.pool_q.stride[1], size // block.pool_k.stride[1]) - 1
    return spatial, 2 * grid[0] - 1


def _check_rel_pos(blocks: Sequence[BlockConfig], grids: list[Grid], token_grid: Grid, where: str) -> None:
    for index, (block, grid) in enumerate(zip(blocks, [token_grid, *grids[:-1]])):
        spatial, _ = rel_pos_lengths(block, grid)
        if block.rel_pos_spatial and spatial < 1:
            raise _block_error(
                index,
                "rel_pos_spatial",
                f"the input grid {grid} is smaller than the query and key strides {block.pool_q.stride[1]}, "
                f"{block.pool_k.stride[1]}: the relative-position tables would be empty{where}",
            )


def patch_grid(config: MViTConfig, input_size: Sequence[int]) -> Grid:
    """Token grid after the patch embedding, or a ValueError naming ``input_size`` when it would be empty."""
    grid = pooled_grid(input_size, config.patch_kernel, config.patch_stride, config.patch_padding)
    if any(size < 1 for size in grid):
        raise ValueError(
            f"input_size {tuple(input_size)} is too small for the patch embedding (kernel {config.patch_kernel}, "
            f"stride {config.patch_stride}, padding {config.patch_padding}): token grid {grid}"
        )
    return grid


def validate_config(config: MViTConfig) -> list[Grid]:
    """Check the whole configuration for its ``input_size``; returns the token grid after each block."""
    if not config.blocks:
        raise ValueError("blocks: a model needs at least one block")
    if not (isinstance(config.input_size, tuple) and len(config.input_size) == 3) or min(config.input_size) < 1:
        raise ValueError(f"input_size must be a tuple of 3 positive ints (T, H, W), got {config.input_size!r}")
    if config.num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {config.num_classes}")
    for name in ("drop_path_rate", "head_dropout"):
        if not 0.0 <= getattr(config, name) < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {getattr(config, name)}")
    for name in ("norm_eps", "pool_norm_eps"):
        if not getattr(config, name) > 0.0:
            raise ValueError(f"{name} must be > 0, got {getattr(config, name)}")
    for name in ("class_token", "abs_pos_embed"):
        if not isinstance(getattr(config, name), bool):
            raise ValueError(f"{name} must be True or False, got {getattr(config, name)!r}")
    if config.pool_memory_format not in POOL_MEMORY_FORMATS:
        raise ValueError(
            f"pool_memory_format must be one of {tuple(POOL_MEMORY_FORMATS)}, got {config.pool_memory_format!r}"
        )
    previous_dim = None
    for index, block in enumerate(config.blocks):
        _check_block(block, index, previous_dim)
        previous_dim = block.dim_out
    token_grid = patch_grid(config, config.input_size)
    where = f" (input_size {config.input_size})"
    grids = block_grids(config.blocks, token_grid, where)
    _check_rel_pos(config.blocks, grids, token_grid, where)
    return grids
