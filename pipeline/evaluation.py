"""Multi-view testing as Ray Data batch inference: model replicas in an actor pool score every view of every video,
and the driver averages the softmax scores of each video's views, as the paper's K×S testing does."""

from __future__ import annotations

import tempfile
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import ray
import torch
from omegaconf import DictConfig

from pipeline.dataset import test_dataset
from pipeline.evaluation_logging import log_evaluation
from pipeline.index import read_usable
from pipeline.inference import clip_settings, model_reference
from pipeline.metrics import confusion_matrix, mean_class_accuracy
from pipeline.model_source import LoadedModel, load_model
from pipeline.skips import skip_counter
from pipeline.train_loop import normalise
from pipeline.trainer import ensure_index


class ViewScorer:
    """One model replica (a Ray Data actor): uint8 views in, softmax scores out; bf16 autocast on a GPU."""

    def __init__(self, model_reference: dict[str, Any], mean: list[float], std: list[float]) -> None:
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = load_model(**model_reference).module.to(self.device).eval()
        self.mean = torch.tensor(mean, device=self.device).view(1, 3, 1, 1, 1)
        self.std = torch.tensor(std, device=self.device).view(1, 3, 1, 1, 1)

    @torch.inference_mode()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        clips = normalise(torch.from_numpy(np.ascontiguousarray(batch["clip"])).to(self.device), self.mean, self.std)
        autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda")
        with autocast:
            logits = self.model(clips)
        scores = torch.softmax(logits.float(), dim=-1).cpu().numpy()
        return {"video_id": batch["video_id"], "label": batch["label"], "scores": scores}


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


def score_views(
    views: ray.data.Dataset,
    video_paths: list[str],
    model_reference: dict[str, Any],
    loaded: LoadedModel,
    *,
    mean: list[float],
    std: list[float],
    batch_size: int,
    replicas: int,
    use_gpu: bool,
    cpus_per_replica: float,
) -> EvaluationResult:
    """Run every view through an actor pool of model replicas and reduce to per-video results."""
    scored = views.map_batches(
        ViewScorer,
        fn_constructor_kwargs={"model_reference": model_reference, "mean": mean, "std": std},
        batch_size=batch_size,
        compute=ray.data.ActorPoolStrategy(size=replicas),
        num_gpus=1 if use_gpu else 0,
        num_cpus=cpus_per_replica,
    )
    num_classes = len(loaded.labels)
    video_ids, labels, scores = average_views(scored.iter_batches(batch_size=None, batch_format="numpy"), num_classes)
    paths = [video_paths[i] for i in video_ids]
    return summarise(paths, labels, scores, num_classes)


@dataclass
class EvaluationReport:
    """An evaluation and what it could not use: videos excluded by probing and videos that failed to decode."""

    result: EvaluationResult
    excluded: list[tuple[str, str]]
    skipped: dict[str, str]
    loaded: LoadedModel
    run_id: str


def run_evaluation(cfg: DictConfig, explicit: set[str], base: Path) -> EvaluationReport:
    """K×S-view testing of a model on `data.test`, logged to a new MLflow run tagged with the training run."""
    reference = model_reference(cfg, base)
    loaded = load_model(**reference)
    settings = clip_settings(cfg, loaded, explicit)
    if not cfg.data.test:
        raise ValueError("data.test is not set (a manifest or an index of the videos to evaluate)")
    test_source = str((base / cfg.data.test).resolve())
    cached = Path(tempfile.mkdtemp(prefix="mvit-eval-")) / "test_index.parquet"
    root = str((base / cfg.data.root).resolve()) if cfg.data.root else None
    usable, excluded = read_usable(
        ensure_index(
            test_source, cached, root, cfg.data.allow_outside_root, cfg.data.cpus_per_task, cfg.data.decode_concurrency
        )
    )
    if usable.num_rows == 0:
        raise ValueError(f"data.test {test_source}: no usable videos ({len(excluded)} unusable)")
    counter_name = f"skips-eval-{uuid.uuid4().hex[:8]}"
    views = test_dataset(
        usable,
        num_frames=settings.num_frames,
        sampling_rate=settings.sampling_rate,
        target_fps=settings.target_fps,
        crop_size=settings.crop_size,
        short_side=settings.test_short_side,
        num_temporal_clips=cfg.data.test_clips,
        num_spatial_crops=cfg.data.test_crops,
        cpus_per_task=cfg.data.cpus_per_task,
        concurrency=cfg.data.decode_concurrency,
        resources=dict(cfg.data.decode_resources),
        skip_counter_name=counter_name,
    )
    evaluate = cfg.evaluate
    result = score_views(
        views,
        usable.column("path").to_pylist(),
        reference,
        loaded,
        mean=settings.mean,
        std=settings.std,
        batch_size=evaluate.batch_size,
        replicas=evaluate.replicas,
        use_gpu=evaluate.use_gpu,
        cpus_per_replica=evaluate.cpus_per_replica,
    )
    skipped = ray.get(skip_counter(counter_name).reasons.remote())
    run_id = log_evaluation(cfg, reference, loaded, result, excluded, skipped)
    return EvaluationReport(result, excluded, skipped, loaded, run_id)
