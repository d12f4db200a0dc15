"""All MLflow code: training runs (params, metrics committed with checkpoints, artifacts, models) and evaluations.

Nothing else in the project imports mlflow, so what a run holds is decided here.
"""

from pipeline.tracking.continuation import continue_run, credentials_to_environment
from pipeline.tracking.runs import (
    Metric,
    RunLogger,
    TrainingLogger,
    check_record,
    create_run,
    end_run,
    ensure_experiment,
    get_or_create_run,
    now_ms,
    redact,
    resolve_tracking_uri,
    safe_params,
)

__all__ = [
    "Metric",
    "RunLogger",
    "TrainingLogger",
    "check_record",
    "continue_run",
    "create_run",
    "credentials_to_environment",
    "end_run",
    "ensure_experiment",
    "get_or_create_run",
    "now_ms",
    "redact",
    "resolve_tracking_uri",
    "safe_params",
]
