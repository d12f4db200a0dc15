"""Every path the project reads or writes, a local path or a URI (`s3://bucket/key`, `gs://...`), through one layer:
pyarrow's filesystems, the ones Ray Data and Ray Train use for the same URIs (fsspec's, wrapped, where pyarrow has
none).

Credentials come from each filesystem's standard provider chain (for S3: the environment, ~/.aws, an instance
role), and an S3-compatible endpoint from `AWS_ENDPOINT_URL`, as boto3 and pyarrow read them. Transient failures
(throttling, 5xx, timeouts, dropped connections) are retried: first by the SDK, then here with backoff; a missing
object, a missing bucket, missing credentials or a denied access is a one-line `StorageError` naming the URI,
with any credentials in it removed. A write is whole or absent: locally a temporary file renamed into place, in an
object store one upload that becomes visible only when complete.
"""

from __future__ import annotations

import functools
import hashlib
import os
import posixpath
import re
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.errors import DataError
from pipeline.secrets import redact

T = TypeVar("T")
URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
URI_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"]+")
# Retries on top of the SDK's own (3 quick attempts for S3): waits of 0.5, 1 and 2 s, so an outage of a few seconds
# costs time, not a video, and a video that stays unreachable is skipped after about 4 s.
ATTEMPTS = 4
FIRST_WAIT_S = 0.5
S3_SDK_ATTEMPTS = 3
TRANSIENT = re.compile(
    r"HTTP status 5\d\d|SLOW_DOWN|THROTTL|SERVICE_UNAVAILABLE|INTERNAL_FAILURE|REQUEST_TIMEOUT|NETWORK_CONNECTION|"
    r"curlCode|Connection reset|timed out|Broken pipe",
    re.I,
)
DENIED = re.compile(r"ACCESS_DENIED|INVALID_ACCESS_KEY_ID|SIGNATURE_DOES_NOT_MATCH|EXPIRED_TOKEN|HTTP status 403", re.I)


MISSING, DENIED_KIND, UNAVAILABLE, FAILED = "missing", "denied", "unavailable", "failed"


class StorageError(DataError):
    """A path or URI that can't be read or written; str() is one line naming it and saying why. `kind`: missing
    (no such file, object or bucket), denied (credentials), unavailable (transient failures that outlasted the
    retries) or failed (anything else)."""

    def __init__(self, path: str, reason: str, kind: str = FAILED) -> None:
        super().__init__(f"{redact(path)}: {reason}")
        self.path, self.reason, self.kind = redact(path), reason, kind


@dataclass(frozen=True)
class Info:
    """A file or folder (an object or a prefix, in an object store) as listed."""

    path: str  # as the caller names it: a local path or a URI
    is_dir: bool
    size: int  # bytes; 0 for a folder
    mtime_ns: int | None  # None where the store has none (prefixes)

    @property
    def name(self) -> str:
        return name(self.path)


# ---- names ------------------------------------------------------------------------------------------------------
def is_uri(path: str | os.PathLike) -> bool:
    """A URI with a scheme (s3://, gs://, ...) rather than a local path; file:// URIs count as local paths."""
    return bool(URI.match(str(path))) and not str(path).startswith("file://")


def local(path: str | os.PathLike) -> str:
    """A local path as a string (a file:// URI as its path)."""
    path = os.fspath(path)
    return urlsplit(path).path if path.startswith("file://") else path


def absolute(path: str | os.PathLike, base: str | os.PathLike | None = None) -> str:
    """A URI as it is, normalised; a local path made absolute (against `base`, else the working directory)."""
    if is_uri(path):
        return _normalise_uri(str(path))
    return os.path.abspath(os.path.join(local(base) if base is not None else os.getcwd(), local(path)))


def join(root: str | os.PathLike, relative: str) -> str:
    """`relative` resolved under `root` ('..' collapsed); an absolute path or a URI stays itself."""
    if is_uri(relative) or (not is_uri(root) and os.path.isabs(local(relative))):
        return absolute(relative)
    if not is_uri(root):
        return os.path.normpath(os.path.join(local(root), local(relative)))
    scheme, bucket, key, query = _split(str(root))
    joined = posixpath.normpath(posixpath.join("/", key, relative)).lstrip("/")
    return _unsplit(scheme, bucket, joined, query)


