"""Weight import: each source's key layout is written from a model, read back, and must give identical logits."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import mvit

# native key → (PySlowFast key, pytorchvideo key); the inverse of what mvit.weights reads
FOREIGN_NAMES = [
    (r"^patch_embed\.", "patch_embed.proj.", "patch_embed.patch_model."),
    (r"^pos_embed\.class_token$", "cls_token", "cls_positional_encoding.cls_token"),
    (r"^pos_embed\.class_pos$", "pos_embed_class", "cls_positional_encoding.pos_embed_class"),
    (r"^pos_embed\.spatial$", "pos_embed_spatial", "cls_positional_encoding.pos_embed_spatial"),
    (r"^pos_embed\.temporal$", "pos_embed_temporal", "cls_positional_encoding.pos_embed_temporal"),
    (r"\.attn\.pool_([qkv])\.pool\.weight$", r".attn.pool_\1.weight", r".attn.pool_\1.weight"),
    (r"\.attn\.pool_([qkv])\.norm\.", r".attn.norm_\1.", r".attn.norm_\1."),
    (r"\.skip_proj\.", ".proj.", ".proj."),
    (r"^norm\.", "norm.", "norm_embed."),
    (r"^head\.", "head.projection.", "head.proj."),
]


def to_foreign_layout(state: dict[str, torch.Tensor], source: str, separate_qkv: bool) -> dict[str, torch.Tensor]:
    """Write a native state dict the way PySlowFast or pytorchvideo name and shape it."""
    column = {"pyslowfast": 1, "pytorchvideo": 2}[source]
    foreign = {}
    for key, value in state.items():
        for rule in FOREIGN_NAMES:
            key, count = re.subn(rule[0], rule[column], key)
            if count:
                break
        if key.endswith(("cls_token", "pos_embed_class")):
            value = value.reshape(1, 1, -1)
        elif key.endswith(("pos_embed_spatial", "pos_embed_temporal")):
            value = value.reshape(1, -1, value.shape[-1])
        if separate_qkv and ".attn.qkv." in key:
            for name, part in zip("qkv", value.chunk(3, dim=0)):
                foreign[key.replace(".qkv.", f".{name}.")] = part.clone()
        else:
            foreign[key] = value.clone()
    return foreign


@pytest.fixture(scope="module")
def source_model() -> mvit.MViT:
    torch.manual_seed(0)
    model = mvit.create_model("mvit_tiny", num_classes=6).eval()
    with torch.no_grad():
        for parameter in model.parameters():  # nothing trivially 0 or 1
            parameter.add_(0.05 * torch.randn_like(parameter))
    return model


@pytest.fixture(scope="module")
def clip() -> torch.Tensor:
    return torch.randn(2, 3, 8, 64, 64, generator=torch.Generator().manual_seed(1))


def fresh_tiny(**overrides: object) -> mvit.MViT:
    torch.manual_seed(123)
    return mvit.create_model("mvit_tiny", **{"num_classes": 6, **overrides}).eval()


@torch.no_grad()
def assert_same_logits(model: mvit.MViT, reference: mvit.MViT, clip: torch.Tensor) -> None:
    assert torch.equal(model(clip), reference(clip))


@pytest.mark.parametrize("wrap", ["bare", "training checkpoint"])
def test_native(source_model: mvit.MViT, clip: torch.Tensor, tmp_path: Path, wrap: str) -> None:
    state = source_model.state_dict()
    checkpoint = state if wrap == "bare" else {"model": state, "model_name": "mvit_tiny", "num_classes": 6, "epoch": 3}
    torch.save(checkpoint, tmp_path / "native.pt")
    assert_same_logits(mvit.load_pretrained(fresh_tiny(), tmp_path / "native.pt"), source_model, clip)


@pytest.mark.parametrize("source", ["pyslowfast", "pytorchvideo"])
@pytest.mark.parametrize("separate_qkv", [False, True], ids=["fused qkv", "separate q k v"])
def test_pyslowfast_and_pytorchvideo(
    source_model: mvit.MViT, clip: torch.Tensor, tmp_path: Path, source: str, separate_qkv: bool
) -> None:
    foreign = to_foreign_layout(source_model.state_dict(), source, separate_qkv)
    assert ("blocks.0.attn.q.weight" in foreign) == separate_qkv
    torch.save({"model_state": foreign, "model_epoch": 200}, tmp_path / "foreign.pyth")
    assert_same_logits(mvit.load_pretrained(fresh_tiny(), tmp_path / "foreign.pyth", source), source_model, clip)


def test_torchvision_layout_from_torchvision_module(clip: torch.Tensor, tmp_path: Path) -> None:
    """A torchvision MViT with mvit_tiny's blocks: its state dict loads and gives torchvision's logits."""
    from jobs.benchmark.torchvision_reference import load_torchvision_mvit_v1_b

    if load_torchvision_mvit_v1_b() is None:
        pytest.skip("torchvision is not importable")
    from torchvision.models.video.mvit import MSBlockConfig, MViT

    config = mvit.preset_config("mvit_tiny")
    settings = [
        MSBlockConfig(
            num_heads=b.num_heads,
            input_channels=b.dim_in,
            output_channels=b.dim_out,
            kernel_q=list(b.pool_q.kernel) if not b.pool_q.is_identity else [],
            kernel_kv=list(b.pool_k.kernel),
            stride_q=list(b.pool_q.stride) if not b.pool_q.is_identity else [],
            stride_kv=list(b.pool_k.stride),
        )
        for b in config.blocks
    ]
    torch.manual_seed(0)
    reference = MViT(
        spatial_size=(64, 64),
        temporal_size=8,
        block_setting=settings,
        residual_pool=False,
        residual_with_cls_embed=False,
        rel_pos_embed=False,
        proj_after_attn=False,
        num_classes=6,
    ).eval()
    torch.save(reference.state_dict(), tmp_path / "torchvision.pth")
    model = mvit.load_pretrained(fresh_tiny(), tmp_path / "torchvision.pth", "torchvision")
    with torch.no_grad():
        expected, actual = reference(clip), model(clip)
    assert float((expected - actual).norm() / expected.norm()) < 1e-5


def test_other_class_count_reinitialises_the_head(source_model: mvit.MViT, clip: torch.Tensor) -> None:
    model = fresh_tiny(num_classes=3)
    with pytest.warns(UserWarning, match="checkpoint head has 6 classes, the model 3"):
        mvit.load_weights(model, source_model.state_dict())
    assert model.head.weight.shape == (3, 128)
    torch.testing.assert_close(model.forward_features(clip), source_model.forward_features(clip))


def test_positional_embeddings_are_interpolated_at_load(source_model: mvit.MViT) -> None:
    """Fine-tuning at 16×96² from an 8×64² checkpoint: same logits as the 8×64² model interpolating on the fly."""
    bigger_clip = torch.randn(1, 3, 16, 96, 96)
    model = mvit.load_weights(fresh_tiny(input_size=(16, 96, 96)), source_model.state_dict())
    assert model.pos_embed.spatial.shape == (24, 24, 32) and model.pos_embed.temporal.shape == (8, 32)
    assert_same_logits(model, source_model, bigger_clip)


def test_missing_unexpected_and_misshapen_keys_are_named(source_model: mvit.MViT, tmp_path: Path) -> None:
    state = dict(source_model.state_dict())
    del state["blocks.2.mlp.fc1.bias"]
    state["blocks.2.attn.relative_position"] = torch.zeros(3)
    state["blocks.3.norm1.weight"] = torch.ones(7)
    torch.save(state, tmp_path / "broken.pt")
    with pytest.raises(ValueError) as error:
        mvit.load_pretrained(fresh_tiny(), tmp_path / "broken.pt")
    message = str(error.value)
    assert message.startswith(f"{tmp_path / 'broken.pt'}: cannot load native weights into MViT")
    assert "missing ['blocks.2.mlp.fc1.bias']" in message
    assert "unexpected ['blocks.2.attn.relative_position']" in message
    assert "misshapen ['blocks.3.norm1.weight (7,) != model (128,)']" in message


def test_foreign_checkpoint_into_another_architecture_fails(source_model: mvit.MViT) -> None:
    foreign = to_foreign_layout(source_model.state_dict(), "pyslowfast", separate_qkv=False)
    with pytest.raises(ValueError, match=r"missing \['blocks\.4\."):
        mvit.load_weights(mvit.create_model("mvit_b_16_image", input_size=(1, 64, 64)), foreign, "pyslowfast")
    with pytest.raises(ValueError, match="unknown weight source 'timm'"):
        mvit.load_weights(fresh_tiny(), foreign, "timm")


def test_pytorchvideo_image_model_with_2d_patch_conv(tmp_path: Path) -> None:
    """pytorchvideo's image MViT embeds patches with a Conv2d; it becomes a one-frame Conv3d."""
    config = mvit.MViTConfig(
        blocks=mvit.multiscale_blocks(16, (1, 1), (1, 2, 2), pool_kernel=(1, 3, 3)),
        input_size=(1, 32, 32),
        num_classes=5,
        patch_kernel=(1, 7, 7),
        patch_stride=(1, 4, 4),
        patch_padding=(0, 3, 3),
    )
    torch.manual_seed(0)
    source, target = mvit.MViT(config).eval(), mvit.MViT(config).eval()
    foreign = to_foreign_layout(source.state_dict(), "pytorchvideo", separate_qkv=False)
    foreign["patch_embed.patch_model.weight"] = foreign["patch_embed.patch_model.weight"].squeeze(2)
    torch.save({"model_state": foreign}, tmp_path / "image.pyth")
    images = torch.randn(2, 3, 32, 32)
    assert_same_logits(mvit.load_pretrained(target, tmp_path / "image.pyth", "pytorchvideo"), source, images)
