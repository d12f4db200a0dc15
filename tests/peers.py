"""Checkpoints of the peer libraries, made the way each one makes and saves them, with the logits of their source.

Each :class:`Case` builds the upstream model, randomises every parameter (norms away from 1 and 0, non-zero
embeddings and relative-position tables, see :func:`randomize_`), and saves it as that library saves; the loader
must then reproduce the upstream logits from the file as it is. The upstream models are:

- torchvision 0.28 (a dev dependency): ``mvit_v1_b``, ``mvit_v2_s`` and its ``MViT`` class, the real modules;
- pytorchvideo 0.1.5 (a dev dependency): ``pytorchvideo.models.hub`` ``mvit_base_16x4``, ``mvit_base_32x3`` and
  ``mvit_base_16``, the real modules, saved as its model zoo files are ({"model_state": ...});
- pytorchvideo's main branch, which is not released: the same real 0.1.5 modules computing as main does and saved
  in main's layout, both written down from facebookresearch/pytorchvideo: ``pytorchvideo/layers/attention.py`` since
  commit d1449fb82ed2fe9458c82d9eb0577f72539f709b registers each pooling conv and norm a second time as
  ``attn._attention_pool_{q,k,v}.{pool,norm}`` (the same Parameters, so ``state_dict()`` holds both keys; pytorchvideo
  issue #206, PR #209), ``MultiScaleAttention(separate_qkv=False)`` has a fused ``attn.qkv``, and
  ``pytorchvideo/models/vision_transformers.py`` builds the pooling norms with ``attn_norm_layer =
  partial(nn.LayerNorm, eps=1e-6)`` where 0.1.5 hard-codes ``nn.LayerNorm`` (eps 1e-5);
- PySlowFast, which does not install: :mod:`pyslowfast_reference`, written down from its source (commits there),
  saved as ``slowfast/utils/checkpoint.py`` saves ({"epoch", "model_state", "optimizer_state", "cfg"}); and its
  pytorchvideo-backed ``PTVMViT`` (``slowfast/models/ptv_model_builder.py``), whose keys are pytorchvideo's under
  ``model.``.

``python tests/peers.py`` prints the table of BENCHMARKS.md.
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from pyslowfast_reference import SPECS, PySlowFastMViT
from torch import nn

import mvit
from jobs.benchmark.torchvision_reference import load_torchvision_mvit

Checkpoint = object


def randomize_(module: nn.Module, seed: int = 0) -> nn.Module:
    """Give every parameter and floating buffer random, non-trivial values: norm weights 1 ± 0.1, biases, tokens,
    positional and relative tables ± 0.1, linear weights std 0.02, conv kernels std 0.1. The module may have been
    built on the meta device and moved with ``to_empty`` (its own initialisation is skipped: it is slow on 2 cores)."""
    generator = torch.Generator().manual_seed(seed)
    norms = {id(m.weight) for m in module.modules() if isinstance(m, nn.LayerNorm)}
    convs = {id(m.weight) for m in module.modules() if isinstance(m, nn.Conv2d | nn.Conv3d)}
    with torch.no_grad():
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            if not tensor.is_floating_point():
                continue
            noise = torch.randn(tensor.shape, generator=generator)
            if id(tensor) in norms:
                tensor.copy_(1 + 0.1 * noise)
            elif id(tensor) in convs:
                tensor.copy_(0.1 * noise)
            elif tensor.ndim >= 2 and not any(word in name for word in ("pos", "cls", "token")):
                tensor.copy_(0.02 * noise)
            else:
                tensor.copy_(0.1 * noise)
    return module.eval()


def materialize(build: Callable[[], nn.Module]) -> nn.Module:
    """``build()`` on the meta device, then given uninitialised CPU storage (to be randomised)."""
    with torch.device("meta"):
        module = build()
    return module.to_empty(device="cpu")


@contextlib.contextmanager
def skipped_init() -> Iterator[None]:
    """Build modules without their initialisation (for builders that cannot run on meta: pytorchvideo's calls
    ``.item()``); every parameter is randomised afterwards anyway."""
    from pytorchvideo.models import vision_transformers

    layers = (nn.Linear, nn.LayerNorm, nn.modules.conv._ConvNd)
    saved = [layer.reset_parameters for layer in layers], vision_transformers.init_net_weights
    for layer in layers:
        layer.reset_parameters = lambda self: None
    vision_transformers.init_net_weights = lambda *args, **kwargs: None
    try:
        yield
    finally:
        for layer, reset in zip(layers, saved[0]):
            layer.reset_parameters = reset
        vision_transformers.init_net_weights = saved[1]


def relative_error(expected: torch.Tensor, actual: torch.Tensor) -> float:
    return float((expected - actual).norm() / expected.norm())


def pytorchvideo_hub():
    """pytorchvideo 0.1.5's ``models.hub.vision_transformers``, or None where it cannot be imported. It imports
    torchvision, whose C extension does not load with CPU torch: the same workaround as the benchmarks'."""
    if importlib.util.find_spec("pytorchvideo") is None or load_torchvision_mvit() is None:
        return None
    from pytorchvideo.models.hub import vision_transformers

    return vision_transformers


