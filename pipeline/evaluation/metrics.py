"""Classification figures: top-k hits that add up across workers, and per-video results averaged over views."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
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


@dataclass
class EvaluationResult:
    """Per-video predictions and the summary figures over the videos that could be decoded."""

    predictions: pa.Table  # path, label, prediction, top5, score, scores (the mean softmax over the views)
    top1: float
    top5: float
    mean_class_accuracy: float
    per_class_accuracy: np.ndarray
    confusion: np.ndarray
    videos: int


def average_views(
    batches: Iterable[dict[str, np.ndarray]], num_classes: int
) -> tuple[list[int], np.ndarray, np.ndarray]:
    """Mean softmax over each video's views: (video ids, labels, scores (videos, classes)), ordered by video id."""
    sums: dict[int, np.ndarray] = {}
    views: dict[int, int] = {}
    labels: dict[int, int] = {}
    for batch in batches:
        for video_id, label, scores in zip(batch["video_id"], batch["label"], batch["scores"]):
            key = int(video_id)
            if key not in sums:
                sums[key], views[key], labels[key] = np.zeros(num_classes, dtype=np.float64), 0, int(label)
            sums[key] += scores
            views[key] += 1
    order = sorted(sums)
    scores = np.stack([sums[k] / views[k] for k in order]) if order else np.zeros((0, num_classes))
    return order, np.array([labels[k] for k in order], dtype=np.int64), scores


def summarise(paths: list[str], labels: np.ndarray, scores: np.ndarray, num_classes: int) -> EvaluationResult:
    top5 = np.argsort(-scores, axis=1)[:, : min(5, num_classes)]
    predictions = top5[:, 0] if len(paths) else np.zeros(0, dtype=np.int64)
    mean_acc, per_class = mean_class_accuracy(predictions, labels, num_classes)
    table = pa.table(
        {
            "path": paths,
            "label": labels,
            "prediction": predictions,
            "top5": [list(map(int, row)) for row in top5],
            "score": scores[np.arange(len(paths)), predictions] if len(paths) else np.zeros(0),
            "scores": [row.tolist() for row in scores],
        }
    )
    count = max(len(paths), 1)
    return EvaluationResult(
        table,
        float((predictions == labels).sum() / count),
        float((top5 == labels[:, None]).any(axis=1).sum() / count),
        mean_acc,
        per_class,
        confusion_matrix(predictions, labels, num_classes),
        len(paths),
    )
