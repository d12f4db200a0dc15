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
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.config import flatten
from pipeline.errors import ConfigError, TrackingError
from pipeline.secrets import redact, shown

if TYPE_CHECKING:
    from torch import nn

    from pipeline.training.job import TrainJob

log = logging.getLogger(__name__)

RUN_KEY_TAG = "mvit.run_key"
KIND_TAG = "mvit.kind"
MODELS_TAG = "mvit.models_logged"
EXPERIMENT_TAGS = {
    "mlflow.experimentKind": "custom_model_development",
    "mlflow.note.content": "MViT video classification on Ray: training runs (mvit.kind=training) and the "
    "evaluations of their models (mvit.kind=evaluation, mvit.evaluates=<training run id>).",
}
MAX_PARAM_LENGTH = 6000
CURVES = {"loss.png": ("train/loss", "val/loss"), "accuracy.png": ("val/top1", "val/top5")}
VAL_KEYS = ("val/top1", "val/top5", "val/loss")

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


def artifact_location(tracking_uri: str) -> str | None:
    """Where a new experiment keeps its artifacts: `mlruns/` beside an sqlite store (an absolute path, so that it
    never lands in a job's working directory, which `ray job submit` deletes); a server's own choice otherwise."""
    if tracking_uri.startswith("sqlite:///"):
        return (Path(tracking_uri[len("sqlite:///") :]).parent / "mlruns").resolve().as_uri()
    return None


def ensure_experiment(client: Any, tracking_uri: str, name: str) -> str:
    """The id of experiment `name`, created with an artifact location on the driver's terms and tagged as a
    model-training experiment (MLflow's UI otherwise opens it in GenAI mode)."""
    found = client.get_experiment_by_name(name)
    if found is None:
        return client.create_experiment(name, artifact_location=artifact_location(tracking_uri), tags=EXPERIMENT_TAGS)
    for key, value in EXPERIMENT_TAGS.items():
        if key not in found.tags:
            client.set_experiment_tag(found.experiment_id, key, value)
    return found.experiment_id


def get_or_create_run(tracking_uri: str, experiment: str, run_key: str, run_name: str) -> str:
    """The id of the one MLflow run of this training (tagged with `run_key`), created on first use.

    Called on the driver before the workers start, so a driver that dies and is run again finds the same run.
    """
    return _training_run(tracking_uri, experiment, run_key, run_name, reuse=True)


def create_run(
    tracking_uri: str, experiment: str, run_key: str, run_name: str, tags: dict[str, str] | None = None
) -> str:
    """A new MLflow training run named `run_name`, tagged with the run's storage key (and `tags`)."""
    return _training_run(tracking_uri, experiment, run_key, run_name, reuse=False, tags=tags)


def _training_run(
    tracking_uri: str, experiment: str, run_key: str, run_name: str, reuse: bool, tags: dict[str, str] | None = None
) -> str:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    try:
        experiment_id = ensure_experiment(client, tracking_uri, experiment)
        if reuse:
            escaped = run_key.replace("'", "\\'")
            found = client.search_runs([experiment_id], f"tags.`{RUN_KEY_TAG}` = '{escaped}'", max_results=1)
            if found:
                return found[0].info.run_id
        tags = {RUN_KEY_TAG: run_key, KIND_TAG: "training", **(tags or {})}
        return client.create_run(experiment_id, run_name=run_name, tags=tags).info.run_id
    except Exception as error:
        raise TrackingError(f"MLflow store {redact(tracking_uri)}: {_first_line(error)}") from None