def parent(path: str | os.PathLike) -> str:
    if not is_uri(path):
        return os.path.dirname(os.path.abspath(local(path)))
    scheme, bucket, key, query = _split(str(path))
    return _unsplit(scheme, bucket, posixpath.dirname(key), query)


def name(path: str | os.PathLike) -> str:
    return posixpath.basename(_split(str(path))[2]) if is_uri(path) else os.path.basename(local(path))


def stem(path: str | os.PathLike) -> str:
    return os.path.splitext(name(path))[0]


def suffix(path: str | os.PathLike) -> str:
    return os.path.splitext(name(path))[1]


def is_within(root: str | os.PathLike, path: str) -> bool:
    """Whether `path` (already joined, normalised) is `root` or below it."""
    if is_uri(root) != is_uri(path):
        return False
    if not is_uri(root):
        root = os.path.abspath(local(root))
        return os.path.commonpath([root, os.path.abspath(path)]) == root
    (scheme, bucket, key, _), (scheme2, bucket2, key2, _) = _split(str(root)), _split(path)
    prefix = posixpath.normpath("/" + key).rstrip("/") + "/"
    return (scheme, bucket) == (scheme2, bucket2) and ("/" + key2 + "/").startswith(prefix)


def scrub(text: str) -> str:
    """`text` (an error message, a log line) with every URI in it redacted."""
    return URI_IN_TEXT.sub(lambda match: redact(match.group(0)), text)


def _split(uri: str) -> tuple[str, str, str, str]:
    parts = urlsplit(uri)
    return parts.scheme, parts.netloc, parts.path.lstrip("/"), parts.query


def _unsplit(scheme: str, bucket: str, key: str, query: str) -> str:
    return f"{scheme}://{bucket}/{key}".rstrip("/") + (f"?{query}" if query else "")


def _normalise_uri(uri: str) -> str:
    scheme, bucket, key, query = _split(uri)
    return _unsplit(scheme, bucket, posixpath.normpath("/" + key).lstrip("/") if key else "", query)


class UriPath(str):
    """A URI with the few `pathlib.Path` operations the run and checkpoint code uses (`name`, `parent`, `/`), so
    that code works on a local `Path` and on a URI alike; compares as the normalised URI string."""

    def __new__(cls, uri: str) -> UriPath:
        return super().__new__(cls, _normalise_uri(uri))

    @property
    def name(self) -> str:
        return name(self)

    @property
    def parent(self) -> UriPath:
        return UriPath(parent(self))

    def __truediv__(self, other: str | os.PathLike) -> UriPath:
        return UriPath(join(self, os.fspath(other)))


def as_path(path: str | os.PathLike) -> Path | UriPath:
    """A local path as a `pathlib.Path`, a URI as a `UriPath`."""
    return UriPath(str(path)) if is_uri(path) else Path(local(path))


# ---- filesystems ------------------------------------------------------------------------------------------------
def filesystem(path: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """The filesystem holding `path` and the path inside it (for Ray's `storage_filesystem`, pyarrow readers)."""
    if not is_uri(path):
        return _local_fs(), os.path.abspath(local(path))
    scheme, bucket, key, query = _split(str(path))
    fs = _remote_fs(scheme, bucket, query, _environment())
    return fs, f"{bucket.rpartition('@')[2]}/{key}".rstrip("/")


SCHEMES = {"s3": "s3", "gcs": "gs"}  # pyarrow's filesystem type_name → URI scheme


def uri_of(fs: pafs.FileSystem, inner: str) -> str:
    """The path or URI of `inner` in `fs` (the inverse of `filesystem`; Ray Train's checkpoints name their path
    inside `storage_filesystem`)."""
    scheme = SCHEMES.get(fs.type_name)
    return f"{scheme}://{inner.lstrip('/')}" if scheme else inner


@functools.cache
def _local_fs() -> pafs.LocalFileSystem:
    return pafs.LocalFileSystem()


def _environment() -> tuple[tuple[str, str], ...]:
    """What a filesystem's credentials and endpoint can come from: a new one is made when it changes."""
    return tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith(("AWS_", "GOOGLE_", "GCS_", "AZURE_"))))