def _pytorchvideo_module(name: str, frames: int, size: int) -> nn.Module:
    builder = getattr(pytorchvideo_hub(), name)
    classes = 1000 if frames == 1 else 400  # the hub's image config keeps the builder's default of 400 classes
    with skipped_init():
        return randomize_(builder(spatial_size=size, temporal_size=frames, head_num_classes=classes))


def _main_branch_layout(module: nn.Module, fused: bool) -> dict[str, torch.Tensor]:
    """pytorchvideo main's ``state_dict()`` for the same network: alias keys (sharing the tensors), and with
    ``separate_qkv=False`` one ``attn.qkv`` instead of ``attn.q``, ``attn.k``, ``attn.v``."""
    state = dict(module.state_dict())
    for index, block in enumerate(module.blocks):
        prefix = f"blocks.{index}.attn"
        for which in "qkv":
            if getattr(block.attn, f"pool_{which}") is not None:
                state[f"{prefix}._attention_pool_{which}.pool.weight"] = state[f"{prefix}.pool_{which}.weight"]
                for kind in ("weight", "bias"):
                    state[f"{prefix}._attention_pool_{which}.norm.{kind}"] = state[f"{prefix}.norm_{which}.{kind}"]
        if fused:
            for kind in ("weight", "bias"):
                parts = [state.pop(f"{prefix}.{which}.{kind}") for which in "qkv"]
                state[f"{prefix}.qkv.{kind}"] = torch.cat(parts, dim=0)
    return state


def _set_pool_norm_eps_(module: nn.Module, eps: float) -> None:
    for block in module.blocks:
        for which in "qkv":
            norm = getattr(block.attn, f"norm_{which}", None)
            if norm is not None:
                norm.eps = eps


def _slowfast_checkpoint(state: dict[str, torch.Tensor], spec: str) -> Checkpoint:
    return {"epoch": 200, "model_state": state, "optimizer_state": {"state": {}, "param_groups": []}, "cfg": spec}


@dataclass(frozen=True)
class Case:
    """One row of the loader table: ``build()`` gives the upstream model (eval mode) and the file's contents."""

    source: str
    upstream: str
    preset: str
    input_size: tuple[int, int, int]
    build: Callable[[], tuple[nn.Module, Checkpoint]]

    @property
    def id(self) -> str:
        return f"{self.source}:{self.upstream}@{'x'.join(map(str, self.input_size))}"


def _torchvision(name: str) -> Callable[[], tuple[nn.Module, Checkpoint]]:
    def build() -> tuple[nn.Module, Checkpoint]:
        module = randomize_(materialize(load_torchvision_mvit(name)))
        return module, module.state_dict()

    return build


def _pytorchvideo(name: str, frames: int, size: int, layout: str) -> Callable[[], tuple[nn.Module, Checkpoint]]:
    def build() -> tuple[nn.Module, Checkpoint]:
        module = _pytorchvideo_module(name, frames, size)
        if layout == "0.1.5":
            return module, {"model_state": module.state_dict()}
        if layout == "ptv_mvit":  # PySlowFast's PTVMViT: self.model = create_multiscale_vision_transformers(...)
            state = {f"model.{key}": value for key, value in module.state_dict().items()}
            return module, _slowfast_checkpoint(state, "MODEL:\n  MODEL_NAME: PTVMViT\n")
        _set_pool_norm_eps_(module, 1e-6)
        return module, _main_branch_layout(module, fused=layout == "main fused")

    return build


def _pyslowfast(spec: str, frames: int, size: int, eps: float, **changes: object):
    def build() -> tuple[nn.Module, Checkpoint]:
        classes = 1000 if "ImageNet" in spec else 400
        module = randomize_(materialize(lambda: PySlowFastMViT({**SPECS[spec], **changes}, frames, size, classes, eps)))
        return module, _slowfast_checkpoint(module.state_dict(), f"MVIT: {spec}")

    return build


