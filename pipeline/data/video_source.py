"""Where FFmpeg reads a video's bytes from: a local file by its path (FFmpeg reads it itself), or an object in
storage (`s3://...`, through `pipeline.storage`).

An object is fetched once per probe or decode, whole, into memory: for Kinetics-sized videos that is one request,
and faster than FFmpeg's own small reads turned into ranged requests (BENCHMARKS.md, "Videos in object storage").
Objects over `WHOLE_FETCH_MAX_BYTES` are spooled to a local temporary file for a probe (which reads every packet
anyway) and read in `RANGE_BYTES` ranges for a decode, so that a clip of a long video fetches about the part it needs.
"""

from __future__ import annotations

import io
import os
import tempfile

import av

from pipeline import storage

WHOLE_FETCH_MAX_BYTES = 64 * 2**20
RANGE_BYTES = 4 * 2**20


class VideoSource:
    """One video's bytes for one probe or decode: opened as often as the caller needs, fetched at most once."""

    range_bytes = RANGE_BYTES  # FFmpeg's read size over a ranged object: each read is one request

    def __init__(
        self,
        path: str,
        *,
        data: bytes | None = None,
        spooled: str | None = None,
        ranged: storage.RangedFile | bool = False,
    ) -> None:
        """`data`: the object's bytes; `spooled`: a local copy (deleted on close); `ranged`: read in ranges
        (through this open file, if one is given); none of them: a local file that FFmpeg opens itself."""
        self.path, self._data, self._spooled, self._ranged = path, data, spooled, bool(ranged)
        self._file = ranged if isinstance(ranged, storage.RangedFile) else None

    def open(self) -> av.container.InputContainer:
        """A new container over the video (the caller closes it before opening another); raises as av.open does."""
        if self._data is not None:
            return av.open(io.BytesIO(self._data), metadata_errors="ignore")
        if self._ranged:
            self._file = self._file or storage.RangedFile(self.path)
            self._file.seek(0)
            return av.open(self._file, metadata_errors="ignore", buffer_size=self.range_bytes)
        return av.open(self._spooled or self.path, metadata_errors="ignore")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._spooled:
            os.unlink(self._spooled)
            self._spooled = None

    def __enter__(self) -> VideoSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_source(path: str, *, probing: bool) -> VideoSource:
    """The source of `path`; `probing`: for a probe, which reads every packet (so a large object is spooled to a local
    file), else a decode's (a large object is read in ranges). An object costs a HEAD and a GET (or the ranges).
    Raises StorageError for an object that can't be read: "file not found", "empty file", a denial, an outage."""
    if not storage.is_uri(path):
        return VideoSource(path)
    try:
        file = storage.RangedFile(path)
    except storage.StorageError as error:
        if error.kind == storage.MISSING and error.reason == "not found":
            raise storage.StorageError(path, "file not found", storage.MISSING) from None
        raise
    if file.size == 0:
        file.close()
        raise storage.StorageError(path, "empty file")
    if file.size > WHOLE_FETCH_MAX_BYTES and not probing:
        return VideoSource(path, ranged=file)
    try:
        if file.size <= WHOLE_FETCH_MAX_BYTES:
            return VideoSource(path, data=file.read())
        return VideoSource(path, spooled=_spool(file))
    finally:
        file.close()


def _spool(file: storage.RangedFile) -> str:
    """The object copied to a local temporary file (deleted when the source closes)."""
    handle, spooled = tempfile.mkstemp(prefix="mvit-video-", suffix=storage.suffix(file.path))
    os.close(handle)
    try:
        storage.download(file.path, spooled)
    except BaseException:
        os.unlink(spooled)
        raise
    return spooled