@functools.lru_cache(maxsize=32)
def _remote_fs(scheme: str, bucket: str, query: str, environment: tuple) -> pafs.FileSystem:
    """One filesystem per bucket and environment (making one costs ~0.1 s). S3 gets the SDK's standard retries,
    the ones its pickled copies (Ray Train's workers) get too, rather than from_uri's 6 s of connection retries."""
    uri = f"{scheme}://{bucket}/" + (f"?{query}" if query else "")
    try:
        fs, _ = retried(uri, "reach it", lambda: pafs.FileSystem.from_uri(uri))  # S3: may ask for the bucket's region
    except pa.ArrowInvalid as error:
        if "Unrecognized filesystem type" not in str(error):
            raise StorageError(uri, str(error).splitlines()[0]) from None
        return _fsspec(scheme, uri)
    if isinstance(fs, pafs.S3FileSystem):
        options = fs.__reduce__()[1][0]  # the options from_uri resolved (region, endpoint, scheme, ...)
        fs = pafs.S3FileSystem(**options, retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=S3_SDK_ATTEMPTS))
    return fs


def _fsspec(scheme: str, uri: str) -> pafs.FileSystem:
    try:
        import fsspec

        return pafs.PyFileSystem(pafs.FSSpecHandler(fsspec.filesystem(scheme)))
    except (ImportError, ValueError) as error:
        raise StorageError(
            uri, f"no filesystem for {scheme}:// (neither pyarrow nor fsspec has one: {error})"
        ) from None


# ---- errors and retries -----------------------------------------------------------------------------------------
def _failure(error: OSError, path: str, action: str, attempts: int) -> tuple[str, str]:
    """(kind, one line saying why) for an operation on `path` that failed, in the user's terms."""
    text = " ".join(str(error).split())
    missing_bucket = "NO_SUCH_BUCKET" in text or re.search(r"Bucket '[^']*' not found", text)
    if isinstance(error, FileNotFoundError) and not missing_bucket:
        return MISSING, "not found" if not is_uri(path) or _bucket_exists(path) else _no_bucket(path)
    if missing_bucket:
        return MISSING, _no_bucket(path)
    detail = re.search(r"AWS Error (\w+(?: \([^)]*\))?) during (\w+) operation: ?(.*)", text)
    said = f"{detail.group(1)} during {detail.group(2)}" if detail else text
    if DENIED.search(text):
        return DENIED_KIND, f"access denied to {action} ({said}){_credentials_hint(path)}"
    if _transient(error):
        return UNAVAILABLE, f"unavailable after {attempts} attempts to {action} ({said})"
    return FAILED, f"cannot {action}: {text or type(error).__name__}"


def _no_bucket(path: str) -> str:
    return f"the bucket {_split(path)[1].rpartition('@')[2]!r} does not exist"


def _bucket_exists(path: str) -> bool:
    """Whether the bucket of a URI exists (an object store answers a missing bucket as a missing key)."""
    scheme, bucket, _, query = _split(path)
    fs, inner = filesystem(_unsplit(scheme, bucket, "", query))
    try:
        return fs.get_file_info(inner).type != pafs.FileType.NotFound
    except OSError:
        return True  # can't tell: say what the first answer said


def _credentials_hint(path: str) -> str:
    """For S3: say when this process has no credentials at all, the usual cause of a denial on a new machine."""
    if not is_uri(path) or _split(path)[0] not in ("s3", "s3a"):
        return ""
    if "@" in _split(path)[1] or any(
        os.environ.get(name)
        for name in (
            "AWS_ACCESS_KEY_ID",
            "AWS_PROFILE",
            "AWS_WEB_IDENTITY_TOKEN_FILE",
            "AWS_CONTAINER_CREDENTIALS_FULL_URI",
        )
    ):
        return ": check that these credentials may read and write it"
    files = (
        os.environ.get("AWS_SHARED_CREDENTIALS_FILE", "~/.aws/credentials"),
        os.environ.get("AWS_CONFIG_FILE", "~/.aws/config"),
    )
    if any(os.path.isfile(os.path.expanduser(file)) for file in files):
        return ": check the credentials of ~/.aws (or AWS_PROFILE)"
    role = (
        ""
        if os.environ.get("AWS_EC2_METADATA_DISABLED", "").lower() == "true"
        else " (an instance role was the last resort)"
    )
    return f": no AWS credentials found (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, ~/.aws){role}"


