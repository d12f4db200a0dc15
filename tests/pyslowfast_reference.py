"""PySlowFast's MViT, written down from its source for tests, because PySlowFast does not install from PyPI.

Its modules carry PySlowFast's own names, so ``state_dict()`` is the layout PySlowFast checkpoints have, and its
forward computes as PySlowFast does. Read from facebookresearch/SlowFast:

- HEAD, commit adc55ca38a62a8bf3899a2d7c2dfbc9f9eee1ade, ``slowfast/models/attention.py``: ``attention_pool``,
  ``get_rel_pos``, ``cal_rel_pos_spatial``, ``cal_rel_pos_temporal``, ``MultiScaleAttention`` (fused ``qkv`` unless
  SEPARATE_QKV, pooling convs ``pool_{q,k,v}`` with ``norm_{q,k,v}`` built by the block's ``norm_layer``, i.e. eps
  1e-6, residual pooling that skips the class token), ``MultiScaleBlock`` (``proj`` on LN(x) before the attention
  residual with DIM_MUL_IN_ATT, on LN(x₁) otherwise; max-pool skip only where the query stride is > 1);
- HEAD, commit ad73dcfa43b56dfeec96c551128ec615a1080997, ``slowfast/models/video_model_builder.py`` class ``MViT``:
  ``patch_embed.proj``, ``cls_token``, ``pos_embed_{spatial,temporal,class}`` (SEP_POS_EMBED) or one ``pos_embed``,
  none without USE_ABS_POS, block widths by ``round_width``, relative-position tables sized from each block's input
  grid, ``norm``, ``head.projection``; the features are norm(x)[:, 0] with a class token, mean(norm(x)) without;
- the v1-era code, commit 00eb2b4c2fbcd45f771ff755c81dbdbed52a315b (the last read before the MViTv2 commit
  1aebd71a2efad823d52b827a3deaf15a56cf4932): ``MultiScaleBlock`` builds the attention with ``norm_layer=nn.LayerNorm``,
  so the pooling norms have eps 1e-5 (``pool_norm_eps`` below); the model zoo's fused ``qkv`` layout is that of
  commit e04fba5b (SlowFast issue #475).

Configs (``configs/Kinetics/MVIT_B_16x4_CONV.yaml``, ``MVIT_B_32x3_CONV.yaml``, ``MVITv2_S_16x4.yaml``,
``MVITv2_B_32x3.yaml``, ``configs/ImageNet/MVIT_B_16_CONV.yaml``, ``MVITv2_S.yaml``) are the ``SPECS`` below; unset
keys take ``slowfast/config/defaults.py``'s values (POOL_KVQ_KERNEL None: kernel s + 1; SEP_POS_EMBED False;
USE_ABS_POS True; CLS_EMBED_ON True). The ImageNet MViTv2-S list of K/V strides is the adaptive rule from 1×4×4.
PySlowFast's head applies softmax outside training; the logits compared are before it. PySlowFast asserts that an
input has the size the model was built for; here models without absolute embeddings (MViTv2) take other sizes too,
so that its interpolation of the relative-position tables (``get_rel_pos``) can be compared.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

_V1 = dict(DIM_MUL=[[1, 2.0], [3, 2.0], [14, 2.0]], POOL_Q_STRIDE=[[1, 1, 2, 2], [3, 1, 2, 2], [14, 1, 2, 2]])
_V1_24 = dict(
    DEPTH=24, DIM_MUL=[[2, 2.0], [5, 2.0], [21, 2.0]], POOL_Q_STRIDE=[[2, 1, 2, 2], [5, 1, 2, 2], [21, 1, 2, 2]]
)
_V2 = dict(
    USE_ABS_POS=False, REL_POS_SPATIAL=True, DIM_MUL_IN_ATT=True, RESIDUAL_POOLING=True, POOL_KVQ_KERNEL=[3, 3, 3]
)

SPECS: dict[str, dict] = {
    "MVIT_B_16x4_CONV": dict(**_V1, SEP_POS_EMBED=True, POOL_KVQ_KERNEL=[3, 3, 3], POOL_KV_STRIDE_ADAPTIVE=[1, 8, 8]),
    "MVIT_B_32x3_CONV": dict(**_V1_24, SEP_POS_EMBED=True, POOL_KV_STRIDE_ADAPTIVE=[1, 8, 8]),
    "MVIT_B_16_CONV (ImageNet)": dict(
        **_V1,
        PATCH_2D=True,
        PATCH_KERNEL=[7, 7],
        PATCH_STRIDE=[4, 4],
        PATCH_PADDING=[3, 3],
        POOL_KVQ_KERNEL=[1, 3, 3],
        POOL_KV_STRIDE_ADAPTIVE=[1, 4, 4],
    ),
    "MVITv2_S_16x4": dict(
        _V2, **_V1, REL_POS_TEMPORAL=True, POOL_KV_STRIDE_ADAPTIVE=[1, 8, 8], Q_POOL_EVERY_BLOCK=True
    ),
    "MVITv2_B_32x3": dict(
        _V2, **_V1_24, REL_POS_TEMPORAL=True, POOL_KV_STRIDE_ADAPTIVE=[1, 8, 8], Q_POOL_EVERY_BLOCK=True
    ),
    "MVITv2_S (ImageNet)": dict(
        {**_V2, "POOL_KVQ_KERNEL": [1, 3, 3]},
        **_V1,
        PATCH_2D=True,
        PATCH_KERNEL=[7, 7],
        PATCH_STRIDE=[4, 4],
        PATCH_PADDING=[3, 3],
        CLS_EMBED_ON=False,
        POOL_KV_STRIDE_ADAPTIVE=[1, 4, 4],
        Q_POOL_EVERY_BLOCK=True,
    ),
}


def _round_width(width: float, multiplier: float, divisor: int = 1) -> int:
    """slowfast/models/utils.py round_width (min_width 1)."""
    width *= multiplier
    out = max(divisor, int(width + divisor / 2) // divisor * divisor)
    if out < 0.9 * width:
        out += divisor
    return int(out)


def _attention_pool(tensor, pool, thw, has_cls, norm):
    if pool is None:
        return tensor, thw
    squeeze = tensor.ndim == 3  # the skip path pools (B, L, C) tokens
    if squeeze:
        tensor = tensor.unsqueeze(1)
    if has_cls:
        cls_tok, tensor = tensor[:, :, :1], tensor[:, :, 1:]
    b, n, _, c = tensor.shape
    tensor = tensor.reshape(b * n, *thw, c).permute(0, 4, 1, 2, 3).contiguous()
    tensor = pool(tensor)
    thw = list(tensor.shape[2:])
    tensor = tensor.reshape(b, n, c, -1).transpose(2, 3)
    if has_cls:
        tensor = torch.cat((cls_tok, tensor), dim=2)
    if norm is not None:
        tensor = norm(tensor)
    return (tensor.squeeze(1) if squeeze else tensor), thw


def _rel_table(table: torch.Tensor, length: int) -> torch.Tensor:
    if table.shape[0] == length:
        return table
    return F.interpolate(table.reshape(1, table.shape[0], -1).permute(0, 2, 1), size=length, mode="linear")[0].T


def _axis_distance(q_size: int, k_size: int) -> torch.Tensor:
    q_ratio, k_ratio = max(k_size / q_size, 1.0), max(q_size / k_size, 1.0)
    dist = torch.arange(q_size)[:, None] * q_ratio - torch.arange(k_size)[None, :] * k_ratio
    dist += (k_size - 1) * k_ratio
    return dist.long()


def _rel_pos_logits(q, q_thw, k_thw, tables, has_cls):
    """Σ over axes of q_i · R_axis[distance(i, j)], built pair by pair (the full (Lq, Lk, C) table is gathered)."""
    coords_q = torch.stack(torch.meshgrid(*[torch.arange(s) for s in q_thw], indexing="ij"), -1).reshape(-1, 3)
    coords_k = torch.stack(torch.meshgrid(*[torch.arange(s) for s in k_thw], indexing="ij"), -1).reshape(-1, 3)
    pair_table = 0
    for axis, table in tables.items():
        length = 2 * max(q_thw[axis], k_thw[axis]) - 1
        dist = _axis_distance(q_thw[axis], k_thw[axis])
        pair_table = pair_table + _rel_table(table, length)[dist[coords_q[:, axis]][:, coords_k[:, axis]]]
    start = 1 if has_cls else 0
    return torch.einsum("bnic,ijc->bnij", q[:, :, start:], pair_table)


class MultiScaleAttention(nn.Module):
    def __init__(self, dim, dim_out, input_size, heads, kernel_q, kernel_kv, stride_q, stride_kv, spec, eps):
        super().__init__()
        self.heads, self.dim_out, self.has_cls = heads, dim_out, spec.get("CLS_EMBED_ON", True)
        head_dim = dim_out // heads
        self.scale = head_dim**-0.5
        self.separate_qkv = spec.get("SEPARATE_QKV", False)
        if self.separate_qkv:
            self.q, self.k, self.v = (nn.Linear(dim, dim_out) for _ in range(3))
        else:
            self.qkv = nn.Linear(dim, dim_out * 3)
        self.proj = nn.Linear(dim_out, dim_out)
        if math.prod(kernel_q) == 1 and math.prod(stride_q) == 1:
            kernel_q = ()
        if math.prod(kernel_kv) == 1 and math.prod(stride_kv) == 1:
            kernel_kv = ()

        def conv(kernel, stride):
            padding = [k // 2 for k in kernel]
            return nn.Conv3d(head_dim, head_dim, kernel, stride, padding, groups=head_dim, bias=False)

        self.pool_q = conv(kernel_q, stride_q) if kernel_q else None
        self.norm_q = nn.LayerNorm(head_dim, eps=eps) if kernel_q else None
        self.pool_k = conv(kernel_kv, stride_kv) if kernel_kv else None
        self.norm_k = nn.LayerNorm(head_dim, eps=eps) if kernel_kv else None
        self.pool_v = conv(kernel_kv, stride_kv) if kernel_kv else None
        self.norm_v = nn.LayerNorm(head_dim, eps=eps) if kernel_kv else None
        self.rel_pos_spatial = spec.get("REL_POS_SPATIAL", False)
        self.rel_pos_temporal = spec.get("REL_POS_TEMPORAL", False)
        if self.rel_pos_spatial:
            size = input_size[1]
            q_size = size // stride_q[1] if len(stride_q) > 0 else size
            kv_size = size // stride_kv[1] if len(stride_kv) > 0 else size
            self.rel_pos_h = nn.Parameter(torch.zeros(2 * max(q_size, kv_size) - 1, head_dim))
            self.rel_pos_w = nn.Parameter(torch.zeros(2 * max(q_size, kv_size) - 1, head_dim))
        if self.rel_pos_temporal:
            self.rel_pos_t = nn.Parameter(torch.zeros(2 * input_size[0] - 1, head_dim))
        self.residual_pooling = spec.get("RESIDUAL_POOLING", False)

    def forward(self, x, thw):
        b, n, _ = x.shape
        if self.separate_qkv:
            q, k, v = (layer(x).reshape(b, n, self.heads, -1).permute(0, 2, 1, 3) for layer in (self.q, self.k, self.v))
        else:
            q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        q, q_thw = _attention_pool(q, self.pool_q, thw, self.has_cls, self.norm_q)
        k, k_thw = _attention_pool(k, self.pool_k, thw, self.has_cls, self.norm_k)
        v, _ = _attention_pool(v, self.pool_v, thw, self.has_cls, self.norm_v)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        tables = {}
        if self.rel_pos_spatial:
            tables.update({1: self.rel_pos_h, 2: self.rel_pos_w})
        if self.rel_pos_temporal:
            tables[0] = self.rel_pos_t
        if tables:
            start = 1 if self.has_cls else 0
            attn[:, :, start:, start:] += _rel_pos_logits(q, q_thw, k_thw, tables, self.has_cls)
        x = attn.softmax(dim=-1) @ v
        if self.residual_pooling:
            if self.has_cls:
                x[:, :, 1:] += q[:, :, 1:]
            else:
                x = x + q
        return self.proj(x.transpose(1, 2).reshape(b, -1, self.dim_out)), q_thw


class Mlp(nn.Module):
    def __init__(self, dim_in, hidden, dim_out):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim_in, hidden), nn.GELU(), nn.Linear(hidden, dim_out)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class MultiScaleBlock(nn.Module):
    def __init__(self, dim, dim_out, heads, input_size, kernel_q, kernel_kv, stride_q, stride_kv, spec, eps):
        super().__init__()
        self.dim, self.dim_out = dim, dim_out
        self.dim_mul_in_att = spec.get("DIM_MUL_IN_ATT", False)
        self.has_cls = spec.get("CLS_EMBED_ON", True)
        att_dim = dim_out if self.dim_mul_in_att else dim
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = MultiScaleAttention(
            dim, att_dim, input_size, heads, kernel_q, kernel_kv, stride_q, stride_kv, spec, eps
        )
        self.norm2 = nn.LayerNorm(att_dim, eps=1e-6)
        self.mlp = Mlp(att_dim, 4 * att_dim, dim_out)
        if dim != dim_out:
            self.proj = nn.Linear(dim, dim_out)
        kernel_skip = [s + 1 if s > 1 else s for s in stride_q]
        self.pool_skip = (
            nn.MaxPool3d(kernel_skip, stride_q, [k // 2 for k in kernel_skip])
            if len(stride_q) > 0 and math.prod(stride_q) > 1
            else None
        )

    def forward(self, x, thw):
        x_norm = self.norm1(x)
        x_block, thw_new = self.attn(x_norm, thw)
        if self.dim_mul_in_att and self.dim != self.dim_out:
            x = self.proj(x_norm)
        x_res, _ = _attention_pool(x, self.pool_skip, thw, self.has_cls, None)
        x = x_res + x_block
        x_norm = self.norm2(x)
        x_mlp = self.mlp(x_norm)
        if not self.dim_mul_in_att and self.dim != self.dim_out:
            x = self.proj(x_norm)
        return x + x_mlp, thw_new


class PatchEmbed(nn.Module):
    def __init__(self, kernel, stride, padding, dim, conv_2d):
        super().__init__()
        self.proj = (nn.Conv2d if conv_2d else nn.Conv3d)(3, dim, kernel, stride, padding)

    def forward(self, x):
        x = self.proj(x)
        return x.flatten(2).transpose(1, 2), [1, *x.shape[2:]] if x.ndim == 4 else list(x.shape[2:])


class PySlowFastMViT(nn.Module):
    """PySlowFast's ``MViT`` for one of ``SPECS`` on ``frames``×``size``² inputs, with ``pool_norm_eps`` 1e-6 (HEAD)
    or 1e-5 (v1-era code)."""

    def __init__(self, spec: dict, frames: int, size: int, num_classes: int, pool_norm_eps: float) -> None:
        super().__init__()
        self.spec = spec
        conv_2d = spec.get("PATCH_2D", False)
        stride = [1, *spec["PATCH_STRIDE"]] if conv_2d else spec.get("PATCH_STRIDE", [2, 4, 4])
        self.patch_embed = PatchEmbed(
            spec.get("PATCH_KERNEL", [3, 7, 7]),
            stride[-2:] if conv_2d else stride,
            spec.get("PATCH_PADDING", [1, 3, 3]),
            96,
            conv_2d,
        )
        self.patch_dims = [frames // stride[0], size // stride[1], size // stride[2]]
        self.has_cls = spec.get("CLS_EMBED_ON", True)
        num_patches = math.prod(self.patch_dims)
        embed_dim, depth = 96, spec.get("DEPTH", 16)
        if self.has_cls:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.use_abs_pos, self.sep_pos_embed = spec.get("USE_ABS_POS", True), spec.get("SEP_POS_EMBED", False)
        if self.use_abs_pos and self.sep_pos_embed:
            self.pos_embed_spatial = nn.Parameter(torch.zeros(1, self.patch_dims[1] * self.patch_dims[2], embed_dim))
            self.pos_embed_temporal = nn.Parameter(torch.zeros(1, self.patch_dims[0], embed_dim))
            if self.has_cls:
                self.pos_embed_class = nn.Parameter(torch.zeros(1, 1, embed_dim))
        elif self.use_abs_pos:
            self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + int(self.has_cls), embed_dim))
        dim_mul, head_mul = [1.0] * (depth + 1), [1.0] * (depth + 1)
        for index, multiplier in spec["DIM_MUL"]:
            dim_mul[index] = head_mul[index] = multiplier
        stride_q = [[] for _ in range(depth)]
        for index, *strides in spec["POOL_Q_STRIDE"]:
            stride_q[index] = strides
        if spec.get("Q_POOL_EVERY_BLOCK"):  # the v2 configs list every block in POOL_Q_STRIDE
            stride_q = [s or [1, 1, 1] for s in stride_q]
        kernel = spec.get("POOL_KVQ_KERNEL")
        pool_q = [(kernel or [x + 1 if x > 1 else x for x in s]) if s else [] for s in stride_q]
        stride_kv, current = [], spec["POOL_KV_STRIDE_ADAPTIVE"]
        for i in range(depth):
            if stride_q[i]:
                current = [max(c // q, 1) for c, q in zip(current, stride_q[i])]
            stride_kv.append(current)
        pool_kv = [kernel or [x + 1 if x > 1 else x for x in s] for s in stride_kv]
        num_heads, input_size = 1, list(self.patch_dims)
        self.blocks = nn.ModuleList()
        for i in range(depth):
            num_heads = _round_width(num_heads, head_mul[i])
            if spec.get("DIM_MUL_IN_ATT"):
                dim_out = _round_width(embed_dim, dim_mul[i], divisor=_round_width(num_heads, head_mul[i]))
            else:
                dim_out = _round_width(embed_dim, dim_mul[i + 1], divisor=_round_width(num_heads, head_mul[i + 1]))
            self.blocks.append(
                MultiScaleBlock(
                    embed_dim,
                    dim_out,
                    num_heads,
                    input_size,
                    pool_q[i],
                    pool_kv[i],
                    stride_q[i],
                    stride_kv[i],
                    spec,
                    pool_norm_eps,
                )
            )
            if stride_q[i]:
                input_size = [s // q for s, q in zip(input_size, stride_q[i])]
            embed_dim = dim_out
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Module()
        self.head.projection = nn.Linear(embed_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.spec.get("PATCH_2D") and x.ndim == 5:
            x = x[:, :, 0]
        x, thw = self.patch_embed(x)
        if self.use_abs_pos:  # PySlowFast asserts the size it was built for; v2 models here may take others
            assert thw == self.patch_dims, (thw, self.patch_dims)
        if self.has_cls:
            x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        if self.use_abs_pos and self.sep_pos_embed:
            hw = self.patch_dims[1] * self.patch_dims[2]
            pos = self.pos_embed_spatial.repeat(1, self.patch_dims[0], 1)
            pos = pos + torch.repeat_interleave(self.pos_embed_temporal, hw, dim=1)
            if self.has_cls:
                pos = torch.cat([self.pos_embed_class, pos], 1)
            x = x + pos
        elif self.use_abs_pos:
            x = x + self.pos_embed
        for block in self.blocks:
            x, thw = block(x, thw)
        x = self.norm(x)
        return self.head.projection(x[:, 0] if self.has_cls else x.mean(1))