def check_record(tracking_uri: str, run_id: str, models_expected: bool) -> None:
    """After training: the run's record is complete (closed as FINISHED, models logged if asked), else a
    `TrackingError`: a run whose metrics or models did not reach MLflow must not look like a success."""
    from mlflow.tracking import MlflowClient

    try:
        run = MlflowClient(tracking_uri).get_run(run_id)
    except Exception as error:
        raise TrackingError(f"MLflow run {run_id} cannot be checked: {_first_line(error)}") from None
    missing = []
    if run.info.status != "FINISHED":
        missing.append(f"it is {run.info.status}, not FINISHED (metrics or the end of the run were not written)")
    if models_expected and run.data.tags.get(MODELS_TAG) != "true":
        missing.append("its models were not logged")
    if missing:
        raise TrackingError(
            f"MLflow run {run_id} at {redact(tracking_uri)} is incomplete: {'; '.join(missing)}. The checkpoints are "
            "intact; the worker log says what the store answered"
        )


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"


class RunLogger:
    """Rank 0's handle on the run: params, committed metrics, artifacts and models.

    A store that stops answering (a database made read-only, a server down) must not cost metrics: those it did
    not take stay in the checkpoint's buffer and are offered again at the next commit, and `finish` retries them
    until the store answers or `retry_seconds` have passed.
    """

    def __init__(self, tracking_uri: str, run_id: str, system_metrics: bool, retry_seconds: float) -> None:
        import mlflow
        from mlflow.tracking import MlflowClient

        self._mlflow = mlflow
        self.client = MlflowClient(tracking_uri)
        self.tracking_uri, self.run_id, self.retry_seconds = tracking_uri, run_id, retry_seconds
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
            for key, _, step, _ in fresh[start : start + 1000]:
                self._last_step[key] = max(self._last_step.get(key, -1), step)
        return len(fresh)

    def commit_or_keep(self, metrics: list[Metric]) -> list[Metric]:
        """Commit `metrics`; if the store does not answer, keep them: returns the ones still to be logged."""
        try:
            self.commit(metrics)
            return []
        except Exception as error:
            log.warning(
                "MLflow store %s did not answer (%s): %d metrics kept for the next commit",
                redact(self.tracking_uri),
                _first_line(error),
                len(metrics),
            )
            return list(metrics)

    def log_text(self, text: str, artifact_file: str) -> None:
        self._mlflow.log_text(text, artifact_file)

    def log_curves(self) -> None:
        """Loss and accuracy curves as PNG, redrawn from the committed history."""
        with tempfile.TemporaryDirectory() as folder:
            for file_name, keys in CURVES.items():
                histories = {key: self.client.get_metric_history(self.run_id, key) for key in keys}
                draw_curves(histories, Path(folder) / file_name)
            self._mlflow.log_artifacts(folder, "curves")

    def finish(self, unsent: list[Metric], last_steps: Callable[[], None] | None = None) -> bool:
        """Log what is still unsent, run `last_steps` (e.g. logging models) and end the run FINISHED, retrying
        while the store does not answer, for up to `retry_seconds`. False if the record could not be completed:
        the driver then fails the job (see `check_record`)."""
        deadline, wait = time.monotonic() + self.retry_seconds, 1.0
        while True:
            try:
                self.commit(unsent)
                unsent = []
                if last_steps is not None:
                    last_steps()
                self._mlflow.end_run(status="FINISHED")
                return True
            except Exception as error:
                if time.monotonic() + wait > deadline:
                    log.error("MLflow run %s left incomplete: %s", self.run_id, _first_line(error))
                    return False
                log.warning("MLflow store did not answer (%s); retrying in %.0f s", _first_line(error), wait)
                time.sleep(wait)
                wait = min(wait * 2, 30.0)

    def close(self, status: str = "FINISHED") -> None:
        self._mlflow.end_run(status=status)