def _transient(error: OSError) -> bool:
    return not isinstance(error, FileNotFoundError) and bool(TRANSIENT.search(str(error)))


def retried(path: str, action: str, operation: Callable[[], T]) -> T:
    """`operation()` with transient failures retried with backoff; any failure left is a StorageError naming
    `path` and `action`."""
    for attempt in range(1, ATTEMPTS + 1):
        try:
            return operation()
        except OSError as error:
            if attempt < ATTEMPTS and _transient(error):
                time.sleep(FIRST_WAIT_S * 2 ** (attempt - 1))
                continue
            kind, reason = _failure(error, path, action, attempt)
            raise StorageError(path, reason, kind) from None
    raise AssertionError("unreachable")


# ---- operations -------------------------------------------------------------------------------------------------
def info(path: str | os.PathLike) -> Info | None:
    """The file or folder at `path`, or None if there is none."""
    path = os.fspath(path)
    fs, inner = filesystem(path)
    found = retried(path, "look it up", lambda: fs.get_file_info(inner))
    return None if found.type == pafs.FileType.NotFound else _info(path, found)


def is_file(path: str | os.PathLike) -> bool:
    found = info(path)
    return found is not None and not found.is_dir


def is_dir(path: str | os.PathLike) -> bool:
    found = info(path)
    return found is not None and found.is_dir


def exists(path: str | os.PathLike) -> bool:
    return info(path) is not None


def read_bytes(path: str | os.PathLike) -> bytes:
    """The whole file or object, fetched in one request (retried whole on a transient failure)."""
    path = os.fspath(path)
    fs, inner = filesystem(path)

    def fetch() -> bytes:
        with fs.open_input_file(inner) as file:  # a stream's read() would fetch an object in many small requests
            return file.read_at(file.size(), 0) if file.size() else b""

    return retried(path, "read it", fetch)


def read_text(path: str | os.PathLike) -> str:
    try:
        return read_bytes(path).decode("utf-8")
    except UnicodeDecodeError as error:
        raise StorageError(os.fspath(path), f"not UTF-8 text ({error.reason} at byte {error.start})") from None


