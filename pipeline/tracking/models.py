"""Models in MLflow: logged with what inference needs to know, and loaded back without running anyone's code.

A model is logged in MLflow's PyTorch flavour as an exported program (pt2), so that `mlflow.pytorch.load_model`
works for any MLflow user at the training clip size, and carries two more things, the way torchvision's weights
carry their transforms: its weights (`extra_files/weights.pt`, a plain state dict) and a model card in the MLmodel
metadata (preset, classes, labels, clip settings, val metrics). This project loads the weights with
`weights_only=True` into the preset it builds itself, so a logged model takes any clip size, and nothing from the
registry is executed. A model in another format is refused with one line, unless the user opts in to pickle.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from omegaconf import OmegaConf
from torch import nn

import mvit
from pipeline.data.manifest import read_label_map
from pipeline.errors import ModelError

CARD_KEY = "mvit"  # the MLmodel metadata entry that holds the model card
CARD_FORMAT = 1
WEIGHTS_FILE = "weights.pt"
PICKLE_ENV = "MLFLOW_ALLOW_PICKLE_DESERIALIZATION"
CLIP_KEYS = ("num_frames", "sampling_rate", "target_fps", "crop_size", "test_short_side", "mean", "std")


@dataclass
class LoggedModel:
    """An MLflow model, the training run that logged it, its clip settings and labels."""

    module: nn.Module
    run_id: str | None
    data: dict[str, Any]  # clip settings (CLIP_KEYS)
    labels: list[str]
    input_size: tuple[int, int, int]


def model_card(
    model_name: str, labels: list[str], input_size: tuple[int, int, int], clip: dict, metrics: dict
) -> dict[str, Any]:
    """What a logged model says about itself: enough to build it, feed it and name its outputs."""
    return {
        "format": CARD_FORMAT,
        "model_name": model_name,
        "num_classes": len(labels),
        "input_size": list(input_size),
        "labels": list(labels),
        "clip": {key: clip[key] for key in CLIP_KEYS},
        "metrics": dict(metrics),
    }


def describe(card: dict[str, Any], run_id: str) -> str:
    clip, metrics = card["clip"], card["metrics"]
    frames, height, width = card["input_size"]
    shown = ", ".join(f"{key} {value:.4f}" for key, value in metrics.items() if isinstance(value, float))
    return (
        f"{card['model_name']} video classifier, {card['num_classes']} classes, trained on {frames}x{height}x{width} "
        f"clips ({clip['num_frames']} frames {clip['sampling_rate']} apart at {clip['target_fps']:g} fps, "
        f"test short side {clip['test_short_side']}); {shown}; training run {run_id}. Any clip size loads through "
        "this project (extra_files/weights.pt and the 'mvit' metadata); mlflow.pytorch.load_model gives the "
        "exported program at the training size."
    )


def log_pytorch_model(
    mlflow: Any, model: nn.Module, name: str, card: dict[str, Any], registered_model_name: str | None
) -> Any:
    """Log `model` as pt2 with its weights and card; returns MLflow's ModelInfo."""
    frames, height, width = card["input_size"]
    # Batch 2: torch.export specialises a dimension whose example size is 0 or 1.
    example = torch.zeros(2, 3, frames, height, width).numpy()
    with tempfile.TemporaryDirectory() as folder:
        weights = Path(folder) / WEIGHTS_FILE
        torch.save({key: value.detach().cpu() for key, value in model.state_dict().items()}, weights)
        return mlflow.pytorch.log_model(
            model.cpu().eval(),
            name=name,
            input_example=example,
            extra_files=[str(weights)],
            metadata={CARD_KEY: card},
            params={f"clip.{key}": str(value) for key, value in card["clip"].items()},
            # Given, not inferred: inference loads the model again in a subprocess (seconds, and a warning).
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}"],
            registered_model_name=registered_model_name,
            serialization_format="pt2",
        )


class _Exported(nn.Module):
    """An exported program's module: fixed to inference already, so `.eval()` (unsupported on it) is a no-op."""

    def __init__(self, graph: nn.Module) -> None:
        super().__init__()
        self.graph = graph

    def train(self, mode: bool = True) -> _Exported:
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.graph(x)


