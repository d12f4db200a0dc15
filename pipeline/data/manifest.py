"""Manifests: a Parquet or CSV table of `path,label` (optionally `start_sec,end_sec`), and the label map beside it.

The label map is one class name a line, the index being the line number: the one the run names (`data.labels`), or
else `labels.txt` in the manifest's folder. Labels in a manifest are indices, or names looked up in that label map,
so the names a run checks its counts against are the names its labels were resolved with. Relative paths resolve
against a root (by default the manifest's folder); a path that leaves the root, by `..` or through a symbolic link,
is refused unless explicitly allowed, so a manifest can't quietly read files elsewhere. A video listed twice (the
same path and segment) is refused, whether with one label or two: it would count twice per epoch, or teach both
classes. Segment bounds must be finite. Whether the files exist and decode is the index's business, not the
manifest's. Every path here may be a local path or a URI (`s3://bucket/...`, see `pipeline.storage`); relative
manifest paths resolve under a URI root as under a folder.
"""

from __future__ import annotations

import io
import math
import os

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.errors import DataError

LABEL_MAP_NAME = "labels.txt"
REQUIRED_COLUMNS = ("path", "label")
OPTIONAL_COLUMNS = ("start_sec", "end_sec")


class ManifestError(DataError):
    """A manifest or label map that can't be used; the message is one line saying why."""


def label_map_path(manifest_path: str | os.PathLike) -> str:
    """Where the label map of a manifest lives."""
    return storage.join(storage.parent(manifest_path), LABEL_MAP_NAME)


def read_label_map(path: str | os.PathLike) -> list[str]:
    """Class names in index order."""
    path = os.fspath(path)
    if not storage.is_file(path):
        raise ManifestError(f"{storage.redact(path)}: label map not found")
    names = storage.read_text(path).splitlines()
    if not names or any(not name.strip() for name in names):
        raise ManifestError(f"{path}: a label map needs one non-empty class name a line")
    _check_unique(names, path)
    return names


def write_label_map(names: list[str], path: str | os.PathLike) -> None:
    """Write a label map, whole or not at all."""
    path = os.fspath(path)
    if not names or any(not name.strip() or "\n" in name for name in names):
        raise ManifestError(f"{path}: class names must be non-empty single lines")
    _check_unique(names, path)
    storage.write_text(path, "".join(f"{name}\n" for name in names))


def write_manifest(table: pa.Table, path: str | os.PathLike) -> None:
    """Write a manifest as Parquet or CSV, chosen by the suffix, whole or not at all."""
    path = os.fspath(path)
    if _format(path) == "parquet":
        storage.write_parquet(table, path)
    else:
        buffer = io.BytesIO()
        pa_csv.write_csv(table, buffer)
        storage.write_bytes(path, buffer.getvalue())


def read_manifest(
    path: str | os.PathLike,
    root: str | os.PathLike | None = None,
    allow_outside_root: bool = False,
    labels: str | os.PathLike | None = None,
) -> pa.Table:
    """The manifest with absolute, normalised paths and integer labels.

    Columns: path (string), label (int64), and start_sec, end_sec (float64, null = the video's start or end) when
    the file has them. Class names resolve against the label map `labels` (default: `labels.txt` beside the
    manifest, if there is one).
    """
    path = os.fspath(path)
    table = _read_table(path)
    unexpected = [name for name in table.column_names if name not in REQUIRED_COLUMNS + OPTIONAL_COLUMNS]
    missing = [name for name in REQUIRED_COLUMNS if name not in table.column_names]
    if missing or unexpected:
        raise ManifestError(
            f"{path}: wrong columns {table.column_names}: needs {', '.join(REQUIRED_COLUMNS)}"
            f" and may have {', '.join(OPTIONAL_COLUMNS)}"
        )
    if table.num_rows == 0:
        raise ManifestError(f"{path}: the manifest is empty")
    base = os.fspath(root) if root is not None else storage.parent(path)
    columns = {
        "path": pa.array(resolve_paths(table.column("path").to_pylist(), base, allow_outside_root, path), pa.string()),
        "label": _labels(table.column("label"), path, os.fspath(labels) if labels else None),
    }
    for name in OPTIONAL_COLUMNS:
        if name in table.column_names:
            columns[name] = _seconds(table.column(name), name, path)
    if "start_sec" in columns and "end_sec" in columns:
        backwards = pc.greater_equal(columns["start_sec"], columns["end_sec"]).to_pylist()
        if True in backwards:
            raise ManifestError(f"{path}: row {backwards.index(True) + 1} has start_sec not before end_sec")
    table = pa.table(columns)
    _check_listed_once(table, path)
    return table


def _format(path: str) -> str:
    if storage.suffix(path) in {".parquet", ".pq"}:
        return "parquet"
    if storage.suffix(path) == ".csv":
        return "csv"
    raise ManifestError(f"{storage.redact(path)}: a manifest must be .parquet or .csv")


def _read_table(path: str) -> pa.Table:
    kind = _format(path)
    if not storage.is_file(path):
        raise ManifestError(f"{storage.redact(path)}: manifest not found")
    data = pa.BufferReader(storage.read_bytes(path))
    try:
        if kind == "parquet":
            return pq.read_table(data)
        convert = pa_csv.ConvertOptions(
            column_types={"path": pa.string(), "start_sec": pa.float64(), "end_sec": pa.float64()},
            null_values=[""],  # only an empty cell is "not given": "nan" is a NaN, refused, not the video's end
        )
        return pa_csv.read_csv(data, convert_options=convert)
    except (pa.ArrowInvalid, OSError) as error:
        raise ManifestError(f"{path}: unreadable {kind}: {str(error).splitlines()[0]}") from None


