"""Training checkpoints: a `state.pt` and, written last, a `checkpoint.json` manifest that vouches for it.

A checkpoint directory holds everything a resume needs (model, optimizer, scaler, epoch, step, MLflow run id), and
its `model` entry makes the same file a native weights file for `mvit.load_pretrained(..., source="native")`.

The manifest holds the size and SHA-256 of `state.pt` and a small summary (epoch, step, MLflow run id, the public
config, the data identity, the last metrics), so that the driver can decide how to resume without loading the
state. A directory without a manifest, or whose `state.pt` does not match it (torn by a full disk, cut off by a
crash mid-copy, bit rot), is incomplete and never loads: a checkpoint is complete or it is not one.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import ModelError

STATE_FILE = "state.pt"
MANIFEST_FILE = "checkpoint.json"
FORMAT_VERSION = 2
CHECKPOINT_GLOB = "checkpoint_*"
_CHUNK = 8 * 2**20


class CheckpointError(ModelError):
    """A checkpoint that is missing, partial, corrupt or not ours."""


class _HashingWriter:
    """A write-only file that hashes and counts what passes through it (torch.save writes sequentially)."""

    def __init__(self, handle: Any) -> None:
        self.handle, self.sha, self.size = handle, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self.size += len(data)
        return self.handle.write(data)

    def flush(self) -> None:
        self.handle.flush()


def save_state(directory: str | Path, state: dict[str, Any], summary: dict[str, Any] | None = None) -> Path:
    """Write `state` to `directory/state.pt`, then the manifest that vouches for it.

    Each file goes through a temporary file and an atomic rename, the old manifest is removed before the new state
    replaces the old one, and the new manifest comes last: a crash at any point leaves the previous checkpoint or
    none, never one that loads while being partial.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    partial = directory / (STATE_FILE + ".tmp")
    try:
        with open(partial, "wb") as handle:
            writer = _HashingWriter(handle)
            torch.save({"format_version": FORMAT_VERSION, **state}, writer)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException as error:
        partial.unlink(missing_ok=True)  # a full disk: give the space back
        cause = _os_error_behind(error)
        if cause is not None and cause is not error:  # torch.save reports a failed write as a RuntimeError
            raise cause from None
        raise
    (directory / MANIFEST_FILE).unlink(missing_ok=True)
    os.replace(partial, directory / STATE_FILE)
    manifest = {
        "format_version": FORMAT_VERSION,
        "files": {STATE_FILE: {"bytes": writer.size, "sha256": writer.sha.hexdigest()}},
        **(summary or {}),
    }
    partial_manifest = directory / (MANIFEST_FILE + ".tmp")
    with open(partial_manifest, "w") as handle:
        json.dump(manifest, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(partial_manifest, directory / MANIFEST_FILE)
    return directory / STATE_FILE


def _os_error_behind(error: BaseException | None) -> OSError | None:
    """The OSError (a full disk, EFBIG) at the root of `error`'s chain, if any."""
    while error is not None and not isinstance(error, OSError):
        error = error.__cause__ or error.__context__
    return error


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def verify(directory: str | Path) -> dict[str, Any]:
    """The manifest of a complete checkpoint; a CheckpointError saying what is wrong otherwise."""
    directory = Path(directory)
    state, manifest_path = directory / STATE_FILE, directory / MANIFEST_FILE
    if not state.is_file():
        raise CheckpointError(f"checkpoint {directory}: no {STATE_FILE} (incomplete or not a training checkpoint)")
    if not manifest_path.is_file():
        raise CheckpointError(f"checkpoint {directory}: no {MANIFEST_FILE} (a save that did not finish)")
    try:
        manifest = json.loads(manifest_path.read_text())
        expected = manifest["files"][STATE_FILE]
    except (ValueError, KeyError, TypeError):
        raise CheckpointError(f"checkpoint {directory}: {MANIFEST_FILE} is unreadable") from None
    size = state.stat().st_size
    if size != expected["bytes"]:
        raise CheckpointError(f"checkpoint {directory}: {STATE_FILE} has {size} bytes, not {expected['bytes']} (torn)")
    if _sha256(state) != expected["sha256"]:
        raise CheckpointError(f"checkpoint {directory}: {STATE_FILE} does not match its SHA-256 (corrupt)")
    return manifest


def load_state(directory: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by `save_state`, verified against its manifest; tensors and plain containers only
    (weights_only=True)."""
    verify(directory)
    path = Path(directory) / STATE_FILE
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # a foreign file: say which one, not a pickle traceback
        raise CheckpointError(f"checkpoint {path}: unreadable ({type(error).__name__}: {error})") from None
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path}: not a format-{FORMAT_VERSION} training checkpoint")
    return state


def checkpoint_folders(run_dir: str | Path) -> list[Path]:
    """The checkpoint folders of a run, newest first (Ray Train names them by the time they were reported)."""
    return sorted((path for path in Path(run_dir).glob(CHECKPOINT_GLOB) if path.is_dir()), reverse=True)


def newest_complete(folders: list[Path]) -> tuple[Path, dict[str, Any], list[tuple[Path, str]]] | None:
    """The first complete checkpoint of `folders` and its manifest, with (folder, reason) for each one passed over;
    None if none is complete."""
    skipped = []
    for folder in folders:
        try:
            return folder, verify(folder), skipped
        except CheckpointError as error:
            skipped.append((folder, str(error)))
    return None


def latest_checkpoint(storage_path: str, run_name: str) -> Path | None:
    """The newest complete checkpoint of a run (of any run under `storage_path` when `run_name` is empty), for
    evaluation with no model given."""
    storage = Path(storage_path)
    run_dirs = [storage / run_name] if run_name else sorted(storage.glob("*/"))
    folders = sorted((f for run_dir in run_dirs for f in checkpoint_folders(run_dir)), key=lambda f: f.name)
    found = newest_complete(folders[::-1])
    return found[0] if found else None
