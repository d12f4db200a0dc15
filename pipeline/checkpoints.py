"""Training checkpoints: one `state.pt` per checkpoint directory, written atomically, read with weights_only.

A checkpoint directory holds everything a resume needs (model, optimizer, scaler, epoch, step, MLflow run id), and
its `model` entry makes the same file a native weights file for `mvit.load_pretrained(..., source="native")`.
Checkpoints are read (and a run's are listed) from a local folder or from object storage (`s3://...`, where Ray
Train keeps them when `run.storage_path` is a URI) through `pipeline.storage`.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import torch

from pipeline import storage
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


def read_torch_file(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """`torch.load` of a local file or an object in storage (fetched whole), tensors and plain containers only."""
    path = os.fspath(path)
    source = io.BytesIO(storage.read_bytes(path)) if storage.is_uri(path) else path
    return torch.load(source, map_location=map_location, weights_only=True)


def load_state(directory: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by `save_state` (a local folder or a URI); tensors and plain containers only."""
    path = storage.join(os.fspath(directory), STATE_FILE)
    shown = storage.redact(os.fspath(directory))
    if not storage.is_file(path):
        raise CheckpointError(f"checkpoint {shown}: no {STATE_FILE} (incomplete or not a training checkpoint)")
    try:
        state = read_torch_file(path, map_location)
    except storage.StorageError as error:
        raise CheckpointError(str(error)) from None
    except Exception as error:  # a torn or foreign file: say which one, not a pickle traceback
        raise CheckpointError(
            f"checkpoint {storage.redact(path)}: unreadable ({type(error).__name__}: {error})"
        ) from None
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path}: not a format-{FORMAT_VERSION} training checkpoint")
    return state


def checkpoint_folders(run_dir: str) -> list[storage.Info]:
    """The Ray Train checkpoint folders of a run (`checkpoint_*`, local or in a bucket); [] if there is no run."""
    if not storage.is_dir(run_dir):
        return []
    return [entry for entry in storage.list_dir(run_dir) if entry.is_dir and entry.name.startswith("checkpoint_")]


def latest_checkpoint(storage_path: str, run_name: str) -> str | None:
    """The newest Ray Train checkpoint folder of a run that holds a state file (for evaluation with no model given),
    in a local folder or under a URI."""
    written = []
    for folder in checkpoint_folders(storage.join(storage_path, run_name)):
        state = storage.info(storage.join(folder.path, STATE_FILE))
        if state is not None and not state.is_dir:
            written.append((state.mtime_ns or 0, folder.name, folder.path))
    return max(written)[2] if written else None