def resolve_paths(
    values: list[str | None], base: str | os.PathLike, allow_outside_root: bool, source: str | os.PathLike
) -> list[str]:
    """Paths of a manifest or index made absolute against `base` (a folder or a URI prefix); one outside it (by `..`,
    or locally through a symbolic link) is refused unless allowed, so neither a manifest nor an already-probed index
    can quietly read files elsewhere."""
    root = storage.absolute(base)
    links = _LinkCheck(root) if not storage.is_uri(root) and not allow_outside_root else None
    resolved = []
    for row, value in enumerate(values, start=1):
        if value is None or not str(value).strip():
            raise ManifestError(f"{storage.redact(str(source))}: row {row} has no path")
        absolute = storage.join(root, str(value))
        if not allow_outside_root and not storage.is_within(root, absolute):
            raise ManifestError(
                f"{storage.redact(str(source))}: row {row} path {value!r} is outside the root {storage.redact(root)}"
            )
        if links is not None:
            links.check(absolute, row, value, source)
        resolved.append(absolute)
    return resolved


class _LinkCheck:
    """Refuses a local path that links outside the root: one realpath per folder, not per video (Kinetics: 400
    folders, 240k videos)."""

    def __init__(self, root: str) -> None:
        self.root, self.real_root = root, os.path.realpath(root)
        self.real_folders: dict[str, str] = {}

    def check(self, absolute: str, row: int, value: str, source: str | os.PathLike) -> None:
        folder, name = os.path.split(absolute)
        if folder not in self.real_folders:
            self.real_folders[folder] = os.path.realpath(folder)
        real = os.path.realpath(absolute) if os.path.islink(absolute) else os.path.join(self.real_folders[folder], name)
        if os.path.commonpath([self.real_root, real]) != self.real_root:
            raise ManifestError(
                f"{source}: row {row} path {value!r} links to {real}, outside the root {self.root} "
                "(data.allow_outside_root=true allows it)"
            )


def _check_listed_once(table: pa.Table, manifest: str) -> None:
    """Each video (path and segment) once: a second row is an accident that would count it twice per epoch, or,
    with another label, teach it as both classes."""
    keys = [name for name in ("path", "start_sec", "end_sec") if name in table.column_names]
    seen: dict[tuple, tuple[int, int]] = {}
    for row, values in enumerate(zip(*(table.column(name).to_pylist() for name in [*keys, "label"])), start=1):
        *key, label = values
        if tuple(key) in seen:
            first, first_label = seen[tuple(key)]
            what = (
                "the same video" if label == first_label else f"the same video with two labels ({first_label}, {label})"
            )
            raise ManifestError(
                f"{storage.redact(manifest)}: rows {first} and {row} list {what}: {key[0]!r}{_segment(keys, key)}"
            )
        seen[tuple(key)] = (row, label)


def _segment(keys: list[str], key: list) -> str:
    bounds = dict(zip(keys, key))
    if "start_sec" not in bounds and "end_sec" not in bounds:
        return ""
    return f" [{bounds.get('start_sec')}, {bounds.get('end_sec')}] s"


def _labels(column: pa.ChunkedArray, manifest: str, given: str | None) -> pa.Array:
    """Integer labels, checked against the label map: `given` (which must exist), else the one beside the manifest
    when there is one. A text label is a class name from the label map, or else an index written as digits."""
    names_path = given or label_map_path(manifest)
    names = read_label_map(names_path) if given or storage.is_file(names_path) else None
    if column.null_count:
        raise ManifestError(f"{manifest}: row {column.to_pylist().index(None) + 1} has no label")
    if not (pa.types.is_integer(column.type) or pa.types.is_string(column.type)):
        raise ManifestError(f"{manifest}: labels must be integers or class names, not {column.type}")
    index_of = {name: index for index, name in enumerate(names or [])}
    labels = []
    for row, value in enumerate(column.to_pylist(), start=1):
        label = index_of.get(value) if isinstance(value, str) else value
        if label is None and value.isdigit():
            label = int(value)
        if label is None and names is None:
            raise ManifestError(f"{manifest}: row {row} label {value!r} is a class name but there is no {names_path}")
        if label is None or label < 0 or (names is not None and label >= len(names)):
            known = f"not in the label map {names_path}" if names is not None else "negative"
            raise ManifestError(f"{manifest}: row {row} has unknown label {value!r} ({known})")
        labels.append(label)
    return pa.array(labels, pa.int64())


def _seconds(column: pa.ChunkedArray, name: str, manifest: str) -> pa.Array:
    try:
        seconds = column.cast(pa.float64())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        raise ManifestError(f"{manifest}: {name} must be a number of seconds") from None
    values = seconds.to_pylist()
    for row, value in enumerate(values, start=1):
        if value is not None and not math.isfinite(value):
            raise ManifestError(f"{manifest}: row {row} has {name} {value}: must be a finite number of seconds")
    if pc.any(pc.less(seconds, 0)).as_py():
        raise ManifestError(f"{manifest}: {name} must not be negative")
    return seconds.combine_chunks()


def _check_unique(names: list[str], path: str) -> None:
    seen = set()
    for name in names:
        if name in seen:
            raise ManifestError(f"{path}: class name {name!r} appears twice")
        seen.add(name)
