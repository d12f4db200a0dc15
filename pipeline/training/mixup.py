"""Mixup and CutMix on the training device, with label smoothing folded into the soft targets."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.config import TrainConfig


def smooth_one_hot(labels: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    off = smoothing / num_classes
    on = 1.0 - smoothing + off
    return torch.full((labels.shape[0], num_classes), off, device=labels.device).scatter_(1, labels[:, None], on)


class MixupCutmix:
    """Per batch: with `prob`, mix clips with their reversed batch, by mixup or (with `switch_prob`) by cutmix.

    The cutmix box is the same for every frame of a clip, as in PySlowFast; the target weight is the box's true area.
    """

    def __init__(
        self,
        num_classes: int,
        mixup_alpha: float,
        cutmix_alpha: float,
        prob: float,
        switch_prob: float,
        label_smoothing: float,
        seed: int = 0,
    ) -> None:
        self.num_classes = num_classes
        self.mixup_alpha = mixup_alpha
        self.cutmix_alpha = cutmix_alpha
        self.prob = prob
        self.switch_prob = switch_prob
        self.label_smoothing = label_smoothing
        self.rng = np.random.default_rng(seed)

    @classmethod
    def from_config(cls, train: TrainConfig, num_classes: int, seed: int) -> MixupCutmix:
        return cls(
            num_classes,
            train.mixup_alpha,
            train.cutmix_alpha,
            train.mixup_prob,
            train.mixup_switch_prob,
            train.label_smoothing,
            seed=seed,
        )

    @property
    def enabled(self) -> bool:
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0

    def __call__(self, clips: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """clips (B, C, T, H, W) float; returns the mixed clips and soft targets (B, num_classes)."""
        targets = smooth_one_hot(labels, self.num_classes, self.label_smoothing)
        if not self.enabled or self.rng.random() >= self.prob:
            return clips, targets
        use_cutmix = self.cutmix_alpha > 0 and (self.mixup_alpha <= 0 or self.rng.random() < self.switch_prob)
        if use_cutmix:
            lam = float(self.rng.beta(self.cutmix_alpha, self.cutmix_alpha))
            height, width = clips.shape[-2:]
            cut_h, cut_w = int(height * np.sqrt(1 - lam)), int(width * np.sqrt(1 - lam))
            cy, cx = int(self.rng.integers(height)), int(self.rng.integers(width))
            y0, y1 = np.clip([cy - cut_h // 2, cy + cut_h // 2], 0, height)
            x0, x1 = np.clip([cx - cut_w // 2, cx + cut_w // 2], 0, width)
            clips = clips.clone()
            clips[..., y0:y1, x0:x1] = clips.flip(0)[..., y0:y1, x0:x1]
            lam = 1.0 - (y1 - y0) * (x1 - x0) / (height * width)
        else:
            lam = float(self.rng.beta(self.mixup_alpha, self.mixup_alpha))
            clips = clips * lam + clips.flip(0) * (1.0 - lam)
        return clips, targets * lam + targets.flip(0) * (1.0 - lam)


def soft_target_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