VIDEO, IMAGE = (8, 64, 64), (1, 64, 64)
CASES: list[Case] = [
    Case("torchvision", "mvit_v1_b", "mvit_b_16x4", (16, 224, 224), _torchvision("mvit_v1_b")),
    Case("torchvision", "mvit_v2_s", "mvit_v2_s_16x4", (16, 224, 224), _torchvision("mvit_v2_s")),
    Case(
        "pytorchvideo",
        "mvit_base_16x4",
        "mvit_b_16x4",
        (16, 224, 224),
        _pytorchvideo("mvit_base_16x4", 16, 224, "0.1.5"),
    ),
    *[
        Case(source, f"{name}{suffix}", preset, size, _pytorchvideo(name, size[0], size[1], layout))
        for source, suffix, layout in [
            ("pytorchvideo", "", "0.1.5"),
            ("pytorchvideo_main", " (separate q/k/v)", "main separate"),
            ("pytorchvideo_main", " (fused qkv)", "main fused"),
        ]
        for name, preset, size in [
            ("mvit_base_16x4", "mvit_b_16x4", VIDEO),
            ("mvit_base_32x3", "mvit_b_32x3", VIDEO),
            ("mvit_base_16", "mvit_b_16_image", IMAGE),
        ]
    ],
    Case(
        "pytorchvideo",
        "PySlowFast PTVMViT (model. prefix)",
        "mvit_b_16x4",
        VIDEO,
        _pytorchvideo("mvit_base_16x4", 8, 64, "ptv_mvit"),
    ),
    *[
        Case(source, f"{spec}{suffix}", preset, size, _pyslowfast(spec, size[0], size[1], eps, **changes))
        for source, eps, specs in [
            (
                "pyslowfast",
                1e-6,
                [
                    "MVIT_B_16x4_CONV",
                    "MVIT_B_32x3_CONV",
                    "MVIT_B_16_CONV (ImageNet)",
                    "MVITv2_S_16x4",
                    "MVITv2_B_32x3",
                    "MVITv2_S (ImageNet)",
                ],
            ),
            ("pyslowfast_v1", 1e-5, ["MVIT_B_16x4_CONV", "MVIT_B_32x3_CONV", "MVIT_B_16_CONV (ImageNet)"]),
        ]
        for spec in specs
        for suffix, changes in [("", {})]
        for preset, size in [
            {
                "MVIT_B_16x4_CONV": ("mvit_b_16x4", VIDEO),
                "MVIT_B_32x3_CONV": ("mvit_b_24_32x3", VIDEO),
                "MVIT_B_16_CONV (ImageNet)": ("mvit_b_16_image", IMAGE),
                "MVITv2_S_16x4": ("mvit_v2_s_16x4", VIDEO),
                "MVITv2_B_32x3": ("mvit_v2_b_32x3", VIDEO),
                "MVITv2_S (ImageNet)": ("mvit_v2_s_image", IMAGE),
            }[spec]
        ]
    ],
    Case(
        "pyslowfast",
        "MVITv2_S_16x4 (SEPARATE_QKV)",
        "mvit_v2_s_16x4",
        VIDEO,
        _pyslowfast("MVITv2_S_16x4", 8, 64, 1e-6, SEPARATE_QKV=True),
    ),
]


@dataclass(frozen=True)
class Outcome:
    relative_error: float
    upstream_params: int
    model_params: int
    logits_std: float


def check(case: Case, folder: Path) -> Outcome:
    """Build, save, load with ``mvit.load_pretrained(path, source=case.source)`` and compare fp32 logits."""
    torch.manual_seed(0)
    reference, checkpoint = case.build()
    path = folder / f"{case.source}.pyth"
    torch.save(checkpoint, path)
    model = materialize(lambda: mvit.create_model(case.preset, input_size=case.input_size))
    mvit.load_pretrained(model, path, source=case.source).eval()
    clip = torch.randn(2, 3, *case.input_size, generator=torch.Generator().manual_seed(1))
    if case.input_size[0] == 1:  # images: pytorchvideo's image MViT embeds (B, C, H, W) with a Conv2d
        clip = clip[:, :, 0]
    with torch.no_grad():
        expected, actual = reference(clip), model(clip)
    return Outcome(
        relative_error(expected, actual),
        sum(p.numel() for p in reference.parameters()),
        mvit.count_parameters(model),
        float(expected.std()),
    )


def main() -> None:
    import tempfile

    print(
        "| source | upstream model | preset | input T×H×W | relative error as loaded | params upstream | params here |"
    )
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        for case in CASES:
            start = time.perf_counter()
            outcome = check(case, Path(folder))
            print(
                f"| `{case.source}` | {case.upstream} | `{case.preset}` | {'×'.join(map(str, case.input_size))} | "
                f"{outcome.relative_error:.1e} | {outcome.upstream_params:,} | {outcome.model_params:,} |",
                flush=True,
            )
            print(f"  ({time.perf_counter() - start:.1f} s, logits std {outcome.logits_std:.2f})", file=sys.stderr)


if __name__ == "__main__":
    main()
