"""The pooling operator P(·; Θ): output grids follow the paper's formula, and the class token goes around it."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mvit import TokenPool, pooled_grid
from mvit.pooling import POOL_MODES


@st.composite
def pooling_cases(draw: st.DrawFn) -> tuple[str, tuple[int, ...], tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """Random (mode, grid, kernel, stride, padding) that PyTorch accepts: output >= 1, padding <= kernel // 2, and
    for avg pooling a grid at least as large as the kernel (a limit of avg_pool3d, which config validation checks)."""
    mode = draw(st.sampled_from(POOL_MODES))
    kernel = tuple(draw(st.integers(1, 5)) for _ in range(3))
    padding = tuple(draw(st.integers(0, k // 2)) for k in kernel)
    stride = tuple(draw(st.integers(1, 4)) for _ in range(3))
    smallest = [k if mode == "avg" else max(1, k - 2 * p) for k, p in zip(kernel, padding)]
    grid = tuple(draw(st.integers(low, 9)) for low in smallest)
    return mode, grid, kernel, stride, padding


@settings(max_examples=60, deadline=None)
@given(case=pooling_cases(), heads=st.integers(1, 2))
def test_pooled_grid_matches_formula_and_modules(case: tuple, heads: int) -> None:
    mode, grid, kernel, stride, padding = case
    expected = tuple((size + 2 * p - k) // s + 1 for size, k, s, p in zip(grid, kernel, stride, padding))
    assert pooled_grid(grid, kernel, stride, padding) == expected

    channels = 4
    pool = TokenPool(mode, channels, kernel, stride, padding)
    tokens = torch.randn(2, heads, 1 + grid[0] * grid[1] * grid[2], channels)
    out, out_grid = pool(tokens, grid)
    assert out_grid == expected
    assert out.shape == (2, heads, 1 + expected[0] * expected[1] * expected[2], channels)


def test_class_token_goes_around_the_pooling() -> None:
    grid = (2, 4, 4)
    tokens = torch.randn(3, 1 + 32, 8)
    for mode in ("avg", "max"):
        out, _ = TokenPool(mode, 8, (1, 3, 3), (1, 2, 2), (0, 1, 1))(tokens, grid)
        torch.testing.assert_close(out[:, 0], tokens[:, 0], rtol=0, atol=0)
    conv = TokenPool("conv", 8, (3, 3, 3), (1, 2, 2), (1, 1, 1))
    out, _ = conv(tokens, grid)
    # conv mode normalises every token after pooling, the class token included (PySlowFast, torchvision)
    torch.testing.assert_close(out[:, 0], conv.norm(tokens[:, 0]))


def test_max_pool_acts_on_grid_positions_only() -> None:
    """Token t·HW + h·W + w is grid cell (t, h, w): a 1×2×2 max pool picks the max of each 2×2 spatial cell."""
    grid = (1, 2, 4)
    values = torch.arange(8.0).reshape(1, 8, 1)
    tokens = torch.cat((torch.full((1, 1, 1), -5.0), values), dim=1)
    out, out_grid = TokenPool("max", 1, (1, 2, 2), (1, 2, 2), (0, 0, 0))(tokens, grid)
    assert out_grid == (1, 1, 2)
    assert out.flatten().tolist() == [-5.0, 5.0, 7.0]
