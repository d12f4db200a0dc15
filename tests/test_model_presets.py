"""Presets: their shapes, parameter and multiply-add counts against the published figures, and other input sizes."""

from __future__ import annotations

import pytest
import torch

import mvit

# (preset, published params, published GMACs) -- torchvision's exact figures for mvit_b_16x4 and mvit_v2_s_16x4,
# the papers' otherwise (MViT: Tables 3c, 4, 17 and its Kinetics-600 table for MViT-B-24; MViTv2: K400, ImageNet)
PUBLISHED = [
    ("mvit_b_16x4", 36_610_672, 70.599),
    ("mvit_b_32x3", 36.6e6, 170.0),
    ("mvit_s_16x4", 26.1e6, 32.9),
    ("mvit_b_16_image", 37.0e6, 7.8),
    ("mvit_b_24_32x3", 52.9e6, 236.0),
    ("mvit_v2_s_16x4", 34_537_744, 64.224),
    ("mvit_v2_b_32x3", 51.2e6, 225.0),
    ("mvit_v2_s_image", 35.0e6, 7.0),
]
# MViT-S as described in the paper's Table 3c counts 29.95 GMACs, 9% under its published 32.9; no reading of the
# table reaches both 26.1M and 32.9G (see the preset's docstring), so that one figure is a known, recorded gap.
KNOWN_GMAC_GAPS = {"mvit_s_16x4": 29.947}


def meta_model(name: str, **overrides: object) -> mvit.MViT:
    with torch.device("meta"):
        return mvit.create_model(name, **overrides)


def test_list_models() -> None:
    assert mvit.list_models() == [
        "mvit_b_16x4",
        "mvit_b_32x3",
        "mvit_s_16x4",
        "mvit_b_16_image",
        "mvit_tiny",
        "mvit_b_24_32x3",
        "mvit_v2_s_16x4",
        "mvit_v2_b_32x3",
        "mvit_v2_s_image",
        "mvit_v2_tiny",
    ]


@pytest.mark.parametrize(("name", "params", "gmacs"), PUBLISHED)
def test_counts_match_published_figures(name: str, params: float, gmacs: float) -> None:
    model = meta_model(name)
    measured_gmacs = mvit.count_gmacs(model, (1, 3, *model.input_size))
    assert mvit.count_parameters(model) == pytest.approx(params, rel=0.01)
    if name in KNOWN_GMAC_GAPS:
        assert measured_gmacs == pytest.approx(KNOWN_GMAC_GAPS[name], rel=1e-3)
        assert measured_gmacs != pytest.approx(gmacs, rel=0.01), "the MViT-S gap closed: update docs and this test"
    else:
        assert measured_gmacs == pytest.approx(gmacs, rel=0.01)


def test_mvit_b_16x4_is_torchvision_mvit_v1_b_exactly() -> None:
    model = meta_model("mvit_b_16x4")
    assert mvit.count_parameters(model) == 36_610_672
    assert round(mvit.count_gmacs(model, (1, 3, 16, 224, 224)), 3) == 70.599


def test_mvit_v2_s_16x4_is_torchvision_mvit_v2_s_exactly() -> None:
    model = meta_model("mvit_v2_s_16x4")
    assert mvit.count_parameters(model) == 34_537_744
    assert round(mvit.count_gmacs(model, (1, 3, 16, 224, 224)), 3) == 64.224


def test_mvit_v2_s_16x4_block_layout() -> None:
    """torchvision's mvit_v2_s table: widening in the first block of a stage, queries pooled in every block."""
    blocks = mvit.preset_config("mvit_v2_s_16x4").blocks
    assert [b.num_heads for b in blocks] == [1, 2, 2, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 8, 8]
    assert [b.dim_in for b in blocks] == [96, 96, 192, 192] + [384] * 11 + [768]
    assert [b.dim_out for b in blocks] == [96, 192, 192] + [384] * 11 + [768, 768]
    assert {i for i, b in enumerate(blocks) if b.pool_q.stride == (1, 2, 2)} == {1, 3, 14}
    assert all(b.pool_q.kernel == (3, 3, 3) and not b.pool_q.is_identity for b in blocks)
    kv_strides = [(1, 8, 8), (1, 4, 4), (1, 4, 4)] + [(1, 2, 2)] * 11 + [(1, 1, 1)] * 2
    assert [b.pool_k.stride for b in blocks] == kv_strides
    assert all(b.dim_mul_in_att and b.rel_pos_spatial and b.rel_pos_temporal and b.residual_pooling for b in blocks)
    model = meta_model("mvit_v2_s_16x4")
    assert model.pos_embed.spatial is None and model.pos_embed.class_token is not None
    # tables of 2·max(56 // 1, 56 // 8) − 1 spatial and 2·8 − 1 temporal distances in block 0, head dim 96
    assert tuple(model.blocks[0].attn.rel_pos_h.shape) == (111, 96)
    assert tuple(model.blocks[0].attn.rel_pos_t.shape) == (15, 96)
    assert tuple(model.blocks[15].attn.rel_pos_w.shape) == (13, 96)


