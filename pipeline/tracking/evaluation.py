"""An evaluation's MLflow run: metrics, per-video predictions (Parquet), confusion matrix (PNG), per-class accuracy."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from pipeline.config import EvaluationJobConfig
from pipeline.tracking.runs import KIND_TAG, ensure_experiment, redact, resolve_tracking_uri

if TYPE_CHECKING:
    from pipeline.evaluation.loading import LoadedModel, ModelReference
    from pipeline.evaluation.metrics import EvaluationResult

EVALUATES_TAG = "mvit.evaluates"


def _confusion_png(matrix: np.ndarray, labels: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    size = min(4 + 0.25 * len(labels), 40)
    figure, axes = plt.subplots(figsize=(size, size))
    axes.imshow(matrix, cmap="Blues")
    if len(labels) <= 50:
        axes.set_xticks(range(len(labels)), labels, rotation=90, fontsize=7)
        axes.set_yticks(range(len(labels)), labels, fontsize=7)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def class_results(confusion: np.ndarray, labels: list[str], folder: Path) -> None:
    """`per_class_accuracy.csv` (class, accuracy, videos) and `confusion_matrix.png` of a confusion matrix
    (rows: true class, columns: predicted), written to `folder`: the same files for evaluations and training."""
    videos = confusion.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        accuracy = np.where(videos > 0, np.diag(confusion) / np.maximum(videos, 1), np.nan)
    per_class = pa.table({"class": labels, "accuracy": accuracy, "videos": videos})
    pa_csv.write_csv(per_class, folder / "per_class_accuracy.csv")
    _confusion_png(confusion, labels, folder / "confusion_matrix.png")


def log_evaluation(
    cfg: EvaluationJobConfig,
    reference: ModelReference,
    loaded: LoadedModel,
    result: EvaluationResult,
    excluded: list[tuple[str, str]],
    skipped: dict[str, str],
) -> str:
    """Log to a new run in the experiment, tagged with the training run it measures; returns its id."""
    import mlflow

    tracking_uri = resolve_tracking_uri(cfg.mlflow.tracking_uri, Path.cwd())
    mlflow.set_tracking_uri(tracking_uri)
    experiment_id = ensure_experiment(mlflow.tracking.MlflowClient(tracking_uri), tracking_uri, cfg.mlflow.experiment)
    tags = {KIND_TAG: "evaluation"}
    if loaded.training_run_id:
        tags[EVALUATES_TAG] = loaded.training_run_id
    name = f"evaluate-{Path(str(loaded.description)).name}"
    with mlflow.start_run(experiment_id=experiment_id, run_name=name, tags=tags) as run:
        mlflow.log_params(
            {
                "model": redact(reference.reference),
                "model_source": reference.source,
                "data.test": cfg.data.test,
                "data.test_clips": cfg.data.test_clips,
                "data.test_crops": cfg.data.test_crops,
            }
        )
        mlflow.log_metrics(
            {
                "test/top1": result.top1,
                "test/top5": result.top5,
                "test/mean_class_accuracy": result.mean_class_accuracy,
                "test/videos": result.videos,
                "test/excluded": len(excluded),
                "test/skipped": len(skipped),
            }
        )
        with tempfile.TemporaryDirectory() as folder:
            folder = Path(folder)
            names = pa.array([loaded.labels[i] for i in result.predictions.column("prediction").to_pylist()])
            pq.write_table(result.predictions.append_column("prediction_name", names), folder / "predictions.parquet")
            class_results(result.confusion, loaded.labels, folder)
            unusable = [f"{path}\t{reason}" for path, reason in excluded + sorted(skipped.items())]
            (folder / "unusable_videos.tsv").write_text("\n".join(unusable) + ("\n" if unusable else ""))
            mlflow.log_artifacts(str(folder))
        return run.info.run_id
