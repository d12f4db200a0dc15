"""Weight import: every peer layout, made by the peer's own code (or written down from it, see tests/peers.py), loads
as saved and gives the peer's logits; every file that cannot load says in one line what it looks like.

Upstream code read for these tests: torchvision 0.28 and pytorchvideo 0.1.5 as installed; pytorchvideo's main branch
at commit d1449fb82ed2fe9458c82d9eb0577f72539f709b and later (pytorchvideo/layers/attention.py,
pytorchvideo/models/vision_transformers.py); PySlowFast at the commits named in tests/pyslowfast_reference.py.
PySlowFast and pytorchvideo's main branch do not install, so their rows test layouts written down from that source,
not their running code; the PySlowFast reference is itself checked against torchvision's and pytorchvideo's modules
below, for every feature those have.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peers import CASES, Case, check, materialize, pytorchvideo_hub, randomize_, relative_error, skipped_init
from pyslowfast_reference import SPECS, PySlowFastMViT

import mvit

needs_pytorchvideo = pytest.mark.skipif(pytorchvideo_hub() is None, reason="pytorchvideo 0.1.5 is not importable")


def one_line_error(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message, message
    return message


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_each_peer_layout_loads_as_saved_and_gives_its_logits(case: Case, tmp_path: Path) -> None:
    if case.source.startswith("pytorchvideo") and pytorchvideo_hub() is None:
        pytest.skip("pytorchvideo 0.1.5 is not importable")
    outcome = check(case, tmp_path)
    assert outcome.relative_error < 1e-4, outcome
    assert outcome.logits_std > 0.1  # the comparison is not between near-constant logits
    # a joint pos_embed (PySlowFast's ImageNet MViT-B-16) becomes class + spatial and a zero temporal embedding
    extra = 96 if case.upstream.startswith("MVIT_B_16_CONV") else 0
    assert outcome.model_params == outcome.upstream_params + extra


@pytest.mark.slow
def test_the_pool_norm_eps_of_the_wrong_version_shows(tmp_path: Path) -> None:
    """The table above could not tell PySlowFast HEAD from its v1-era code if eps did not matter: it does."""
    [case] = [c for c in CASES if c.source == "pyslowfast_v1" and c.upstream == "MVIT_B_16x4_CONV"]
    reference, checkpoint = case.build()
    torch.save(checkpoint, tmp_path / "zoo.pyth")
    clip = torch.randn(2, 3, *case.input_size)
    errors = {}
    for source in ("pyslowfast_v1", "pyslowfast"):
        model = mvit.load_pretrained(
            mvit.create_model(case.preset, input_size=case.input_size), tmp_path / "zoo.pyth", source
        )
        assert model.config.pool_norm_eps == mvit.SOURCE_INFO[source].pool_norm_eps
        with torch.no_grad():
            errors[source] = relative_error(reference(clip), model.eval()(clip))
    assert errors["pyslowfast_v1"] < 1e-5 < 3e-5 < errors["pyslowfast"], errors


# --- the PySlowFast reference, checked against the real modules of torchvision and pytorchvideo ----------------------


def copy_into(target: torch.nn.Module, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    target.load_state_dict(state, strict=True)
    return target.eval()


@needs_pytorchvideo
@pytest.mark.slow
@pytest.mark.parametrize("cls_embed_on", [True, False])
def test_pyslowfast_reference_v1_era_is_pytorchvideo_0_1_5(cls_embed_on: bool) -> None:
    """MViT-B 16x4: the same network in both (pytorchvideo's MViT is PySlowFast's, moved), pooling norms eps 1e-5;
    without a class token both take the mean of the normalised tokens."""
    with skipped_init():
        upstream = randomize_(
            pytorchvideo_hub().mvit_base_16x4(spatial_size=64, temporal_size=8, cls_embed_on=cls_embed_on)
        )
    names = {
        "patch_embed.patch_model.": "patch_embed.proj.",
        "cls_positional_encoding.": "",
        "norm_embed.": "norm.",
        "head.proj.": "head.projection.",
    }
    state = {}
    for key, value in upstream.state_dict().items():
        for old, new in names.items():
            key = key.replace(old, new, 1) if key.startswith(old) else key
        state[key] = value
    spec = {**SPECS["MVIT_B_16x4_CONV"], "SEPARATE_QKV": True, "CLS_EMBED_ON": cls_embed_on}
    reference = copy_into(materialize(lambda: PySlowFastMViT(spec, 8, 64, 400, pool_norm_eps=1e-5)), state)
    clip = torch.randn(2, 3, 8, 64, 64)
    with torch.no_grad():
        assert relative_error(upstream(clip), reference(clip)) < 1e-5


@pytest.mark.slow
def test_pyslowfast_reference_mvitv2_is_torchvision_mvit_v2_s() -> None:
    """MViTv2-S at 8×64²: torchvision's MViT class with mvit_v2_s's settings; names as torchvision's own port script
    maps PySlowFast's (vision PR #6373)."""
    from torchvision.models.video.mvit import MSBlockConfig, MViT

    blocks = mvit.preset_config("mvit_v2_s_16x4").blocks
    settings = [
        MSBlockConfig(
            b.num_heads,
            b.dim_in,
            b.dim_out,
            list(b.pool_q.kernel),
            list(b.pool_k.kernel),
            list(b.pool_q.stride),
            list(b.pool_k.stride),
        )
        for b in blocks
    ]
    upstream = randomize_(
        materialize(
            lambda: MViT(
                (64, 64),
                8,
                settings,
                residual_pool=True,
                residual_with_cls_embed=False,
                rel_pos_embed=True,
                proj_after_attn=True,
            )
        )
    )
    names = [
        ("conv_proj.", "patch_embed.proj."),
        ("pos_encoding.class_token", "cls_token"),
        ("head.1.", "head.projection."),
        (".attn.project.0.", ".attn.proj."),
        (".mlp.0.", ".mlp.fc1."),
        (".mlp.3.", ".mlp.fc2."),
        (".project.", ".proj."),
    ]
    state = {}
    for key, value in upstream.state_dict().items():
        for which in "qkv":
            key = key.replace(f".attn.pool_{which}.pool.", f".attn.pool_{which}.")
            key = key.replace(f".attn.pool_{which}.norm_act.0.", f".attn.norm_{which}.")
        for old, new in names:
            key = key.replace(old, new)
        state[key] = value.reshape(1, 1, -1) if key == "cls_token" else value
    reference = copy_into(materialize(lambda: PySlowFastMViT(SPECS["MVITv2_S_16x4"], 8, 64, 400, 1e-6)), state)
    clip = torch.randn(2, 3, 8, 64, 64)
    with torch.no_grad():
        assert relative_error(upstream(clip), reference(clip)) < 1e-5


