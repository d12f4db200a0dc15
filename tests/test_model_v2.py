"""MViTv2 blocks: relative positions at any input size, the attention calls they make, and their validation."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from peers import materialize, randomize_, relative_error
from pyslowfast_reference import SPECS, PySlowFastMViT
from torch.utils._python_dispatch import TorchDispatchMode

import mvit
from mvit import MViT, PoolConfig


def pyslowfast_pair(spec: str, preset: str, size: tuple[int, int, int]) -> tuple[torch.nn.Module, MViT]:
    """PySlowFast's model and this package's loaded from it, both built for ``size``."""
    classes = 1000 if size[0] == 1 else 400
    reference = randomize_(materialize(lambda: PySlowFastMViT(SPECS[spec], size[0], size[1], classes, 1e-6)))
    model = mvit.create_model(preset, input_size=size)
    return reference, mvit.load_weights(model, {"model_state": reference.state_dict()}, "pyslowfast").eval()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("spec", "preset", "built", "other"),
    [
        ("MVITv2_S_16x4", "mvit_v2_s_16x4", (8, 64, 64), (4, 96, 80)),
        ("MVITv2_S_16x4", "mvit_v2_s_16x4", (8, 64, 64), (12, 48, 48)),
        ("MVITv2_S (ImageNet)", "mvit_v2_s_image", (1, 64, 64), (1, 96, 96)),
    ],
)
def test_other_input_sizes_interpolate_the_tables_as_pyslowfast(spec, preset, built, other) -> None:
    """Grids other than the built one need other distances: both resize the tables linearly (get_rel_pos) and
    scale pooled axes alike, so the logits agree on clips of any size, non-square and odd ones included."""
    reference, model = pyslowfast_pair(spec, preset, built)
    clip = torch.randn(2, 3, *other)
    if other[0] == 1:
        clip = clip[:, :, 0]
    with torch.no_grad():
        assert relative_error(reference(clip), model(clip)) < 1e-4


@pytest.mark.slow
def test_a_model_built_for_another_size_loads_the_tables_resized() -> None:
    reference, _ = pyslowfast_pair("MVITv2_S_16x4", "mvit_v2_s_16x4", (8, 64, 64))
    model = mvit.create_model("mvit_v2_s_16x4", input_size=(8, 96, 96))
    mvit.load_weights(model, {"model_state": reference.state_dict()}, "pyslowfast").eval()
    assert model.blocks[0].attn.rel_pos_h.shape == (47, 96)  # 2·24 − 1; the checkpoint has 2·16 − 1
    clip = torch.randn(1, 3, 8, 96, 96)
    with torch.no_grad():
        assert relative_error(reference(clip), model(clip)) < 1e-4


class AtenLog(TorchDispatchMode):
    """Every aten op that runs, with the dtypes of its tensor arguments, keyword arguments (the mask) included."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, list[torch.dtype]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        tensors = [a for a in (*args, *(kwargs or {}).values()) if isinstance(a, torch.Tensor)]
        self.calls.append((str(func), [t.dtype for t in tensors]))
        return func(*args, **(kwargs or {}))


def test_bf16_inference_runs_fused_with_a_bf16_mask_and_v1_has_no_mask() -> None:
    """Under bf16 autocast each MViTv2 attention is one SDPA call with bf16 q, k, v and a bf16 float mask, on the CPU
    flash kernel (no softmax op runs); MViT v1 blocks pass no mask."""
    for name, with_mask in (("mvit_v2_tiny", True), ("mvit_tiny", False)):
        model = mvit.create_model(name, num_classes=5).eval()
        with AtenLog() as log, torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            model(torch.randn(1, 3, 8, 64, 64))
        attention = [dtypes for op, dtypes in log.calls if "scaled_dot_product" in op]
        assert len(attention) == len(model.blocks)
        expected = [torch.bfloat16] * (4 if with_mask else 3)
        assert all(dtypes == expected for dtypes in attention), attention
        assert not [op for op, _ in log.calls if "softmax" in op or "_math" in op]


