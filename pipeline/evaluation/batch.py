"""Multi-view testing as Ray Data batch inference: model replicas in an actor pool score every view of every video,
and the driver averages the softmax scores of each video's views, as the paper's K×S testing does."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import ray
import torch

from pipeline import storage
from pipeline.config import EvaluationJobConfig
from pipeline.data.dataset import DecodeTasks, test_dataset
from pipeline.data.index import default_cache_dir, ensure_index, read_usable, require_usable
from pipeline.data.manifest import label_map_path, read_label_map
from pipeline.data.skips import skip_counter
from pipeline.data.transforms import Normalise
from pipeline.errors import DataError
from pipeline.evaluation.loading import LoadedModel, ModelReference, load_model
from pipeline.evaluation.metrics import EvaluationResult, average_views, summarise
from pipeline.evaluation.views import ClipSettings, clip_settings, model_reference
from pipeline.precision import autocast, resolve_precision
from pipeline.progress import Progress
from pipeline.tracking.evaluation import log_evaluation


class ViewScorer:
    """One model replica (a Ray Data actor): uint8 views in, softmax scores out, in the configured precision."""

    def __init__(self, reference: ModelReference, mean: list[float], std: list[float], precision: str) -> None:
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = load_model(reference).module.to(self.device).eval()
        self.normalise = Normalise(mean, std, self.device)
        self.precision = resolve_precision(precision, self.device)

    @torch.inference_mode()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        clips = self.normalise(torch.from_numpy(np.ascontiguousarray(batch["clip"])))
        with autocast(self.precision, self.device):
            logits = self.model(clips)
        scores = torch.softmax(logits.float(), dim=-1).cpu().numpy()
        return {"video_id": batch["video_id"], "label": batch["label"], "scores": scores}


def score_views(
    views: ray.data.Dataset,
    video_paths: list[str],
    reference: ModelReference,
    loaded: LoadedModel,
    settings: ClipSettings,
    cfg: EvaluationJobConfig,
) -> EvaluationResult:
    """Run every view through an actor pool of model replicas and reduce to per-video results."""
    evaluate = cfg.evaluate
    scored = views.map_batches(
        ViewScorer,
        fn_constructor_kwargs={
            "reference": reference,
            "mean": settings.mean,
            "std": settings.std,
            "precision": evaluate.precision,
        },
        batch_size=evaluate.batch_size,
        compute=ray.data.ActorPoolStrategy(size=evaluate.replicas),
        num_gpus=1 if evaluate.use_gpu else 0,
        num_cpus=evaluate.cpus_per_replica,
    )
    num_classes = len(loaded.labels)
    progress = Progress("evaluating", len(video_paths) * cfg.data.test_clips * cfg.data.test_crops, "views")
    video_ids, labels, scores = average_views(_counted(scored, progress), num_classes)
    paths = [video_paths[i] for i in video_ids]
    return summarise(paths, labels, scores, num_classes)


def _counted(scored: ray.data.Dataset, progress: Progress) -> Iterator[dict[str, np.ndarray]]:
    for batch in scored.iter_batches(batch_size=None, batch_format="numpy"):
        progress.advance(len(batch["video_id"]))
        yield batch


@dataclass
class EvaluationReport:
    """An evaluation and what it could not use: videos excluded by probing and videos that failed to decode."""

    result: EvaluationResult
    excluded: list[tuple[str, str]]
    skipped: dict[str, str]
    loaded: LoadedModel
    run_id: str


def run_evaluation(cfg: EvaluationJobConfig, explicit: set[str], base: Path) -> EvaluationReport:
    """K×S-view testing of a model on `data.test`, logged to a new MLflow run tagged with the training run."""
    reference = model_reference(cfg, base)
    loaded = load_model(reference)
    settings = clip_settings(cfg, loaded, explicit)
    if not cfg.data.test:
        raise DataError("data.test is not set (a manifest or an index of the videos to evaluate)")
    data = cfg.data
    test_source = storage.absolute(data.test, base)
    labels_path = _label_map(cfg, base, test_source, loaded)
    source = ensure_index(
        test_source,
        storage.absolute(data.index_cache, base) if data.index_cache else default_cache_dir(),
        storage.absolute(data.root, base) if data.root else None,
        data.allow_outside_root,
        labels_path,
        data.cpus_per_task,
        data.decode_concurrency,
    )
    usable, excluded = read_usable(source)
    shown = storage.redact(test_source)
    require_usable(usable, excluded, f"data.test {shown}")
    past = pc.max(usable.column("label")).as_py()
    if past >= len(loaded.labels):
        raise DataError(f"data.test {shown}: label {past} is past the model's {len(loaded.labels)} classes")
    tasks = DecodeTasks(
        cpus=data.cpus_per_task,
        concurrency=data.decode_concurrency,
        resources=dict(data.decode_resources),
        videos_per_task=cfg.evaluate.videos_per_task,
        skip_counter=f"skips-eval-{uuid.uuid4().hex[:8]}",
    )
    views = test_dataset(
        usable,
        spec=settings.spec,
        transform=settings.transform(data.test_crops),
        num_clips=data.test_clips,
        tasks=tasks,
    )
    result = score_views(views, usable.column("path").to_pylist(), reference, loaded, settings, cfg)
    skipped = skip_counter(tasks.skip_counter).reasons()
    run_id = log_evaluation(cfg, reference, loaded, result, excluded, skipped)
    return EvaluationReport(result, excluded, skipped, loaded, run_id)


def _label_map(cfg: EvaluationJobConfig, base: Path, test_source: str, loaded: LoadedModel) -> str | None:
    """The label map that resolves the test manifest's class names: `labels`, else `data.labels`, else the one
    beside the manifest. It must name the model's classes, or the figures would compare different classes."""
    given = cfg.labels or cfg.data.labels
    path = storage.absolute(given, base) if given else label_map_path(test_source)
    if not storage.is_file(path):
        return None
    names = read_label_map(path)
    if len(names) != len(loaded.labels) or (names != loaded.labels and not _numbered(loaded.labels)):
        raise DataError(
            f"label map {storage.redact(path)} ({len(names)} names) is not the model's ({len(loaded.labels)} classes"
            f"{', other names' if len(names) == len(loaded.labels) else ''}); pass labels=PATH to name its classes"
        )
    return path


def _numbered(labels: list[str]) -> bool:
    """Labels that are only class numbers: a model that carried no names."""
    return labels == [str(i) for i in range(len(labels))]