def draw_curves(histories: dict[str, list[Any]], path: Path) -> None:
    """One PNG of metric histories against their step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    for key, history in histories.items():
        points = sorted((m.step, m.value) for m in history)
        if points:
            axes.plot([step for step, _ in points], [value for _, value in points], label=key)
    axes.set_xlabel("step")
    axes.legend()
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


class TrainingLogger(RunLogger):
    """The run of one training: what it was given (params, config, labels, excluded videos) and what it made."""

    @classmethod
    def open(cls, job: TrainJob, run_id: str) -> TrainingLogger:
        """Reopen the run on rank 0; params and inputs are logged on its first start only."""
        settings = job.config.mlflow
        logger = cls(settings.tracking_uri, run_id, settings.system_metrics, settings.retry_seconds)
        logger.log_params_once(flatten(job.public_config))  # credentials removed, interpolations unresolved
        logger.log_text(job.config_yaml, "config.yaml")
        logger.log_text("\n".join(job.labels) + "\n", "labels.txt")
        if job.excluded:
            logger.log_text("".join(f"{path}\t{reason}\n" for path, reason in job.excluded), "excluded_videos.tsv")
        return logger

    def log_best_classes(self, confusion: np.ndarray, labels: list[str], epoch: int) -> None:
        """Per-class accuracy and the confusion matrix of the best epoch so far (replaced at each new best)."""
        from pipeline.tracking.evaluation import class_results

        with tempfile.TemporaryDirectory() as folder:
            class_results(confusion, labels, Path(folder))
            (Path(folder) / "epoch.txt").write_text(f"{epoch}\n")
            self._mlflow.log_artifacts(folder, "best_epoch")

    def log_models(self, model: nn.Module, best_state: dict | None, job: TrainJob) -> None:
        """The final and best models with their cards (labels, clip settings, val metrics) and a description;
        the best one registered if configured."""
        from pipeline.tracking.models import CLIP_KEYS

        settings = job.config.mlflow
        if not settings.log_models or self.client.get_run(self.run_id).data.tags.get(MODELS_TAG) == "true":
            return
        clip = {key: getattr(job.config.data, key) for key in CLIP_KEYS}
        final_metrics, best_metrics = self._val_metrics()
        model = model.to("cpu").eval()
        self._log_model(model, "model", job, clip, final_metrics, None)
        if best_state is not None:
            model.load_state_dict(best_state)
            self._log_model(model, "best_model", job, clip, best_metrics, settings.registered_model_name)
        self.client.set_tag(self.run_id, MODELS_TAG, "true")

    def _log_model(
        self, model: nn.Module, name: str, job: TrainJob, clip: dict, metrics: dict, registered: str | None
    ) -> None:
        from pipeline.tracking.models import describe, log_pytorch_model, model_card

        card = model_card(job.config.model.name, job.labels, job.input_size, clip, metrics)
        info = log_pytorch_model(self._mlflow, model, name, card, registered)
        description = describe(card, self.run_id)
        self.client.set_logged_model_tags(info.model_id, {"mlflow.note.content": description})
        numeric = {key: value for key, value in metrics.items() if isinstance(value, float)}
        if numeric:
            self._mlflow.log_metrics(numeric, step=int(metrics.get("step", 0)), model_id=info.model_id)
        version = getattr(info, "registered_model_version", None)
        if registered and version is not None:
            self.client.update_model_version(registered, str(version), description=description)
            if not self.client.get_registered_model(registered).description:
                self.client.update_registered_model(registered, description=description)

    def _val_metrics(self) -> tuple[dict[str, float], dict[str, float]]:
        """val/* at the last epoch and at the best (highest val/top1) epoch, with their step."""
        history = {key: {m.step: m.value for m in self.client.get_metric_history(self.run_id, key)} for key in VAL_KEYS}
        steps = sorted(history["val/top1"])
        if not steps:
            return {}, {}
        best = max(steps, key=lambda step: (history["val/top1"][step], -step))

        def at(step: int) -> dict[str, float]:
            return {"step": step, **{key: values[step] for key, values in history.items() if step in values}}

        return at(steps[-1]), at(best)


def end_run(tracking_uri: str, run_id: str, status: str) -> None:
    """Mark the run ended from outside it (the driver, after its workers failed); MLflow keeps it resumable."""
    from mlflow.tracking import MlflowClient

    MlflowClient(tracking_uri).set_terminated(run_id, status)


def now_ms() -> int:
    return int(time.time() * 1000)
