"""The paper's optimiser pieces: decay groups, linear lr scaling, warm-up then half-cosine, mixup targets."""

import math

import pytest
import torch
from torch import nn

from pipeline.training.mixup import MixupCutmix, smooth_one_hot, soft_target_cross_entropy
from pipeline.training.optim import WarmupCosine, parameter_groups, scaled_lr


def test_no_weight_decay_on_biases_and_1d_parameters():
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    decay, no_decay = parameter_groups(model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert {p.shape for p in decay["params"]} == {torch.Size([8, 4]), torch.Size([2, 8])}
    assert all(p.ndim == 1 for p in no_decay["params"]) and len(no_decay["params"]) == 4


def test_linear_scaling_rule():
    assert scaled_lr(1.6e-3, 512, 64) == pytest.approx(2e-4)


def test_warmup_then_half_cosine():
    schedule = WarmupCosine(peak_lr=1.6e-3, min_lr=1.6e-5, warmup_start_lr=1.6e-5, warmup_epochs=30, total_epochs=200)
    assert schedule(0) == pytest.approx(1.6e-5)
    assert schedule(15) == pytest.approx((1.6e-5 + 1.6e-3) / 2)
    assert schedule(30) == pytest.approx(1.6e-3)
    assert schedule(115) == pytest.approx(1.6e-5 + (1.6e-3 - 1.6e-5) * 0.5 * (1 + math.cos(math.pi / 2)))
    assert schedule(200) == pytest.approx(1.6e-5)


def test_label_smoothing_and_mixup_targets_are_distributions():
    labels = torch.tensor([0, 2, 1, 2])
    smooth = smooth_one_hot(labels, 3, 0.1)
    assert torch.allclose(smooth.sum(1), torch.ones(4)) and smooth[0, 0] == pytest.approx(0.9 + 0.1 / 3)
    mix = MixupCutmix(3, mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5, label_smoothing=0.1)
    clips = torch.rand(4, 3, 2, 8, 8)
    for _ in range(10):
        mixed, targets = mix(clips, labels)
        assert mixed.shape == clips.shape and torch.allclose(targets.sum(1), torch.ones(4))
        assert not torch.equal(targets, smooth)
    loss = soft_target_cross_entropy(torch.zeros(4, 3), smooth)
    assert loss.item() == pytest.approx(math.log(3), rel=1e-5)
