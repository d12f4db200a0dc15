"""Training checkpoints: a `state.pt` and, written last, a `checkpoint.json` manifest that vouches for it.

A checkpoint directory holds everything a resume needs (model, optimizer, scaler, epoch, step, MLflow run id), and
its `model` entry makes the same file a native weights file for `mvit.load_pretrained(..., source="native")`.

The manifest holds the size and SHA-256 of `state.pt` and a small summary (epoch, step, MLflow run id, the public
config, the data identity, the last metrics), so that the driver can decide how to resume without loading the
state. A directory without a manifest, or whose `state.pt` does not match it (torn by a full disk, cut off by a
crash mid-copy, bit rot), is incomplete and never loads: a checkpoint is complete or it is not one.

Checkpoints are written locally (Ray Train uploads them) and read, verified and listed in a local folder or in
object storage (`s3://...`, where Ray Train keeps them when `run.storage_path` is a URI) through `pipeline.storage`.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path
from typing import Any

import torch

from pipeline import storage
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


def _manifest(directory: str | Path) -> dict[str, Any]:
    """The manifest of a checkpoint folder (local or in a bucket) and the entry of its state file."""
    shown = storage.redact(str(directory))
    state, manifest_path = storage.as_path(directory) / STATE_FILE, storage.as_path(directory) / MANIFEST_FILE
    if not storage.is_file(state):
        raise CheckpointError(f"checkpoint {shown}: no {STATE_FILE} (incomplete or not a training checkpoint)")
    if not storage.is_file(manifest_path):
        raise CheckpointError(f"checkpoint {shown}: no {MANIFEST_FILE} (a save that did not finish)")
    try:
        manifest = json.loads(storage.read_text(manifest_path))
        manifest["files"][STATE_FILE]["bytes"], manifest["files"][STATE_FILE]["sha256"]
    except (ValueError, KeyError, TypeError):
        raise CheckpointError(f"checkpoint {shown}: {MANIFEST_FILE} is unreadable") from None
    return manifest


def _check(directory: str | Path, expected: dict[str, Any], size: int, sha256: str) -> None:
    shown = storage.redact(str(directory))
    if size != expected["bytes"]:
        raise CheckpointError(f"checkpoint {shown}: {STATE_FILE} has {size} bytes, not {expected['bytes']} (torn)")
    if sha256 != expected["sha256"]:
        raise CheckpointError(f"checkpoint {shown}: {STATE_FILE} does not match its SHA-256 (corrupt)")


def verify(directory: str | Path) -> dict[str, Any]:
    """The manifest of a complete checkpoint; a CheckpointError saying what is wrong otherwise (a StorageError
    becomes one too: an unreadable checkpoint is not complete)."""
    try:
        manifest = _manifest(directory)
        state = storage.as_path(directory) / STATE_FILE
        _check(directory, manifest["files"][STATE_FILE], storage.info(state).size, storage.sha256(state))
    except storage.StorageError as error:
        raise CheckpointError(f"checkpoint {error}") from None
    return manifest


class UnreadableTorchFile(CheckpointError):
    """A file that `torch.load(weights_only=True)` refuses; `reason` says why in one line, for callers that name it."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.reason = reason


def _refusal(error: Exception, head: bytes) -> str:
    """Why torch.load refused a file whose first bytes are `head`, in one line instead of torch's paragraph."""
    if not head:
        return "empty file"
    if not head.startswith((b"PK\x03\x04", b"\x80")):  # torch.save writes a zip archive; legacy files are pickles
        return f"not a PyTorch file (it begins {head!r})"
    detail = str(error)
    if "WeightsUnpickler error:" in detail:  # torch's one useful line comes after it, e.g. "Unsupported global: ..."
        refused = detail.split("WeightsUnpickler error:", 1)[1].strip().split("\n")[0].split(". ")[0]
        return f"holds more than tensors and plain containers, which weights-only loading refuses ({refused})"
    return f"unreadable ({type(error).__name__}: {detail.split('. ')[0]})"


def _torch_load(path: str, data: bytes | None, map_location: str | torch.device) -> Any:
    """`torch.load` of tensors and plain containers from `data` (fetched) or the local file `path`; a refusal is an
    UnreadableTorchFile."""
    try:
        return torch.load(io.BytesIO(data) if data is not None else path, map_location=map_location, weights_only=True)
    except Exception as error:
        if data is None:
            try:
                with open(path, "rb") as file:
                    data = file.read(8)
            except OSError as unreadable:  # gone (e.g. a checkpoint rotated out since it verified) or not readable
                raise UnreadableTorchFile(storage.redact(path), unreadable.strerror or str(unreadable)) from None
        raise UnreadableTorchFile(storage.redact(path), _refusal(error, data[:8])) from None


def read_torch_file(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """`torch.load` of a local file or an object in storage (fetched whole), tensors and plain containers only."""
    path = os.fspath(path)
    return _torch_load(path, storage.read_bytes(path) if storage.is_uri(path) else None, map_location)


def load_state(directory: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by `save_state`, verified against its manifest; tensors and plain containers only
    (weights_only=True). An object in a bucket is fetched once, and verified on the bytes fetched."""
    path = storage.as_path(directory) / STATE_FILE
    try:
        if storage.is_uri(path):
            expected = _manifest(directory)["files"][STATE_FILE]
            data: bytes | None = storage.read_bytes(path)
            _check(directory, expected, len(data), hashlib.sha256(data).hexdigest())
        else:
            verify(directory)
            data = None
    except storage.StorageError as error:
        raise CheckpointError(f"checkpoint {error}") from None
    try:
        state = _torch_load(str(path), data, map_location)
    except UnreadableTorchFile as error:  # a foreign file: say which one and why, not a pickle traceback
        raise CheckpointError(f"checkpoint {path}: {error.reason}") from None
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path}: not a format-{FORMAT_VERSION} training checkpoint")
    return state


def checkpoint_folders(run_dir: str | Path) -> list[Path]:
    """The checkpoint folders of a run (local `Path`s, or `storage.UriPath`s in a bucket), newest first (Ray Train
    names them by the time they were reported); [] if the run has none."""
    if not storage.is_uri(run_dir):
        return sorted((path for path in Path(run_dir).glob(CHECKPOINT_GLOB) if path.is_dir()), reverse=True)
    if not storage.is_dir(run_dir):
        return []
    prefix = CHECKPOINT_GLOB.rstrip("*")
    found = [storage.UriPath(e.path) for e in storage.list_dir(run_dir) if e.is_dir and e.name.startswith(prefix)]
    return sorted(found, reverse=True)


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


def _run_dirs(storage_path: str) -> list[Path]:
    if not storage.is_uri(storage_path):
        return sorted(Path(storage_path).glob("*/"))
    if not storage.is_dir(storage_path):
        return []
    return [storage.UriPath(entry.path) for entry in storage.list_dir(storage_path) if entry.is_dir]


def latest_checkpoint(storage_path: str, run_name: str) -> Path | None:
    """The newest complete checkpoint of a run (of any run under `storage_path` when `run_name` is empty), in a
    local folder or under a URI, for evaluation with no model given."""
    run_dirs = [storage.as_path(storage_path) / run_name] if run_name else _run_dirs(storage_path)
    folders = sorted((f for run_dir in run_dirs for f in checkpoint_folders(run_dir)), key=lambda f: f.name)
    found = newest_complete(folders[::-1])
    return found[0] if found else None
