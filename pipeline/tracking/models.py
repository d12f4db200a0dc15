"""Models logged to MLflow, loaded back with what the run knew about their input (clip settings, labels)."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from torch import nn

from pipeline.data.manifest import read_label_map
from pipeline.errors import ModelError


@dataclass
class LoggedModel:
    """An MLflow model, the training run that logged it, and that run's data settings and labels."""

    module: nn.Module
    run_id: str
    data: dict[str, Any]
    labels: list[str]


def load_logged_model(uri: str, tracking_uri: str | None) -> LoggedModel:
    """Load `runs:/ID/NAME` or `models:/NAME/VERSION`; its training run's config.yaml and labels.txt come with it."""
    import mlflow
    from mlflow.tracking import MlflowClient

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient()
    try:
        module = mlflow.pytorch.load_model(uri, map_location="cpu")
    except Exception as error:
        raise ModelError(f"MLflow model {uri}: {str(error).splitlines()[0]}") from None
    if uri.startswith("models:/"):
        name, version = uri[len("models:/") :].split("/", 1)
        run_id = client.get_model_version(name, version).run_id
    else:
        run_id = uri[len("runs:/") :].split("/", 1)[0]
    with tempfile.TemporaryDirectory() as folder:
        config = Path(client.download_artifacts(run_id, "config.yaml", folder))
        data = OmegaConf.to_container(OmegaConf.load(config).data)
        labels = read_label_map(client.download_artifacts(run_id, "labels.txt", folder))
    return LoggedModel(module, run_id, data, labels)