# --- native checkpoints, heads and other grids -------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_v2() -> mvit.MViT:
    torch.manual_seed(0)
    return randomize_(mvit.create_model("mvit_v2_tiny", num_classes=6))


def fresh(name: str = "mvit_v2_tiny", **overrides: object) -> mvit.MViT:
    torch.manual_seed(123)
    return mvit.create_model(name, **{"num_classes": 6, **overrides}).eval()


@pytest.mark.parametrize("wrap", ["bare", "training checkpoint", "DDP prefix"])
def test_native(tiny_v2: mvit.MViT, tmp_path: Path, wrap: str) -> None:
    state = tiny_v2.state_dict()
    checkpoint = {
        "bare": state,
        "training checkpoint": {"model": state, "model_name": "mvit_v2_tiny", "num_classes": 6, "epoch": 3},
        "DDP prefix": {f"module.{key}": value for key, value in state.items()},
    }[wrap]
    torch.save(checkpoint, tmp_path / "native.pt")
    clip = torch.randn(2, 3, 8, 64, 64)
    with torch.no_grad():
        assert torch.equal(mvit.load_pretrained(fresh(), tmp_path / "native.pt")(clip), tiny_v2(clip))


def test_other_class_count_reinitialises_the_head(tiny_v2: mvit.MViT) -> None:
    model = fresh(num_classes=3)
    with pytest.warns(UserWarning, match="checkpoint head has 6 classes, the model 3"):
        mvit.load_weights(model, tiny_v2.state_dict())
    clip = torch.randn(1, 3, 8, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(clip), tiny_v2.forward_features(clip))


