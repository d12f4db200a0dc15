"""One way to name a model everywhere: a Ray Train checkpoint folder, a native .pt file, an MLflow model URI, or a
torchvision / PySlowFast / pytorchvideo checkpoint. Each resolves to the module plus what inference needs to know."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import mvit
from pipeline import checkpoints
from pipeline.errors import ModelError

FOREIGN_SOURCES = tuple(source for source in mvit.SOURCES if source != "native")


class ModelSourceError(ModelError):
    """A model reference that can't be loaded, with a one-line reason naming it."""


@dataclass(frozen=True)
class ModelReference:
    """What names a model: picklable, so model replicas on other nodes can load it themselves."""

    reference: str  # a checkpoint folder, a .pt file, or an MLflow model URI
    source: str = "auto"  # auto (checkpoint folder, native .pt or MLflow URI) or a foreign format
    model_name: str | None = None  # the preset, for checkpoints that don't name it
    labels: list[str] | None = None  # class names that replace the model's own
    tracking_uri: str | None = None  # where runs:/ and models:/ URIs are looked up


@dataclass
class LoadedModel:
    """A model ready for inference and the facts about its input that travel with it."""

    module: nn.Module
    labels: list[str]
    input_size: tuple[int, int, int]  # frames, height, width
    description: str
    training_run_id: str | None = None
    data: dict[str, Any] = field(default_factory=dict)  # the training config's data section, when known


def _build(model_name: str, path: Path, source: str, **overrides: Any) -> mvit.MViT:
    """A preset with the weights of `path` loaded; mvit's ValueErrors become one-line model errors naming the file."""
    try:
        model = mvit.create_model(model_name, **overrides)
        return mvit.load_pretrained(model, path, source=source)
    except ValueError as error:
        raise ModelSourceError(str(error).splitlines()[0]) from None


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
    if "pool_norm_eps" in state:  # checkpoints before this field were all trained at the preset's eps
        model.set_pool_norm_eps(state["pool_norm_eps"])
    model.load_state_dict(state["model"])
    names = list(labels or state.get("labels") or _labels_or_numbers(None, state["num_classes"]))
    data = dict(state.get("config", {}).get("data", {}))
    return LoadedModel(model.eval(), names, tuple(state["input_size"]), description, state.get("mlflow_run_id"), data)


def _from_mlflow(reference: ModelReference) -> LoadedModel:
    from pipeline.tracking.models import load_logged_model

    logged = load_logged_model(reference.reference, reference.tracking_uri)
    data = logged.data
    input_size = (data["num_frames"], data["crop_size"], data["crop_size"])
    names = list(reference.labels or logged.labels)
    return LoadedModel(logged.module.eval(), names, input_size, reference.reference, logged.run_id, data)


def _from_foreign(path: Path, reference: ModelReference) -> LoadedModel:
    if not reference.model_name:
        raise ModelSourceError(
            f"model {reference.reference}: a {reference.source} checkpoint needs model_name (e.g. mvit_b_16x4)"
        )
    num_classes = len(reference.labels) if reference.labels else 400
    model = _build(reference.model_name, path, reference.source, num_classes=num_classes)
    labels = _labels_or_numbers(reference.labels, num_classes)
    return LoadedModel(model.eval(), labels, tuple(model.input_size), reference.reference)


def load_model(reference: ModelReference) -> LoadedModel:
    """Load the model `reference` names."""
    if reference.reference.startswith(("runs:/", "models:/")):
        return _from_mlflow(reference)
    path = Path(reference.reference)
    if not path.exists():
        raise ModelSourceError(f"model {reference.reference}: no such file or folder")
    if reference.source in FOREIGN_SOURCES:
        return _from_foreign(path, reference)
    if reference.source not in ("auto", "native"):
        raise ModelSourceError(
            f"model source '{reference.source}' is not one of auto, native, {', '.join(FOREIGN_SOURCES)}"
        )
    try:
        state = (
            checkpoints.load_state(path) if path.is_dir() else torch.load(path, map_location="cpu", weights_only=True)
        )
    except Exception as error:
        raise ModelSourceError(f"model {reference.reference}: {str(error).splitlines()[0]}") from None
    if isinstance(state, dict) and "model_name" in state:
        return _from_training_state(state, reference.reference, reference.labels)
    if not reference.model_name:
        raise ModelSourceError(f"model {reference.reference}: a bare state dict needs model_name to build the network")
    num_classes = len(reference.labels) if reference.labels else None
    model = _build(reference.model_name, path, "native", num_classes=num_classes)
    labels = _labels_or_numbers(reference.labels, model.num_classes)
    return LoadedModel(model.eval(), labels, tuple(model.input_size), reference.reference)