def load_logged_model(uri: str, tracking_uri: str | None, allow_pickle: bool) -> LoggedModel:
    """Load `runs:/ID/NAME` or `models:/NAME/VERSION` without executing code from the registry."""
    import mlflow

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a bar per file, for small files
    with tempfile.TemporaryDirectory() as folder:
        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=folder))
        except Exception as error:
            raise ModelError(f"MLflow model {uri}: {str(error).splitlines()[0]}") from None
        description = _read_mlmodel(local, uri)
        card = (description.get("metadata") or {}).get(CARD_KEY)
        if card is not None:
            return _from_card(local, card, uri, description.get("run_id"))
        return _from_flavour(local, description, uri, allow_pickle, mlflow)


def _read_mlmodel(local: Path, uri: str) -> dict[str, Any]:
    path = local / "MLmodel"
    if not path.is_file():
        raise ModelError(f"MLflow model {uri}: no MLmodel file (not an MLflow model)")
    return yaml.safe_load(path.read_text()) or {}


def _from_card(local: Path, card: dict[str, Any], uri: str, run_id: str | None) -> LoggedModel:
    if card.get("format") != CARD_FORMAT:
        raise ModelError(
            f"MLflow model {uri}: model card format {card.get('format')}, this version reads {CARD_FORMAT}"
        )
    try:
        state = torch.load(local / "extra_files" / WEIGHTS_FILE, map_location="cpu", weights_only=True)
        model = mvit.create_model(card["model_name"], num_classes=card["num_classes"], input_size=card["input_size"])
        model.load_state_dict(state)
    except Exception as error:
        raise ModelError(f"MLflow model {uri}: its weights do not load: {str(error).splitlines()[0]}") from None
    return LoggedModel(model.eval(), run_id, dict(card["clip"]), list(card["labels"]), tuple(card["input_size"]))


def _from_flavour(local: Path, description: dict, uri: str, allow_pickle: bool, mlflow: Any) -> LoggedModel:
    """A PyTorch model without this project's card: an exported program (no code runs), or, only when the user
    allowed it, a pickle. Clip settings and labels then come from the training run's config.yaml and labels.txt."""
    flavour = description.get("flavors", {}).get("pytorch")
    if flavour is None:
        raise ModelError(
            f"MLflow model {uri}: not a PyTorch model (flavours: {', '.join(description.get('flavors', {}))})"
        )
    data = local / flavour.get("model_data", "data")
    exported = (data / "model.pt2").is_file() and not flavour.get("code")
    if not exported and not allow_pickle:
        raise ModelError(
            f"MLflow model {uri}: stored as a pickle or with code files, which run code when loaded; refused "
            "(load it only if you trust who logged it, with allow_pickle=true)"
        )
    previous = os.environ.get(PICKLE_ENV)
    if not exported:
        os.environ[PICKLE_ENV] = "true"  # the user opted in (allow_pickle=true); MLflow refuses pickles otherwise
    try:
        module = mlflow.pytorch.load_model(str(local), map_location="cpu")
    except Exception as error:
        raise ModelError(f"MLflow model {uri}: {str(error).splitlines()[0]}") from None
    finally:
        if previous is None:
            os.environ.pop(PICKLE_ENV, None)
        else:
            os.environ[PICKLE_ENV] = previous
    if not isinstance(module, nn.Module):
        raise ModelError(f"MLflow model {uri}: loads as a {type(module).__name__}, not a PyTorch module")
    module = _Exported(module) if exported else module.eval()
    run_id = description.get("run_id")
    if not run_id:
        raise ModelError(f"MLflow model {uri}: no training run recorded, so no clip settings or labels")
    data_settings, labels = _run_settings(run_id, uri, mlflow)
    size = (data_settings["num_frames"], data_settings["crop_size"], data_settings["crop_size"])
    return LoggedModel(module, run_id, data_settings, labels, size)


def _run_settings(run_id: str, uri: str, mlflow: Any) -> tuple[dict[str, Any], list[str]]:
    client = mlflow.tracking.MlflowClient()
    with tempfile.TemporaryDirectory() as folder:
        try:
            config = Path(client.download_artifacts(run_id, "config.yaml", folder))
            labels = read_label_map(client.download_artifacts(run_id, "labels.txt", folder))
        except Exception as error:
            raise ModelError(f"MLflow model {uri}: its run {run_id} has no config.yaml/labels.txt ({error})") from None
        data = OmegaConf.to_container(OmegaConf.load(config).data)
    return data, labels