@pytest.mark.parametrize("name", ["mvit_tiny", "mvit_v2_tiny"])
def test_embeddings_and_relative_tables_are_interpolated_at_load(name: str) -> None:
    """Fine-tuning at 16×96² from an 8×64² checkpoint: the same logits as the 8×64² model interpolating on the fly."""
    source = randomize_(mvit.create_model(name, num_classes=6))
    model = mvit.load_weights(fresh(name, input_size=(16, 96, 96)), source.state_dict())
    if name == "mvit_tiny":
        assert model.pos_embed.spatial.shape == (24, 24, 32) and model.pos_embed.temporal.shape == (8, 32)
    else:  # 2·max(24 // 1, 24 // 4) − 1 spatial and 2·8 − 1 temporal distances in block 0
        assert model.blocks[0].attn.rel_pos_h.shape == (47, 32) and model.blocks[0].attn.rel_pos_t.shape == (15, 32)
    clip = torch.randn(1, 3, 16, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(model(clip), source.eval()(clip), rtol=1e-4, atol=1e-5)


def test_missing_unexpected_and_misshapen_keys_are_named(tiny_v2: mvit.MViT, tmp_path: Path) -> None:
    state = dict(tiny_v2.state_dict())
    del state["blocks.2.mlp.fc1.bias"]
    state["blocks.2.attn.relative_position"] = torch.zeros(3)
    state["blocks.3.norm1.weight"] = torch.ones(7)
    torch.save(state, tmp_path / "broken.pt")
    with pytest.raises(ValueError) as error:
        mvit.load_pretrained(fresh(), tmp_path / "broken.pt")
    message = one_line_error(error)
    assert message.startswith(f"{tmp_path / 'broken.pt'}: cannot load native weights into MViT")
    assert "missing ['blocks.2.mlp.fc1.bias']" in message
    assert "unexpected ['blocks.2.attn.relative_position']" in message
    assert "misshapen ['blocks.3.norm1.weight (7,) != model (64,)']" in message


# --- what a file that cannot load looks like ---------------------------------------------------------------------


def saved(case_id_part: str, tmp_path: Path) -> Path:
    [case] = [c for c in CASES if case_id_part in c.id]
    _, checkpoint = case.build()
    torch.save(checkpoint, tmp_path / "checkpoint.pyth")
    return tmp_path / "checkpoint.pyth"


def load_error(path: Path, source: str, preset: str, **overrides: object) -> str:
    model = materialize(lambda: mvit.create_model(preset, **overrides))
    with pytest.raises(ValueError) as error:
        mvit.load_pretrained(model, path, source)
    message = one_line_error(error)
    assert message.startswith(f"{path}: "), message
    return message.removeprefix(f"{path}: ")


def test_wrong_source_names_the_library_the_file_looks_like(tmp_path: Path) -> None:
    path = saved("pyslowfast:MVITv2_S_16x4@", tmp_path)
    assert load_error(path, "torchvision", "mvit_v2_s_16x4", input_size=(8, 64, 64)) == (
        "looks like PySlowFast (patch_embed.proj, cls_token): use source=pyslowfast "
        "(pyslowfast_v1 for checkpoints of its MViT v1 model zoo)"
    )
    torchvision_file = tmp_path / "torchvision.pth"
    torch.save(randomize_(materialize(lambda: _torchvision_tiny())).state_dict(), torchvision_file)
    assert load_error(torchvision_file, "pytorchvideo", "mvit_tiny").startswith(
        "looks like torchvision (conv_proj, pos_encoding): use source=torchvision"
    )
    native = tmp_path / "native.pt"
    torch.save(mvit.create_model("mvit_tiny").state_dict(), native)
    assert load_error(native, "pyslowfast", "mvit_tiny").startswith(
        "looks like this package's own layout (patch_embed.weight, pos_embed.class_token): use source=native"
    )


def _torchvision_tiny() -> torch.nn.Module:
    from torchvision.models.video.mvit import MSBlockConfig, MViT

    settings = [MSBlockConfig(1, 32, 64, [], [3, 3, 3], [], [1, 4, 4]), MSBlockConfig(2, 64, 64, [], [], [], [])]
    return MViT(
        (64, 64),
        8,
        settings,
        residual_pool=False,
        residual_with_cls_embed=False,
        rel_pos_embed=False,
        proj_after_attn=False,
    )


@needs_pytorchvideo
def test_pytorchvideo_main_file_given_as_0_1_5_and_inconsistent_aliases(tmp_path: Path) -> None:
    path = saved("pytorchvideo_main:mvit_base_16x4 (fused qkv)", tmp_path)
    assert load_error(path, "pytorchvideo", "mvit_b_16x4", input_size=(8, 64, 64)) == (
        "looks like pytorchvideo's main branch (_attention_pool_* alias keys, which 0.1.5 does not have): "
        "use source=pytorchvideo_main"
    )
    state = torch.load(path, weights_only=True)
    state["blocks.1.attn._attention_pool_q.pool.weight"] = state["blocks.1.attn.pool_q.weight"] + 1
    torch.save(state, path)
    assert load_error(path, "pytorchvideo_main", "mvit_b_16x4", input_size=(8, 64, 64)) == (
        "blocks.1.attn._attention_pool_q.pool.weight differs from blocks.1.attn.pool_q.weight, "
        "which it aliases in pytorchvideo: inconsistent file"
    )


def test_mvitv2_checkpoint_into_an_mvit_v1_model_and_back(tmp_path: Path) -> None:
    v2 = saved("pyslowfast:MVITv2_S_16x4@", tmp_path)
    assert load_error(v2, "pyslowfast", "mvit_b_16x4", input_size=(8, 64, 64)) == (
        "an MViTv2 checkpoint (rel_pos_h, rel_pos_t, rel_pos_w keys); build an MViTv2 preset such as mvit_v2_s_16x4"
    )
    assert load_error(v2, "pyslowfast_v1", "mvit_v2_s_16x4", input_size=(8, 64, 64)) == (
        "an MViTv2 checkpoint (rel_pos_h, rel_pos_t, rel_pos_w keys): PySlowFast's v1-era code has no MViTv2; "
        "use source=pyslowfast"
    )
    v1 = saved("pyslowfast:MVIT_B_16x4_CONV@", tmp_path)
    assert load_error(v1, "pyslowfast", "mvit_v2_s_16x4", input_size=(8, 64, 64)) == (
        "an MViT v1 checkpoint (absolute positional embeddings); build an MViT v1 preset such as mvit_b_16x4"
    )
    image_v2 = saved("pyslowfast:MVITv2_S (ImageNet)@", tmp_path)
    assert load_error(image_v2, "pyslowfast", "mvit_v2_s_16x4", input_size=(1, 64, 64)) == (
        "a checkpoint without a class token (as PySlowFast's ImageNet MViTv2); build a preset with "
        "class_token=False such as mvit_v2_s_image"
    )


def test_training_checkpoint_without_weights_and_non_tensor_entries(tmp_path: Path) -> None:
    path = tmp_path / "optimizer_only.pyth"
    torch.save({"epoch": 200, "optimizer_state": {"state": {}, "param_groups": []}, "cfg": "MVIT: ..."}, path)
    assert load_error(path, "pyslowfast", "mvit_tiny") == (
        "a checkpoint dict with non-tensor entries ['cfg', 'epoch', 'optimizer_state'] and no weights under "
        "'model_state' or 'model' or 'state_dict'"
    )
    torch.save({"model_state": {"patch_embed.proj.weight": torch.zeros(1), "epoch": 3}}, path)
    assert load_error(path, "pyslowfast", "mvit_tiny") == "checkpoint entry 'epoch' is a int, not a tensor"


def test_pyslowfast_v1_era_separate_qkv_is_refused(tmp_path: Path) -> None:
    path = saved("pyslowfast:MVITv2_S_16x4 (SEPARATE_QKV)", tmp_path)
    state = torch.load(path, weights_only=True)["model_state"]
    state = {key: value for key, value in state.items() if ".rel_pos_" not in key}
    torch.save({"model_state": state}, path)
    assert load_error(path, "pyslowfast_v1", "mvit_b_16x4").startswith(
        "separate q/k/v projections: PySlowFast's v1-era code only had them while it pooled before projecting"
    )


@pytest.mark.slow
def test_joint_pos_embed_splits_for_images_only(tmp_path: Path) -> None:
    path = saved("pyslowfast:MVIT_B_16_CONV (ImageNet)@", tmp_path)
    state = torch.load(path, weights_only=True)["model_state"]
    model = mvit.load_weights(mvit.create_model("mvit_b_16_image", input_size=(1, 64, 64)), state, "pyslowfast")
    joint = state["pos_embed"][0]
    assert torch.equal(model.pos_embed.class_pos, joint[0])
    assert torch.equal(model.pos_embed.spatial.flatten(0, 1), joint[1:])
    assert not model.pos_embed.temporal.any()
    assert load_error(path, "pyslowfast", "mvit_b_16x4", input_size=(4, 64, 64)) == (
        "a joint space-time pos_embed (256 positions): it splits into this model's separate space and time "
        "embeddings only for one-frame models, and this one has 2 time steps"
    )


def test_unknown_source() -> None:
    with pytest.raises(ValueError, match="unknown weight source 'timm'"):
        mvit.load_weights(fresh(), {}, "timm")
