"""Training checkpoints: one `state.pt` per checkpoint directory, written atomically, read with weights_only.

A checkpoint directory holds everything a resume needs (model, optimizer, scaler, epoch, step, MLflow run id), and
its `model` entry makes the same file a native weights file for `mvit.load_pretrained(..., source="native")`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import ModelError

STATE_FILE = "state.pt"
FORMAT_VERSION = 1


class CheckpointError(ModelError):
    """A checkpoint that is missing, partial or not ours."""


def save_state(directory: str | Path, state: dict[str, Any]) -> Path:
    """Write `state` to `directory/state.pt` through a temporary file and an atomic rename.

    A crash mid-write leaves at most a `.tmp` file, which `load_state` never reads, so no checkpoint can load as
    valid while being partial.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / STATE_FILE
    partial = directory / (STATE_FILE + ".tmp")
    with open(partial, "wb") as handle:
        torch.save({"format_version": FORMAT_VERSION, **state}, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(partial, final)
    return final


def load_state(directory: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by `save_state`; tensors and plain containers only (weights_only=True)."""
    path = Path(directory) / STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"checkpoint {directory}: no {STATE_FILE} (incomplete or not a training checkpoint)")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # a torn or foreign file: say which one, not a pickle traceback
        raise CheckpointError(f"checkpoint {path}: unreadable ({type(error).__name__}: {error})") from None
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path}: not a format-{FORMAT_VERSION} training checkpoint")
    return state


def latest_checkpoint(storage_path: str, run_name: str) -> Path | None:
    """The newest Ray Train checkpoint folder of a run, found on disk (for evaluation with no model given)."""
    folders = sorted(
        (Path(storage_path) / run_name).glob("checkpoint_*/" + STATE_FILE),
        key=lambda p: p.stat().st_mtime,
    )
    return folders[-1].parent if folders else None
