"""One way to name a model everywhere: a Ray Train checkpoint folder, a native .pt file, an MLflow model URI, or a
torchvision / PySlowFast / pytorchvideo checkpoint. Each resolves to the module plus what inference needs to know."""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn

import mvit
from pipeline import checkpointing
from pipeline.manifest import read_label_map

FOREIGN_SOURCES = tuple(source for source in mvit.SOURCES if source != "native")


class ModelSourceError(ValueError):
    """A model reference that can't be loaded, with a one-line reason naming it."""


@dataclass
class LoadedModel:
    """A model ready for inference and the facts about its input that travel with it."""

    module: nn.Module
    labels: list[str]
    input_size: tuple[int, int, int]  # frames, height, width
    description: str
    training_run_id: str | None = None
    data: dict[str, Any] = field(default_factory=dict)  # the training config's data section, when known


def _labels_or_numbers(labels: Sequence[str] | None, num_classes: int) -> list[str]:
    if labels:
        if len(labels) != num_classes:
            raise ModelSourceError(f"label map has {len(labels)} names but the model has {num_classes} classes")
        return list(labels)
    return [str(i) for i in range(num_classes)]


def _from_training_state(state: dict[str, Any], description: str, labels: Sequence[str] | None) -> LoadedModel:
    model = mvit.create_model(
        state["model_name"], num_classes=state["num_classes"], input_size=tuple(state["input_size"])
    )
    model.load_state_dict(state["model"])
    return LoadedModel(
        model.eval(),
        list(labels or state.get("labels") or _labels_or_numbers(None, state["num_classes"])),
        tuple(state["input_size"]),
        description,
        state.get("mlflow_run_id"),
        dict(state.get("config", {}).get("data", {})),
    )


def _from_mlflow(uri: str, labels: Sequence[str] | None, tracking_uri: str | None) -> LoadedModel:
    import mlflow
    from mlflow.tracking import MlflowClient

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient()
    try:
        module = mlflow.pytorch.load_model(uri, map_location="cpu")
    except Exception as error:
        raise ModelSourceError(f"MLflow model {uri}: {str(error).splitlines()[0]}") from None
    if uri.startswith("models:/"):
        name, version = uri[len("models:/") :].split("/", 1)
        run_id = client.get_model_version(name, version).run_id
    else:
        run_id = uri[len("runs:/") :].split("/", 1)[0]
    with tempfile.TemporaryDirectory() as folder:
        config = Path(client.download_artifacts(run_id, "config.yaml", folder))
        data = OmegaConf.to_container(OmegaConf.load(config).data)
        names = labels or read_label_map(client.download_artifacts(run_id, "labels.txt", folder))
    input_size = (data["num_frames"], data["crop_size"], data["crop_size"])
    return LoadedModel(module.eval(), list(names), input_size, uri, run_id, data)


def load_model(
    reference: str,
    *,
    source: str = "auto",
    model_name: str | None = None,
    labels: Sequence[str] | None = None,
    input_size: Sequence[int] | None = None,
    tracking_uri: str | None = None,
) -> LoadedModel:
    """Load `reference`; `source` is auto (checkpoint folder, native .pt or MLflow URI) or a foreign format."""
    if reference.startswith(("runs:/", "models:/")):
        return _from_mlflow(reference, labels, tracking_uri)
    path = Path(reference)
    if not path.exists():
        raise ModelSourceError(f"model {reference}: no such file or folder")
    if source in FOREIGN_SOURCES:
        if not model_name:
            raise ModelSourceError(f"model {reference}: a {source} checkpoint needs model_name (e.g. mvit_b_16x4)")
        num_classes = len(labels) if labels else 400
        overrides = {"input_size": tuple(input_size)} if input_size else {}
        model = mvit.create_model(model_name, num_classes=num_classes, **overrides)
        mvit.load_pretrained(model, path, source=source)
        return LoadedModel(model.eval(), _labels_or_numbers(labels, num_classes), tuple(model.input_size), reference)
    if source not in ("auto", "native"):
        raise ModelSourceError(f"model source '{source}' is not one of auto, native, {', '.join(FOREIGN_SOURCES)}")
    try:
        state = (
            checkpointing.load_state(path) if path.is_dir() else torch.load(path, map_location="cpu", weights_only=True)
        )
    except Exception as error:
        raise ModelSourceError(f"model {reference}: {str(error).splitlines()[0]}") from None
    if isinstance(state, dict) and "model_name" in state:
        return _from_training_state(state, reference, labels)
    if not model_name:
        raise ModelSourceError(f"model {reference}: a bare state dict needs model_name to build the network")
    num_classes = len(labels) if labels else None
    overrides = {"input_size": tuple(input_size)} if input_size else {}
    model = mvit.create_model(model_name, num_classes=num_classes, **overrides)
    mvit.load_pretrained(model, path, source="native")
    return LoadedModel(model.eval(), _labels_or_numbers(labels, model.num_classes), tuple(model.input_size), reference)


def latest_checkpoint(storage_path: str, run_name: str) -> Path | None:
    """The newest Ray Train checkpoint folder of a run, found on disk (for `jobs.predict` with no model given)."""
    folders = sorted(
        (Path(storage_path) / run_name).glob("checkpoint_*/" + checkpointing.STATE_FILE),
        key=lambda p: p.stat().st_mtime,
    )
    return folders[-1].parent if folders else None
