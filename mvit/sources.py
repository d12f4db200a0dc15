"""The implementations whose checkpoints :func:`mvit.load_pretrained` reads, and what sets each one apart.

A source is a key layout (how that code names and shapes its parameters) plus the numerics the checkpoint was
trained with: the epsilon of the LayerNorms after the q/k/v pooling changed between versions of PySlowFast and of
pytorchvideo, which moves logits by about 1e-4 (relative), so the version is part of the source's name.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Source:
    """``layout``: the key family ("native", "torchvision", "pyslowfast" or "pytorchvideo"). ``pool_norm_eps``: the
    pooling-norm epsilon of that code, set on the model at load (None: keep the model's)."""

    name: str
    title: str
    layout: str
    pool_norm_eps: float | None
    code: str


_TABLE = (
    Source("native", "this package", "native", None, "mvit.MViT.state_dict(), bare or under 'model'"),
    Source(
        "torchvision",
        "torchvision",
        "torchvision",
        1e-6,
        "torchvision.models.video mvit_v1_b and mvit_v2_s (0.14 to 0.28)",
    ),
    Source(
        "pyslowfast",
        "PySlowFast",
        "pyslowfast",
        1e-6,
        "PySlowFast since its MViTv2 commit 1aebd71a (MViT v1 and v2, fused or separate q/k/v)",
    ),
    Source(
        "pyslowfast_v1",
        "PySlowFast's v1-era code",
        "pyslowfast",
        1e-5,
        "PySlowFast before 1aebd71a, which trained the MViT v1 model zoo (fused qkv)",
    ),
    Source(
        "pytorchvideo",
        "pytorchvideo 0.1.5",
        "pytorchvideo",
        1e-5,
        "pytorchvideo 0.1.5 (PyPI), the layout of its model zoo files",
    ),
    Source(
        "pytorchvideo_main",
        "pytorchvideo's main branch",
        "pytorchvideo",
        1e-6,
        "pytorchvideo's main branch since d1449fb8 (adds _attention_pool_* alias keys)",
    ),
)

SOURCE_INFO: dict[str, Source] = {source.name: source for source in _TABLE}
SOURCES: tuple[str, ...] = tuple(SOURCE_INFO)
