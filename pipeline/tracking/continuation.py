"""The MLflow run of a training command: a new named run, or the run its checkpoint was logging to.

A checkpoint carries the id of its MLflow run. Resuming reopens that run when the store still has it. When the store
was lost or recreated (the id is unknown), the resumed run is a new MLflow run tagged with the old id and step. So
is a branch: a resume from a chosen older checkpoint of a run that went on past it (MLflow keeps one line of steps
per run, and the branch's steps must not hide behind the ones the old run already holds). Continuing the latest
checkpoint that loads, after a newer one broke, is no branch: as after a worker restart, the steps done again are
not logged twice.
"""

from __future__ import annotations

import os
from urllib.parse import unquote, urlsplit

from pipeline.secrets import redact
from pipeline.tracking.runs import create_run

RESUMED_FROM_TAG = "mvit.resumed_from_run_id"
RESUMED_AT_STEP_TAG = "mvit.resumed_at_step"


def credentials_to_environment(tracking_uri: str) -> str:
    """The URI without `user:password@`, whose credentials go to MLflow's own environment variables instead, so that
    MLflow never prints them (it echoes its tracking URI in "View run" links)."""
    parts = urlsplit(tracking_uri)
    if parts.scheme not in ("http", "https") or (parts.username is None and parts.password is None):
        return tracking_uri
    os.environ["MLFLOW_TRACKING_USERNAME"] = unquote(parts.username or "")
    os.environ["MLFLOW_TRACKING_PASSWORD"] = unquote(parts.password or "")
    return redact(tracking_uri)


def _last_step(client, run_id: str) -> int | None:
    """The last train/loss step of `run_id`; None when the store does not have the run."""
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
    except MlflowException:
        return None
    if run.info.lifecycle_stage == "deleted":
        return None
    return max((metric.step for metric in client.get_metric_history(run_id, "train/loss")), default=0)


def continue_run(
    tracking_uri: str,
    experiment: str,
    run_key: str,
    run_name: str,
    previous: str | None,
    step: int,
    branch: bool,
) -> tuple[str, str | None]:
    """The run to continue a checkpoint of MLflow run `previous` at `step` in, and a note if it is a new one;
    `branch`: the checkpoint was chosen by path, and a run that went past it is not continued."""
    from mlflow.tracking import MlflowClient

    last = _last_step(MlflowClient(tracking_uri), previous) if previous else None
    if last is not None and (last <= step or not branch):
        return previous, None
    tags = {RESUMED_FROM_TAG: previous or "", RESUMED_AT_STEP_TAG: str(step)}
    run_id = create_run(tracking_uri, experiment, run_key, run_name, tags)
    if last is None:
        store = redact(tracking_uri)
        why = f"MLflow run {previous} of the checkpoint is not in the store at {store} (lost or recreated)"
    else:
        why = f"MLflow run {previous} went on past the checkpoint's step {step} (to step {last})"
    return run_id, f"{why}: continuing in a new MLflow run {run_id}, tagged {RESUMED_FROM_TAG}={previous}"
