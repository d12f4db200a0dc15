"""Manifests from the formats datasets already come in: Kinetics CSVs, PySlowFast lists, Something-Something v2
JSON, and one folder per class. Each importer returns paths relative to the dataset's root and the class names.
Annotation files and class folders may be local or in object storage (`s3://...`): a bucket prefix is listed as a
folder is.
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from pipeline import storage
from pipeline.data.manifest import ManifestError

VIDEO_SUFFIXES = (".mp4", ".webm", ".mkv", ".avi", ".mov", ".m4v")
KINETICS_COLUMNS = ("label", "youtube_id", "time_start", "time_end", "split")


@dataclass(frozen=True)
class Imported:
    """A manifest table (path relative to the dataset root, label index) and the class names in index order."""

    table: pa.Table
    names: list[str]
    root: str | None = None  # where the paths start, when the reader must be told (`data.root`, `--root`)


def import_kinetics(csv_path: str | os.PathLike, *, names: list[str] | None = None, suffix: str = ".mp4") -> Imported:
    """Kinetics annotations (`label,youtube_id,time_start,time_end,split`) laid out as
    `split/label/youtubeid_start_end.mp4`, start and end zero-padded to 6 digits.

    Without `names`, the classes are the CSV's labels sorted, which is Kinetics' conventional order.
    """
    rows = _read_csv(os.fspath(csv_path), KINETICS_COLUMNS)
    names = names or sorted({row["label"] for row in rows})
    index_of = _index_of(names)
    paths, labels = [], []
    for line, row in enumerate(rows, start=2):
        label = _lookup(index_of, row["label"], f"{csv_path}: line {line}")
        try:
            start, end = int(float(row["time_start"])), int(float(row["time_end"]))
        except ValueError:
            raise ManifestError(f"{csv_path}: line {line} has non-numeric time_start/time_end") from None
        paths.append(f"{row['split']}/{row['label']}/{row['youtube_id']}_{start:06d}_{end:06d}{suffix}")
        labels.append(label)
    return Imported(_table(paths, labels), names)


def import_pyslowfast(list_path: str | os.PathLike, *, names: list[str] | None = None) -> Imported:
    """A PySlowFast list: `path label` per line (the path may contain spaces; the label is the last field).

    Without `names`, class i is called "i".
    """
    list_path = os.fspath(list_path)
    if not storage.is_file(list_path):
        raise ManifestError(f"{storage.redact(list_path)}: not found")
    paths, labels = [], []
    for line_number, line in enumerate(storage.read_text(list_path).splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.rsplit(maxsplit=1)
        if len(fields) != 2 or not fields[1].lstrip("-").isdigit():
            raise ManifestError(f"{list_path}: line {line_number} is not `path label`: {line!r}")
        paths.append(fields[0])
        labels.append(int(fields[1]))
    if not paths:
        raise ManifestError(f"{list_path}: no videos listed")
    names = names or [str(index) for index in range(max(labels) + 1)]
    outside = [label for label in labels if not 0 <= label < len(names)]
    if outside:
        raise ManifestError(f"{list_path}: label {outside[0]} is not a class index (there are {len(names)} classes)")
    return Imported(_table(paths, labels), names)


def import_ssv2(
    annotations_path: str | os.PathLike, labels_path: str | os.PathLike, *, suffix: str = ".webm"
) -> Imported:
    """Something-Something v2: a list of `{"id", "template", ...}` and the `{"class name": "index"}` label map.

    A template names its objects `[something]`; the class name is the template without the brackets.
    """
    label_map = _read_json(os.fspath(labels_path), dict)
    try:
        names = [name for name, _ in sorted(label_map.items(), key=lambda item: int(item[1]))]
    except (TypeError, ValueError):
        raise ManifestError(f"{labels_path}: expected {{class name: index}}") from None
    if [int(label_map[name]) for name in names] != list(range(len(names))):
        raise ManifestError(f"{labels_path}: class indices must be 0..{len(names) - 1}")
    index_of = _index_of(names)
    paths, labels = [], []
    for entry in _read_json(os.fspath(annotations_path), list):
        if not isinstance(entry, dict) or "id" not in entry or "template" not in entry:
            raise ManifestError(
                f"{annotations_path}: every entry needs an id and a template (test sets have no labels)"
            )
        name = entry["template"].replace("[", "").replace("]", "")
        labels.append(_lookup(index_of, name, f"{annotations_path}: video {entry['id']}"))
        paths.append(f"{entry['id']}{suffix}")
    return Imported(_table(paths, labels), names)


def import_folders(
    root: str | os.PathLike, *, names: list[str] | None = None, manifest_dir: str | os.PathLike | None = None
) -> Imported:
    """One folder per class under `root` (a folder, or a bucket prefix), its videos directly inside.

    Classes are the sorted folder names, or `names` (a label map), so that a val split missing a class keeps the
    train split's numbering; a folder not in `names` is an error. Paths are written relative to `manifest_dir`
    (the folder of the manifest, where the reader starts by default) when the videos are inside it, else relative
    to `root` (then the reader needs `data.root`/`--root`: `Imported.root` says which).
    """
    root = os.fspath(root)
    if not storage.is_dir(root):
        raise ManifestError(f"{storage.redact(root)}: not a folder")
    folders = [entry for entry in storage.list_dir(root) if entry.is_dir and not entry.name.startswith(".")]
    names = names or [folder.name for folder in folders]
    index_of = _index_of(names)
    base, needs_root = _base(root, manifest_dir)
    paths, labels = [], []
    for folder in folders:
        label = _lookup(index_of, folder.name, f"{storage.redact(root)}: class folder {folder.name!r}")
        for video in storage.list_dir(folder.path):
            if not video.is_dir and storage.suffix(video.path).lower() in VIDEO_SUFFIXES:
                paths.append(_relative(video.path, base))
                labels.append(label)
    if not paths:
        raise ManifestError(f"{storage.redact(root)}: no videos ({', '.join(VIDEO_SUFFIXES)}) in class folders")
    return Imported(_table(paths, labels), names, base if needs_root else None)


def _base(root: str, manifest_dir: str | os.PathLike | None) -> tuple[str, bool]:
    """The folder paths start from, and whether the reader must be told (it isn't the manifest's folder)."""
    root = _real(root)
    if manifest_dir is not None:
        folder = _real(os.fspath(manifest_dir))
        if storage.is_within(folder, root):
            return folder, False
    return root, True


def _real(path: str) -> str:
    """A local folder with its links resolved (as the reader will find it); a URI as it is."""
    return storage.absolute(path) if storage.is_uri(path) else str(Path(path).resolve())


def _relative(path: str, base: str) -> str:
    if storage.is_uri(path):
        return path[len(base.rstrip("/")) + 1 :]
    return os.path.relpath(Path(path).resolve(), base)


def _table(paths: list[str], labels: list[int]) -> pa.Table:
    return pa.table({"path": pa.array(paths, pa.string()), "label": pa.array(labels, pa.int64())})


def _index_of(names: list[str]) -> dict[str, int]:
    return {name: index for index, name in enumerate(names)}


def _lookup(index_of: dict[str, int], name: str, where: str) -> int:
    if name not in index_of:
        raise ManifestError(f"{where} has unknown label {name!r}")
    return index_of[name]


def _read_csv(path: str, columns: tuple[str, ...]) -> list[dict[str, str]]:
    if not storage.is_file(path):
        raise ManifestError(f"{storage.redact(path)}: not found")
    reader = csv.DictReader(io.StringIO(storage.read_text(path), newline=""))
    if reader.fieldnames is None or not set(columns) <= set(reader.fieldnames):
        raise ManifestError(f"{storage.redact(path)}: needs the columns {','.join(columns)}, has {reader.fieldnames}")
    rows = list(reader)
    if not rows:
        raise ManifestError(f"{storage.redact(path)}: no rows")
    return rows


def _read_json(path: str, kind: type) -> dict | list:
    if not storage.is_file(path):
        raise ManifestError(f"{storage.redact(path)}: not found")
    try:
        value = json.loads(storage.read_text(path))
    except json.JSONDecodeError as error:
        raise ManifestError(f"{path}: invalid JSON ({error})") from None
    if not isinstance(value, kind) or not value:
        raise ManifestError(f"{path}: expected a non-empty JSON {kind.__name__}")
    return value
