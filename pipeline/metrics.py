"""Classification counts that add up across workers and videos: top-k hits, per-class accuracy."""

from __future__ import annotations

import numpy as np
import torch


def topk_hits(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> list[int]:
    """How many rows have their label among the k highest scores, for each k (k capped at the class count)."""
    top = logits.topk(min(max(ks), logits.shape[-1]), dim=-1).indices
    hits = top == labels[:, None]
    return [int(hits[:, : min(k, top.shape[1])].any(dim=1).sum()) for k in ks]


def mean_class_accuracy(predictions: np.ndarray, labels: np.ndarray, num_classes: int) -> tuple[float, np.ndarray]:
    """Mean over the classes present of each class's top-1 accuracy, and the per-class vector (NaN if absent)."""
    per_class = np.full(num_classes, np.nan)
    for cls in np.unique(labels):
        mask = labels == cls
        per_class[cls] = float((predictions[mask] == cls).mean())
    return float(np.nanmean(per_class)), per_class


def confusion_matrix(predictions: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (labels, predictions), 1)
    return matrix