@pytest.mark.slow
def test_training_gives_gradients_to_every_table_and_checkpointing_keeps_them() -> None:
    torch.manual_seed(0)
    settings = {"num_classes": 5, "drop_path_rate": 0.0, "head_dropout": 0.0}
    plain = mvit.create_model("mvit_v2_tiny", **settings)
    checkpointed = mvit.create_model("mvit_v2_tiny", **settings, activation_checkpointing=True)
    checkpointed.load_state_dict(plain.state_dict())
    clip, labels = torch.randn(2, 3, 8, 64, 64), torch.tensor([1, 3])
    gradients = []
    for model in (plain, checkpointed):
        F.cross_entropy(model.train()(clip), labels).backward()
        gradients.append({name: p.grad for name, p in model.named_parameters()})
    # every parameter is in the graph, as DDP (which Ray Train's prepare_model wraps it in) requires
    assert all(gradient is not None for gradient in gradients[0].values())
    tables = [name for name in gradients[0] if ".rel_pos_" in name]
    assert len(tables) == 3 * len(plain.blocks)
    # only the class token leaves the last block, and its row has no relative-position term
    last = f"blocks.{len(plain.blocks) - 1}."
    assert all(gradients[0][name].abs().sum() > 0 for name in tables if not name.startswith(last))
    for name, expected in gradients[0].items():
        torch.testing.assert_close(gradients[1][name], expected, msg=name)


def test_residual_pooling_skips_the_class_token() -> None:
    """PySlowFast and torchvision add the pooled query to grid tokens only: the class token's output row is
    attention alone."""
    model = mvit.create_model("mvit_v2_tiny").eval()
    attn = model.blocks[1].attn
    seen = {}
    attn.register_forward_hook(lambda module, inputs, output: seen.update(inputs=inputs))
    with torch.no_grad():
        model(torch.randn(1, 3, 8, 64, 64))
        x, grid = seen["inputs"]
        out, _ = attn(x, grid)
        attn.residual_pooling = False
        plain, _ = attn(x, grid)
    assert torch.equal(out[:, 0], plain[:, 0]) and not torch.allclose(out[:, 1:], plain[:, 1:])


def v2_tiny(index: int, **changes: object) -> mvit.MViTConfig:
    config = mvit.preset_config("mvit_v2_tiny")
    blocks = list(config.blocks)
    blocks[index] = dataclasses.replace(blocks[index], **changes)
    return dataclasses.replace(config, blocks=tuple(blocks))


def test_impossible_v2_configs_name_block_and_field() -> None:
    with pytest.raises(ValueError, match=r"^block 1 num_heads: dim_out 64 \(the attention width with dim_mul_in_att\) "
                       r"is not divisible by num_heads 3$"):  # fmt: skip
        MViT(v2_tiny(1, num_heads=3))
    with pytest.raises(ValueError, match=r"^block 2 residual_pooling: must be True or False, got 'yes'$"):
        MViT(v2_tiny(2, residual_pooling="yes"))
    # a 1×2×2 input grid under a 1×4×4 K/V stride leaves the relative-position tables no distance to hold
    wide = PoolConfig((3, 3, 3), (1, 4, 4))
    with pytest.raises(ValueError, match=r"^block 0 rel_pos_spatial: the input grid \(1, 1, 1\) is smaller than"):
        MViT(dataclasses.replace(v2_tiny(0, pool_q=wide, pool_k=wide, pool_v=wide), input_size=(2, 4, 4)))
    with pytest.raises(ValueError, match=r"^pool_norm_eps must be > 0, got 0.0$"):
        MViT(dataclasses.replace(mvit.preset_config("mvit_v2_tiny"), pool_norm_eps=0.0))
    with pytest.raises(ValueError, match=r"^class_token must be True or False"):
        MViT(dataclasses.replace(mvit.preset_config("mvit_v2_tiny"), class_token=1))


def test_set_pool_norm_eps_reaches_every_pooling_norm() -> None:
    model = mvit.create_model("mvit_v2_tiny")
    model.set_pool_norm_eps(1e-5)
    norms = [p.norm for b in model.blocks for p in (b.attn.pool_q, b.attn.pool_k, b.attn.pool_v) if p is not None]
    assert len(norms) == 12 and {norm.eps for norm in norms} == {1e-5}
    assert model.config.pool_norm_eps == 1e-5 and {b.norm1.eps for b in model.blocks} == {1e-6}


def test_sdpa_report_covers_the_mask() -> None:
    """CPU: flash takes the bf16 mask in inference; in training it cannot give the mask's gradient, so math runs."""
    model = mvit.create_model("mvit_v2_tiny")
    for backward, chosen in ((False, "FLASH_ATTENTION"), (True, "MATH")):
        report = mvit.sdpa_backends(model, (2, 3, 8, 64, 64), torch.bfloat16, "cpu", backward=backward)
        assert all(block.shape.mask and block.chosen == chosen for block in report)
    assert report[0].reasons["FLASH_ATTENTION"] == "no cpu kernel gives the gradient of a float mask"
