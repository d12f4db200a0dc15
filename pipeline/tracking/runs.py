"""Training runs in MLflow: one run per training, metrics committed with checkpoints, artifacts and models from rank 0.

Why metrics go through a buffer: after a worker dies, training resumes from the last checkpoint and repeats the
steps after it. Metrics are therefore logged only once the checkpoint that covers their step is committed; the
buffer travels inside the checkpoint, and a resumed run logs only what MLflow does not hold yet. So no step is lost
and none is logged twice with different values.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.config import flatten
from pipeline.errors import ConfigError
from pipeline.secrets import redact, shown  # noqa: F401  (redact: re-exported by pipeline.tracking)

if TYPE_CHECKING:
    from torch import nn

    from pipeline.training.job import TrainJob

log = logging.getLogger(__name__)

RUN_KEY_TAG = "mvit.run_key"
MAX_PARAM_LENGTH = 6000
CURVES = {"loss.png": ("train/loss", "val/loss"), "accuracy.png": ("val/top1", "val/top5")}

Metric = tuple[str, float, int, int]  # key, value, step, timestamp (ms)


def resolve_tracking_uri(uri: str, base: Path) -> str:
    """Make a relative sqlite path absolute (Ray workers run elsewhere); refuse `file:` stores."""
    if uri.startswith("file:") or "://" not in uri:
        raise ConfigError(f"mlflow.tracking_uri '{uri}': file stores are not supported; use sqlite:/// or http://")
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{(base / uri[len('sqlite:///') :]).resolve()}"
    return uri


def safe_params(flat_config: dict[str, Any]) -> dict[str, str]:
    """MLflow params from a flat config: credentials stripped from URIs, secret-named keys masked."""
    params = {}
    for key, value in flat_config.items():
        params[key] = str(shown(key, value))[:MAX_PARAM_LENGTH]
    return params


def get_or_create_run(tracking_uri: str, experiment: str, run_key: str, run_name: str) -> str:
    """The id of the one MLflow run of this training (tagged with `run_key`), created on first use.

    Called on the driver before the workers start, so a driver that dies and is run again finds the same run.
    """
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found else client.create_experiment(experiment)
    escaped = run_key.replace("'", "\\'")
    runs = client.search_runs([experiment_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{escaped}'", max_results=1)
    if runs:
        return runs[0].info.run_id
    return client.create_run(experiment_id, run_name=run_name, tags={RUN_KEY_TAG: run_key}).info.run_id


class RunLogger:
    """Rank 0's handle on the run: params, committed metrics, artifacts and models."""

    def __init__(self, tracking_uri: str, run_id: str, system_metrics: bool) -> None:
        import mlflow
        from mlflow.tracking import MlflowClient

        self._mlflow = mlflow
        self.client = MlflowClient(tracking_uri)
        self.run_id = run_id
        mlflow.set_tracking_uri(tracking_uri)
        mlflow.start_run(run_id=run_id, log_system_metrics=system_metrics)
        self._last_step: dict[str, int] = {}

    def log_params_once(self, flat_config: dict[str, Any]) -> None:
        """Params are immutable in MLflow: log them on the first start only."""
        if self.client.get_run(self.run_id).data.params:
            return
        items = list(safe_params(flat_config).items())
        for start in range(0, len(items), 100):
            self._mlflow.log_params(dict(items[start : start + 100]))

    def _last_logged_step(self, key: str) -> int:
        if key not in self._last_step:
            history = self.client.get_metric_history(self.run_id, key)
            self._last_step[key] = max((m.step for m in history), default=-1)
        return self._last_step[key]

    def commit(self, metrics: Iterable[Metric]) -> int:
        """Log buffered metrics whose step MLflow does not hold yet; returns how many were logged."""
        from mlflow.entities import Metric as MlflowMetric

        fresh = [m for m in metrics if m[2] > self._last_logged_step(m[0])]
        for start in range(0, len(fresh), 1000):
            batch = [MlflowMetric(k, float(v), ts, step) for k, v, step, ts in fresh[start : start + 1000]]
            self.client.log_batch(self.run_id, metrics=batch)
        for key, _, step, _ in fresh:
            self._last_step[key] = max(self._last_step.get(key, -1), step)
        return len(fresh)

    def log_text(self, text: str, artifact_file: str) -> None:
        self._mlflow.log_text(text, artifact_file)

    def log_curves(self) -> None:
        """Loss and accuracy curves as PNG, redrawn from the committed history."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        with tempfile.TemporaryDirectory() as folder:
            for file_name, keys in CURVES.items():
                figure, axes = plt.subplots(figsize=(6, 4))
                for key in keys:
                    history = sorted(self.client.get_metric_history(self.run_id, key), key=lambda m: m.step)
                    if history:
                        axes.plot([m.step for m in history], [m.value for m in history], label=key)
                axes.set_xlabel("step")
                axes.legend()
                axes.grid(alpha=0.3)
                figure.tight_layout()
                figure.savefig(Path(folder) / file_name, dpi=100)
                plt.close(figure)
            self._mlflow.log_artifacts(folder, "curves")

    def log_model(self, model: Any, name: str, input_example: Any, registered_model_name: str | None) -> None:
        """An MLflow PyTorch model; pt2 (torch.export) first, pickle if the model does not export."""
        try:
            self._mlflow.pytorch.log_model(
                model, name=name, input_example=input_example, registered_model_name=registered_model_name
            )
        except Exception as error:  # torch.export is stricter than eager; a logged model beats none
            log.warning(
                "pt2 export of %s failed (%s: %s); logging it in pickle format",
                name,
                type(error).__name__,
                str(error).splitlines()[0] if str(error) else "",
            )
            self._mlflow.pytorch.log_model(
                model,
                name=name,
                input_example=input_example,
                registered_model_name=registered_model_name,
                serialization_format="pickle",
            )

    def close(self, status: str = "FINISHED") -> None:
        self._mlflow.end_run(status=status)


class TrainingLogger(RunLogger):
    """The run of one training: what it was given (params, config, labels, excluded videos) and what it made."""

    @classmethod
    def open(cls, job: TrainJob, run_id: str) -> TrainingLogger:
        """Reopen the run on rank 0; params and inputs are logged on its first start only."""
        logger = cls(job.config.mlflow.tracking_uri, run_id, job.config.mlflow.system_metrics)
        logger.log_params_once(flatten(job.public_config))  # credentials removed, interpolations unresolved
        logger.log_text(job.config_yaml, "config.yaml")
        logger.log_text("\n".join(job.labels) + "\n", "labels.txt")
        if job.excluded:
            logger.log_text("".join(f"{path}\t{reason}\n" for path, reason in job.excluded), "excluded_videos.tsv")
        return logger

    def log_models(self, model: nn.Module, best_state: dict | None, job: TrainJob) -> None:
        """The final and best models, each with an input example; the best one registered if configured."""
        settings = job.config.mlflow
        if not settings.log_models:
            return
        if self.client.get_run(self.run_id).data.tags.get("mvit.models_logged") == "true":
            return
        frames, height, width = job.input_size
        # Batch 2: torch.export specialises a dimension whose example size is 0 or 1.
        example = np.zeros((2, 3, frames, height, width), dtype=np.float32)
        final = model.to("cpu").eval()
        self.log_model(final, "model", example, None)
        if best_state is not None:
            final.load_state_dict(best_state)
            self.log_model(final, "best_model", example, settings.registered_model_name)
        self.client.set_tag(self.run_id, "mvit.models_logged", "true")


def end_run(tracking_uri: str, run_id: str, status: str) -> None:
    """Mark the run ended from outside it (the driver, after its workers failed); MLflow keeps it resumable."""
    from mlflow.tracking import MlflowClient

    MlflowClient(tracking_uri).set_terminated(run_id, status)


def now_ms() -> int:
    return int(time.time() * 1000)
