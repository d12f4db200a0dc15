"""Putting a checkpoint into the run's storage so that it is there complete or not at all.

Ray Train's default upload copies the files straight into `storage_path/name/checkpoint_...`; a full disk or a
crash mid-copy leaves a torn `state.pt` there. This upload copies into a hidden staging folder beside it and
renames the folder into place once every file is written (atomic on a local or NFS file system), removing the
staging folder when the copy fails. The manifest inside the checkpoint (`pipeline/checkpoints.py`) is the second
line of defence, for storage where a rename is not atomic: in an object store (no rename at all), each file is
one upload and the manifest goes last.
"""

from __future__ import annotations

import logging
import posixpath
from typing import TYPE_CHECKING

import pyarrow.fs

if TYPE_CHECKING:
    import ray.train

log = logging.getLogger(__name__)
MANIFEST = "checkpoint.json"  # pipeline.checkpoints.MANIFEST_FILE (not imported: this module must not need torch)


class CheckpointUploadError(OSError):
    """A checkpoint that could not be written to storage; nothing partial was left there."""


def _remove(filesystem: pyarrow.fs.FileSystem, path: str) -> None:
    try:
        if filesystem.get_file_info(path).type != pyarrow.fs.FileType.NotFound:
            filesystem.delete_dir(path)
    except OSError as error:
        log.warning("could not remove the partial checkpoint %s: %s", path, error)


def copy_whole(
    source: str,
    source_filesystem: pyarrow.fs.FileSystem,
    destination_root: str,
    dir_name: str,
    filesystem: pyarrow.fs.FileSystem,
) -> str:
    """Copy the folder `source` to `destination_root/dir_name` through a staging folder; returns the final path.

    Raises CheckpointUploadError, with nothing left at either path, if the copy fails (a full disk, a lost mount).
    """
    final = posixpath.join(destination_root, dir_name)
    if filesystem.type_name != "local":
        return _copy_objects(source, source_filesystem, final, filesystem)
    staging = posixpath.join(destination_root, f".{dir_name}.partial")
    try:
        filesystem.create_dir(staging)
        pyarrow.fs.copy_files(
            source,
            staging,
            source_filesystem=source_filesystem,
            destination_filesystem=filesystem,
            chunk_size=64 * 2**20,
        )
        filesystem.move(staging, final)
    except Exception as error:
        _remove(filesystem, staging)
        if not isinstance(error, OSError):
            raise
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise CheckpointUploadError(f"checkpoint {final} could not be written ({reason}); none was left") from error
    return final


def _copy_objects(
    source: str, source_filesystem: pyarrow.fs.FileSystem, final: str, filesystem: pyarrow.fs.FileSystem
) -> str:
    """Into an object store, which has no folder rename: each object is whole or absent (one upload), and the
    checkpoint's manifest goes last, so that a copy cut off midway leaves a folder that never verifies."""
    files = source_filesystem.get_file_info(pyarrow.fs.FileSelector(source, recursive=True))
    files = sorted((f for f in files if f.type == pyarrow.fs.FileType.File), key=lambda f: f.base_name == MANIFEST)
    try:
        for file in files:
            target = posixpath.join(final, posixpath.relpath(file.path, source))
            pyarrow.fs.copy_files(
                file.path,
                target,
                source_filesystem=source_filesystem,
                destination_filesystem=filesystem,
                chunk_size=64 * 2**20,
            )
    except OSError as error:
        _remove(filesystem, final)
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise CheckpointUploadError(f"checkpoint {final} could not be written ({reason}); none was left") from error
    return final


def upload_whole(checkpoint: ray.train.Checkpoint, dir_name: str) -> ray.train.Checkpoint:
    """`ray.train.report(checkpoint_upload_fn=...)`: the checkpoint copied whole into the run's storage, or not."""
    import ray.train  # here: `copy_whole` alone must not need Ray

    storage = ray.train.get_context().get_storage()
    filesystem = storage.storage_filesystem
    final = copy_whole(checkpoint.path, checkpoint.filesystem, storage.experiment_fs_path, dir_name, filesystem)
    return ray.train.Checkpoint(path=final, filesystem=filesystem)
