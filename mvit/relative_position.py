"""Decomposed relative positional embeddings (MViTv2, Li et al., CVPR 2022, section 4.1) as an attention bias.

The logit of query i and key j gains q_i · (R_h[h(i), h(j)] + R_w[w(i), w(j)] + R_t[t(i), t(j)]), where each R is
a learnt table indexed by the distance along one axis. Decomposing space-time this way needs O(T + H + W) table
entries instead of O(T·H·W). The term is returned as an additive float mask for ``scaled_dot_product_attention``:
the bias is as large as the attention scores, but the scores and their softmax stay inside the kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .pooling import Grid


def resize_table(table: torch.Tensor, length: int) -> torch.Tensor:
    """Linear resize of a (L, C) table to (length, C), as PySlowFast and torchvision do for other token grids."""
    if table.shape[0] == length:
        return table
    resized = F.interpolate(table.transpose(0, 1).unsqueeze(0), size=length, mode="linear")
    return resized.squeeze(0).transpose(0, 1)


def _axis_table(table: torch.Tensor, q_size: int, k_size: int) -> torch.Tensor:
    """(q_size, k_size, C): the table entry of every (query, key) pair along one axis.

    A pooled axis has fewer, coarser positions: both are scaled to the finer axis, so that distances count steps of
    the finer grid, and shifted so that the index is never negative (2·max(q, k) − 1 distances in all).
    """
    q_ratio, k_ratio = max(k_size / q_size, 1.0), max(q_size / k_size, 1.0)
    q_pos = torch.arange(q_size, device=table.device)[:, None] * q_ratio
    k_pos = torch.arange(k_size, device=table.device)[None, :] * k_ratio
    distance = q_pos - k_pos + (k_size - 1) * k_ratio
    return resize_table(table, 2 * max(q_size, k_size) - 1)[distance.long()]


def rel_pos_bias(
    q: torch.Tensor,
    q_grid: Grid,
    k_grid: Grid,
    rel_pos_h: torch.Tensor | None,
    rel_pos_w: torch.Tensor | None,
    rel_pos_t: torch.Tensor | None,
    class_token: bool,
) -> torch.Tensor:
    """The relative-position bias (B, heads, Lq, Lk) of queries ``q`` (B, heads, Lq, head_dim) on ``q_grid`` and keys
    on ``k_grid``, in q's dtype. Rows and columns of the class token are zero. The spatial tables (``rel_pos_h``,
    ``rel_pos_w``) or the temporal one (``rel_pos_t``) may be None.
    """
    batch, heads, q_length, dim = q.shape
    offset = int(class_token)
    (qt, qh, qw), (kt, kh, kw) = q_grid, k_grid
    r_q = q[:, :, offset:].reshape(batch, heads, qt, qh, qw, dim)
    bias = q.new_zeros(batch, heads, q_length, offset + kt * kh * kw)
    grid_bias = bias[:, :, offset:, offset:].view(batch, heads, qt, qh, qw, kt, kh, kw)
    if rel_pos_h is not None and rel_pos_w is not None:
        by_height = torch.einsum("bnthwc,hkc->bnthwk", r_q, _axis_table(rel_pos_h, qh, kh))
        by_width = torch.einsum("bnthwc,wkc->bnthwk", r_q, _axis_table(rel_pos_w, qw, kw))
        grid_bias += by_height[:, :, :, :, :, None, :, None]
        grid_bias += by_width[:, :, :, :, :, None, None, :]
    if rel_pos_t is not None:
        by_time = torch.einsum("bnthwc,tkc->bnthwk", r_q, _axis_table(rel_pos_t, qt, kt))
        grid_bias += by_time[:, :, :, :, :, :, None, None]
    return bias
