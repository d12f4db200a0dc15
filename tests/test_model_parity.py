"""mvit_b_16x4 with torchvision-format weights reproduces torchvision's mvit_v1_b."""

from __future__ import annotations

import pytest
import torch

import mvit
from jobs.benchmark.torchvision_reference import load_torchvision_mvit_v1_b


@torch.no_grad()
@pytest.mark.slow
def test_mvit_b_16x4_matches_torchvision_mvit_v1_b(tmp_path) -> None:
    builder = load_torchvision_mvit_v1_b()
    if builder is None:
        pytest.skip("torchvision is not importable")
    torch.manual_seed(0)
    reference = builder().eval()
    for name, parameter in reference.named_parameters():
        # torchvision initialises LayerNorms to 1/0 and biases to 0: perturb them, and the embeddings, too
        if parameter.ndim == 1 or name.startswith("pos_encoding."):
            parameter.add_(0.1 * torch.randn_like(parameter))
    torch.save(reference.state_dict(), tmp_path / "mvit_v1_b.pth")
    model = mvit.load_pretrained(mvit.create_model("mvit_b_16x4"), tmp_path / "mvit_v1_b.pth", "torchvision").eval()

    clip = torch.randn(1, 3, 16, 224, 224)
    expected, actual = reference(clip), model(clip)
    relative_error = float((expected - actual).norm() / expected.norm())
    assert relative_error < 1e-4, relative_error
    assert expected.std() > 0.1  # the comparison is not between near-constant logits
