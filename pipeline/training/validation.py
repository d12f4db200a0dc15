"""Validation over the whole validation set, and the sums that make per-worker figures global."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from pipeline.data.transforms import Normalise
from pipeline.evaluation.metrics import topk_hits
from pipeline.precision import autocast


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sums over every worker (the values themselves outside a process group)."""
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor.tolist()


@torch.no_grad()
def validate(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    normalise: Normalise,
    precision: str,
    device: torch.device,
    confusion: torch.Tensor | None = None,
) -> dict[str, float]:
    """Loss, top-1 and top-5 over every worker's batches; with `confusion` (classes × classes, zeros), also the
    confusion matrix (rows: true class, columns: top-1 prediction), summed over every worker into it.

    Each worker reads a disjoint, non-equalised split of the val dataset (see `driver.ValidationSplit`), so every
    video is seen exactly once; the sums are then all-reduced. `model` must be the bare module, not DDP: workers
    may hold different numbers of batches.
    """
    model.eval()
    loss_sum, hits1, hits5, count = 0.0, 0, 0, 0
    for batch in batches:
        labels = batch["label"].long()
        with autocast(precision, device):
            logits = model(normalise(batch["clip"])).float()
        loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
        top1, top5 = topk_hits(logits, labels)
        hits1, hits5, count = hits1 + top1, hits5 + top5, count + labels.shape[0]
        if confusion is not None:
            confusion.index_put_((labels, logits.argmax(dim=-1)), torch.ones_like(labels), accumulate=True)
    loss_sum, hits1, hits5, count = all_reduce_sum([loss_sum, hits1, hits5, count], device)
    if confusion is not None and dist.is_available() and dist.is_initialized():
        dist.all_reduce(confusion)
    if count == 0:
        return {"val/loss": math.nan, "val/top1": 0.0, "val/top5": 0.0, "val/count": 0}
    return {"val/loss": loss_sum / count, "val/top1": hits1 / count, "val/top5": hits5 / count, "val/count": count}
