"""One way to name a model everywhere: a Ray Train checkpoint folder, a native .pt file, an MLflow model URI, or a
torchvision / PySlowFast / pytorchvideo checkpoint. Each resolves to the module plus what inference needs to know.
Folders and files may be local or in object storage (`s3://...`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

import mvit
from pipeline import checkpoints, storage
from pipeline.errors import ModelError

FOREIGN_SOURCES = tuple(source for source in mvit.SOURCES if source != "native")


class ModelSourceError(ModelError):
    """A model reference that can't be loaded, with a one-line reason naming it."""


@dataclass(frozen=True)
class ModelReference:
    """What names a model: picklable, so model replicas on other nodes can load it themselves."""

    reference: str  # a checkpoint folder, a .pt file (local or a URI), or an MLflow model URI
    source: str = "auto"  # auto (checkpoint folder, native .pt or MLflow URI) or a foreign format
    model_name: str | None = None  # the preset, for checkpoints that don't name it
    labels: list[str] | None = None  # class names that replace the model's own
    tracking_uri: str | None = None  # where runs:/ and models:/ URIs are looked up
    allow_pickle: bool = False  # load pickle-format MLflow models, which run code when loaded


@dataclass
class LoadedModel:
    """A model ready for inference and the facts about its input that travel with it."""

    module: nn.Module
    labels: list[str]
    input_size: tuple[int, int, int]  # frames, height, width
    description: str
    training_run_id: str | None = None
    data: dict[str, Any] = field(default_factory=dict)  # the training config's data section, when known


def _why(error: Exception) -> str:
    """What a loading error says after "model NAME: ", in one line: a refused file's reason (the model's name
    already names the file), else the error's first line, or its type where it has no message (an EOFError)."""
    if isinstance(error, checkpoints.UnreadableTorchFile):
        return error.reason
    return next(iter(str(error).splitlines()), "") or type(error).__name__


def _checkpoint_head(checkpoint: Any, source: str, model_name: str, name: str) -> int:
    """The number of classes of a checkpoint's head: the network is built with the checkpoint's own head, never a
    guessed one that loading would silently re-initialise."""
    try:
        state = mvit.convert_state_dict(checkpoint, source, mvit.create_model(model_name))
    except ValueError as error:
        raise ModelSourceError(f"model {name}: {_why(error)}") from None
    head = state.get("head.weight")
    if head is None:
        raise ModelSourceError(f"model {name}: the checkpoint has no classifier head (head.weight)")
    return int(head.shape[0])


def _build(path: str, reference: ModelReference, source: str) -> mvit.MViT:
    """The preset with the checkpoint's weights, its head included; mvit's ValueErrors become one-line errors."""
    name = reference.reference
    try:
        checkpoint = checkpoints.read_torch_file(path)
    except Exception as error:
        raise ModelSourceError(f"model {name}: {_why(error)}") from None
    num_classes = _checkpoint_head(checkpoint, source, reference.model_name, name)
    if reference.labels and len(reference.labels) != num_classes:
        raise ModelSourceError(
            f"model {name}: its head has {num_classes} classes but the label map has {len(reference.labels)} names"
        )
    try:
        model = mvit.create_model(reference.model_name, num_classes=num_classes)
        return mvit.load_weights(model, checkpoint, source)
    except ValueError as error:
        raise ModelSourceError(f"model {name}: {_why(error)}") from None


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
    names = _labels_or_numbers(labels or state.get("labels"), state["num_classes"])
    data = dict(state.get("config", {}).get("data", {}))
    return LoadedModel(model.eval(), names, tuple(state["input_size"]), description, state.get("mlflow_run_id"), data)


def _from_mlflow(reference: ModelReference) -> LoadedModel:
    from pipeline.tracking.models import load_logged_model

    logged = load_logged_model(reference.reference, reference.tracking_uri, reference.allow_pickle)
    names = _labels_or_numbers(reference.labels, len(logged.labels)) if reference.labels else logged.labels
    return LoadedModel(logged.module, names, logged.input_size, reference.reference, logged.run_id, logged.data)


def _from_weights(path: str, reference: ModelReference, source: str) -> LoadedModel:
    """A foreign checkpoint or a bare state dict: the preset `model_name` with the checkpoint's own head."""
    if not reference.model_name:
        raise ModelSourceError(
            f"model {reference.reference}: a {'bare state dict' if source == 'native' else source + ' checkpoint'} "
            "needs model_name (e.g. model_name=mvit_b_16x4) to build the network"
        )
    model = _build(path, reference, source)
    labels = _labels_or_numbers(reference.labels, model.num_classes)
    return LoadedModel(model.eval(), labels, tuple(model.input_size), reference.reference)


def _checkpoints_near(path: str) -> str:
    """The checkpoints that do exist where `path` points (Ray names them by time, so a guessed name misses)."""
    for folder in (storage.parent(path), path):
        found = sorted(entry.name for entry in checkpoints.checkpoint_folders(folder))
        if found:
            shown = ", ".join(found[-5:])
            return f"; checkpoints in {storage.redact(folder)}: {shown}{' (newest last)' if len(found) > 1 else ''}"
    return ""


def load_model(reference: ModelReference) -> LoadedModel:
    """Load the model `reference` names."""
    if reference.reference.startswith(("runs:/", "models:/")):
        return _from_mlflow(reference)
    path = reference.reference
    found = storage.info(path)
    if found is None:
        name = storage.redact(reference.reference)
        raise ModelSourceError(f"model {name}: no such file or folder{_checkpoints_near(path)}")
    if reference.source in FOREIGN_SOURCES:
        return _from_weights(path, reference, reference.source)
    if reference.source not in ("auto", "native"):
        raise ModelSourceError(
            f"model source '{reference.source}' is not one of auto, native, {', '.join(FOREIGN_SOURCES)}"
        )
    is_dir = found.is_dir
    if is_dir and not storage.is_file(storage.join(path, checkpoints.STATE_FILE)):
        newest = checkpoints.latest_checkpoint(storage.parent(path), storage.name(path))  # a run: its newest one
        path = str(newest) if newest else path
    try:
        state = checkpoints.load_state(path) if is_dir else checkpoints.read_torch_file(path)
    except Exception as error:
        raise ModelSourceError(f"model {storage.redact(reference.reference)}: {_why(error)}") from None
    if isinstance(state, dict) and "model_name" in state:
        return _from_training_state(state, reference.reference, reference.labels)
    return _from_weights(path, reference, "native")