def test_mvit_b_24_32x3_is_what_pyslowfast_yaml_builds() -> None:
    """configs/Kinetics/MVIT_B_32x3_CONV.yaml: DEPTH 24 (its second DEPTH), stages [2, 3, 16, 3], kernels s + 1."""
    blocks = mvit.preset_config("mvit_b_24_32x3").blocks
    assert len(blocks) == 24
    assert {i for i, b in enumerate(blocks) if not b.pool_q.is_identity} == {2, 5, 21}
    assert {b.pool_q.kernel for b in blocks if not b.pool_q.is_identity} == {(1, 3, 3)}
    assert [b.pool_k.kernel for b in (blocks[0], blocks[2], blocks[5])] == [(1, 9, 9), (1, 5, 5), (1, 3, 3)]
    assert all(b.pool_k.is_identity for b in blocks[21:])
    assert [b.dim_out for b in blocks if b.dim_out != b.dim_in] == [192, 384, 768]


def test_mvit_b_16x4_block_layout() -> None:
    """Heads, widths and strides of the reference table (reference/mvit.md), block by block."""
    blocks = mvit.preset_config("mvit_b_16x4").blocks
    heads = [1, 2, 2, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 8, 8]
    dims_out = [192, 192, 384] + [384] * 10 + [768, 768, 768]
    q_pooled = {1, 3, 14}
    kv_strides = [(1, 8, 8), (1, 4, 4), (1, 4, 4)] + [(1, 2, 2)] * 11 + [(1, 1, 1)] * 2
    assert [b.num_heads for b in blocks] == heads
    assert [b.dim_out for b in blocks] == dims_out
    assert [b.dim_in // b.num_heads for b in blocks] == [96] * 16
    assert {i for i, b in enumerate(blocks) if b.pool_q.stride == (1, 2, 2)} == q_pooled
    assert [b.pool_k.stride for b in blocks] == kv_strides == [b.pool_v.stride for b in blocks]
    assert all(b.pool_k.kernel == (3, 3, 3) and b.pool_mode == "conv" for b in blocks)
    assert mvit.validate_config(mvit.preset_config("mvit_b_16x4"))[-1] == (8, 7, 7)


@pytest.mark.parametrize("input_size", [(8, 224, 224), (32, 224, 224), (16, 160, 160), (16, 312, 312)])
def test_other_input_sizes(input_size: tuple[int, int, int]) -> None:
    built = meta_model("mvit_b_16x4", input_size=input_size)
    assert built.input_size == input_size
    assert built(torch.empty(1, 3, *input_size, device="meta")).shape == (1, 400)
    # the 16×224² model on another clip: positional embeddings are interpolated on the fly
    assert meta_model("mvit_b_16x4")(torch.empty(2, 3, *input_size, device="meta")).shape == (2, 400)


@pytest.mark.parametrize("name", ["mvit_b_16_image", "mvit_v2_s_image"])
def test_image_model_takes_images(name: str) -> None:
    model = meta_model(name)
    assert model.input_size == (1, 224, 224)
    assert model(torch.empty(2, 3, 224, 224, device="meta")).shape == (2, 1000)


def test_training_overrides_and_no_weight_decay() -> None:
    model = mvit.create_model("mvit_tiny", num_classes=7, drop_path_rate=0.3, head_dropout=0.2)
    assert model.num_classes == 7 and model.input_size == (8, 64, 64)
    assert [block.drop_path.drop_prob for block in model.blocks] == pytest.approx([0.0, 0.1, 0.2, 0.3])
    assert model.head_dropout.p == 0.2
    no_decay = model.no_weight_decay()
    names = dict(model.named_parameters())
    assert {"pos_embed.class_token", "pos_embed.class_pos", "pos_embed.spatial", "pos_embed.temporal"} <= no_decay
    assert {"head.bias", "norm.weight", "blocks.0.attn.qkv.bias", "blocks.1.attn.pool_q.norm.weight"} <= no_decay
    assert all(names[n].ndim >= 2 for n in set(names) - no_decay)
    assert {"head.weight", "blocks.0.attn.qkv.weight", "patch_embed.weight"}.isdisjoint(no_decay)
