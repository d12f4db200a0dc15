"""mvit_tiny as the training side uses it: mixed precision, torch.compile, stochastic depth."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import mvit
from mvit.blocks import DropPath


def test_bf16_autocast_forward_backward_gives_finite_gradients() -> None:
    torch.manual_seed(0)
    model = mvit.create_model("mvit_tiny", num_classes=5).train()
    clip, labels = torch.randn(2, 3, 8, 64, 64), torch.tensor([1, 4])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(clip)
        loss = F.cross_entropy(logits, labels)
    assert logits.dtype == torch.bfloat16
    loss.backward()
    gradients = {name: p.grad for name, p in model.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in gradients.values())
    # (the last block's query pooling cannot matter: only the class token leaves it, and that goes around pools)
    assert gradients["pos_embed.spatial"].abs().sum() > 0
    assert gradients["blocks.1.attn.pool_q.pool.weight"].abs().sum() > 0


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compiled_forward_matches_eager(backend: str) -> None:
    """The whole model is one graph (no graph breaks); inductor's generated kernels give the eager logits."""
    torch.manual_seed(0)
    model = mvit.create_model("mvit_tiny", num_classes=5).eval()
    clip = torch.randn(2, 3, 8, 64, 64)
    with torch.no_grad():
        eager = model(clip)
        compiled = torch.compile(model, fullgraph=True, backend=backend)(clip)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)


def test_drop_path_drops_whole_samples_in_training_only() -> None:
    block_input = torch.ones(64, 3, 2)
    layer = DropPath(0.5).train()
    out = layer(block_input)
    per_sample = out.flatten(1)
    assert set(per_sample.unique().tolist()) <= {0.0, 2.0}
    assert (per_sample == per_sample[:, :1]).all()
    assert torch.equal(layer.eval()(block_input), block_input)