@contextmanager
def open_input(path: str | os.PathLike) -> Iterator[pafs.NativeFile]:
    """A seekable file reading `path` (ranged reads in an object store: each read is a request)."""
    path = os.fspath(path)
    fs, inner = filesystem(path)
    file = retried(path, "read it", lambda: fs.open_input_file(inner))
    try:
        yield file
    finally:
        file.close()


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` whole or not at all: locally through a temporary file renamed into place, in an object store
    as one upload, which becomes visible only once complete."""
    path = os.fspath(path)
    if not is_uri(path):
        _write_local(local(path), data)
        return
    fs, inner = filesystem(path)

    def upload() -> None:
        with fs.open_output_stream(inner) as stream:
            stream.write(data)

    retried(path, "write it", upload)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def _write_local(path: str, data: bytes) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        partial = os.path.join(folder, f".{os.path.basename(path)}.{uuid.uuid4().hex[:12]}.tmp")
        try:
            with open(partial, "wb") as file:
                file.write(data)
            os.replace(partial, path)
        finally:
            if os.path.exists(partial):
                os.unlink(partial)
    except OSError as error:
        raise StorageError(path, f"cannot write it: {error.strerror or error}") from None


def list_dir(path: str | os.PathLike, recursive: bool = False) -> list[Info]:
    """The files and folders in the folder (or under the prefix) `path`, sorted by path; a StorageError ("not
    found") if there is no such folder."""
    path = os.fspath(path)
    fs, inner = filesystem(path)
    selector = pafs.FileSelector(inner, recursive=recursive)
    found = retried(path, "list it", lambda: fs.get_file_info(selector))
    base = path.rstrip("/")
    entries = [_info(f"{base}/{entry.path[len(inner.rstrip('/')) + 1 :]}", entry) for entry in found]
    return sorted(entries, key=lambda entry: entry.path)


def remove(path: str | os.PathLike) -> None:
    """Delete a file or object if it exists."""
    path = os.fspath(path)
    if info(path) is None:
        return
    fs, inner = filesystem(path)
    retried(path, "delete it", lambda: fs.delete_file(inner))


def _info(path: str, found: pafs.FileInfo) -> Info:
    is_folder = found.type == pafs.FileType.Directory
    return Info(path, is_folder, 0 if is_folder else (found.size or 0), found.mtime_ns)


def sha256(path: str | os.PathLike, chunk_bytes: int = 8 * 2**20) -> str:
    """The SHA-256 of a file or object, read in `chunk_bytes` requests (restarted whole on a transient failure)."""
    path = os.fspath(path)
    fs, inner = filesystem(path)

    def digest() -> str:
        hashed = hashlib.sha256()
        with fs.open_input_file(inner) as file:
            size = file.size()
            for offset in range(0, size, chunk_bytes):
                hashed.update(file.read_at(min(chunk_bytes, size - offset), offset))
        return hashed.hexdigest()

    return retried(path, "read it", digest)


def download(path: str | os.PathLike, target: str | os.PathLike, chunk_bytes: int = 64 * 2**20) -> int:
    """Copy the file or object at `path` to the local file `target` in `chunk_bytes` requests (restarted whole on
    a transient failure); the bytes copied."""
    path = os.fspath(path)
    fs, inner = filesystem(path)

    def copy() -> int:
        with fs.open_input_file(inner) as file, open(target, "wb") as out:
            size = file.size()
            for offset in range(0, size, chunk_bytes):
                out.write(file.read_at(min(chunk_bytes, size - offset), offset))
            return size

    return retried(path, "read it", copy)


class RangedFile:
    """A seekable, read-only file over an object, each read a ranged request retried like every operation here:
    for readers that need a few parts of a large object (FFmpeg demuxing a clip of a long video)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.fspath(path)
        fs, inner = filesystem(self.path)
        self._file = retried(self.path, "read it", lambda: fs.open_input_file(inner))
        self.size = self._file.size()
        self._position = 0

    def read(self, size: int = -1) -> bytes:
        size = self.size - self._position if size is None or size < 0 else min(size, self.size - self._position)
        if size <= 0:
            return b""
        data = retried(self.path, "read it", lambda: self._file.read_at(size, self._position))
        self._position += len(data)
        return data

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._position, os.SEEK_END: self.size}[whence]
        self._position = max(0, base + offset)
        return self._position

    def tell(self) -> int:
        return self._position

    def close(self) -> None:
        self._file.close()


# ---- tables -----------------------------------------------------------------------------------------------------
def read_parquet(path: str | os.PathLike, columns: list[str] | None = None) -> pa.Table:
    """A Parquet file as a table (only `columns`, if given: an object store then sends only those)."""
    path = os.fspath(path)
    fs, inner = filesystem(path)
    return retried(path, "read it", lambda: pq.read_table(inner, filesystem=fs, columns=columns))


def parquet_schema(path: str | os.PathLike) -> pa.Schema:
    path = os.fspath(path)
    fs, inner = filesystem(path)

    def schema() -> pa.Schema:
        with fs.open_input_file(inner) as file:
            return pq.read_schema(file)

    return retried(path, "read it", schema)


def write_parquet(table: pa.Table, path: str | os.PathLike) -> None:
    """Write `table` as Parquet, whole or not at all (see `write_bytes`)."""
    buffer = pa.BufferOutputStream()
    pq.write_table(table, buffer)
    write_bytes(path, buffer.getvalue().to_pybytes())


def for_ray(path: str) -> tuple[str, pafs.FileSystem | None]:
    """(storage_path, storage_filesystem) for Ray Train's RunConfig: a URI as this layer's filesystem and the path
    inside it (so Ray Train writes with the same endpoint, credentials chain and retries); a local path as it is."""
    if not is_uri(path):
        return path, None
    fs, inner = filesystem(path)
    return inner, fs
