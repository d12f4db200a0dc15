"""The index: every video of a manifest probed once, over Ray Data, into one Parquet file that training reads.

Each row keeps the manifest's columns and adds what `probe` measured plus a `status`: "ok", or why the video can't
be used. Training takes only the ok rows, so an unusable video is reported here rather than found mid-epoch. Frame
timestamps are stored as start + i × step when evenly spaced, the step a fraction where the time base can't hold
the frame rate exactly (Matroska's 1 ms rounds 30 fps to 33, 33, 34 ms), and listed in full only for a really
irregular stream, which keeps a Kinetics-sized index small (BENCHMARKS.md measures it). Every row names the
`probe_format` it was written with; an index of a format this version can't read is refused rather than read
wrongly (probe the manifest again). Manifests, indexes and the index cache may be local paths or URIs (`s3://...`,
through `pipeline.storage`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import ray

from pipeline import storage
from pipeline.data.manifest import read_manifest, resolve_paths
from pipeline.data.video import VideoDecodeError, VideoInfo, probe
from pipeline.errors import DataError
from pipeline.progress import Progress

OK = "ok"
# The version of what `probe` measures and how a row stores it. Bump it whenever a probe would write a row that an
# older reader misreads (2: display rotation; width/height as displayed; AVI timestamps verified by a decode;
# 3: fractional timestamp steps, `pts_step_den`). Format 2 rows read as format 3 rows with whole steps.
PROBE_FORMAT = 3
READABLE_FORMATS = {2, 3}
INDEX_FIELDS = [
    pa.field("status", pa.string()),
    pa.field("probe_format", pa.int64()),
    pa.field("num_frames", pa.int64()),
    pa.field("fps", pa.float64()),
    pa.field("duration", pa.float64()),
    pa.field("width", pa.int64()),
    pa.field("height", pa.int64()),
    pa.field("codec", pa.string()),
    pa.field("keyframes", pa.list_(pa.int64())),
    pa.field("keyframe_pts", pa.list_(pa.int64())),
    pa.field("keyframe_dts", pa.list_(pa.int64())),
    pa.field("stream_index", pa.int64()),
    pa.field("time_base", pa.string()),
    pa.field("pts_start", pa.int64()),
    pa.field("pts_step", pa.int64()),  # numerator of the step, in time-base units
    pa.field("pts_step_den", pa.int64()),  # frame i is at pts_start + round(i * pts_step / pts_step_den)
    pa.field("pts", pa.list_(pa.int64())),  # empty unless that formula misses a frame's pts; then every pts
    pa.field("pts_ordered", pa.bool_()),
    pa.field("rotation", pa.int64()),
]


@dataclass(frozen=True)
class IndexSummary:
    """What an index run found."""

    path: str
    total: int
    usable: int
    unusable: list[tuple[str, str]]  # (path, reason)


def build_index(
    manifest_path: str | os.PathLike,
    out_path: str | os.PathLike,
    root: str | os.PathLike | None = None,
    *,
    allow_outside_root: bool = False,
    labels: str | os.PathLike | None = None,
    cpus_per_task: float = 1.0,
    concurrency: int | None = None,
    videos_per_task: int = 32,
) -> IndexSummary:
    """Probe every video of the manifest on the Ray cluster and write the index to `out_path` (Parquet, a local
    path or a URI).

    Class names resolve against the label map `labels` (default: the one beside the manifest). The file is
    written whole or not at all (`storage.write_bytes`), so a crash never leaves a partial index that reads as whole.
    """
    manifest = read_manifest(manifest_path, root, allow_outside_root, labels)
    numbered = manifest.append_column("row", pa.array(range(manifest.num_rows), pa.int64()))
    blocks = math.ceil(manifest.num_rows / videos_per_task)
    probed = ray.data.from_arrow(numbered, override_num_blocks=blocks).map_batches(
        _probe_batch,
        batch_size=None,
        batch_format="pyarrow",
        compute=ray.data.TaskPoolStrategy(size=concurrency),
        num_cpus=cpus_per_task,
    )
    progress = Progress(f"probing {manifest_path}", manifest.num_rows, "videos")
    tables = []
    for table in probed.iter_batches(batch_size=None, batch_format="pyarrow"):
        tables.append(table)
        progress.advance(table.num_rows)
    index = pa.concat_tables(tables).sort_by("row").drop_columns(["row"])
    out_path = os.fspath(out_path)
    storage.write_parquet(index, out_path)
    unusable = _unusable(index)
    return IndexSummary(path=out_path, total=index.num_rows, usable=index.num_rows - len(unusable), unusable=unusable)


def is_index(path: str) -> bool:
    """An index (probed already) rather than a manifest: a Parquet file with the probe's `status` column."""
    return storage.suffix(path) in (".parquet", ".pq") and "status" in storage.parquet_schema(path).names


def default_cache_dir() -> Path:
    """Where probed indexes are kept when `data.index_cache` is unset: `$XDG_CACHE_HOME/mvit-ray/index`, else
    `~/.cache/mvit-ray/index`. Local to the driver: only the driver reads an index."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mvit-ray" / "index"


def cache_key(source: str, root: str | None, allow_outside_root: bool, labels: str | None) -> str:
    """A digest of everything a probe of `source` depends on: the manifest (path or URI, size, content), the root,
    the root policy, the label map (content) and the probe's format. Equal keys mean the same index, so a cached
    index is never reused for other inputs, and a manifest edited in place (or an object replaced) is probed again."""
    content = storage.read_bytes(source)
    facts = {
        "format": PROBE_FORMAT,
        "manifest": storage.redact(storage.absolute(source)),
        "size": len(content),
        "sha256": hashlib.sha256(content).hexdigest(),
        "root": storage.redact(storage.absolute(root)) if root else None,
        "allow_outside_root": allow_outside_root,
        "labels": hashlib.sha256(storage.read_bytes(labels)).hexdigest() if labels else None,
    }
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:24]


def ensure_index(
    source: str,
    cache_dir: str | os.PathLike,
    root: str | None,
    allow_outside_root: bool,
    labels: str | None,
    cpus_per_task: float,
    concurrency: int | None,
) -> str:
    """The index of `source`: itself if already probed (its paths held to the root like a manifest's), else the
    cached probe of exactly these inputs (see `cache_key`), probing the manifest if there is none yet. The cache
    (`cache_dir`) may be a local folder or a URI prefix shared by a cluster."""
    if is_index(source):
        resolve_paths(
            storage.read_parquet(source, columns=["path"]).column("path").to_pylist(),
            root or storage.parent(source),
            allow_outside_root,
            source,
        )
        return source
    labels = labels if labels else None
    key = cache_key(source, root, allow_outside_root, labels)
    cached = storage.join(os.fspath(cache_dir), f"{storage.stem(source)}-{key}.parquet")
    if storage.is_file(cached):
        print(f"index of {storage.redact(source)}: {storage.redact(cached)} (cached)", flush=True)
        return cached
    summary = build_index(
        source,
        cached,
        root,
        allow_outside_root=allow_outside_root,
        labels=labels,
        cpus_per_task=cpus_per_task,
        concurrency=concurrency,
    )
    shown = storage.redact(source), storage.redact(cached)
    print(f"probed {shown[0]}: {summary.usable} of {summary.total} videos usable, index {shown[1]}", flush=True)
    return summary.path


def require_usable(usable: pa.Table, unusable: list[tuple[str, str]], source: str, shown: int = 3) -> None:
    """A manifest or index of which no video can be used is an error naming the first reasons."""
    if usable.num_rows:
        return
    if not unusable:
        raise DataError(f"{source}: no videos")
    reasons = "; ".join(f"{path}: {reason}" for path, reason in unusable[:shown])
    more = f" (and {len(unusable) - shown} more)" if len(unusable) > shown else ""
    raise DataError(f"{source}: none of its {len(unusable)} videos is usable: {reasons}{more}")


def read_usable(index: str | os.PathLike | pa.Table) -> tuple[pa.Table, list[tuple[str, str]]]:
    """The usable rows of an index, and (path, reason) for each video left out."""
    table = index if isinstance(index, pa.Table) else storage.read_parquet(index)
    formats = set(table.column("probe_format").to_pylist()) if "probe_format" in table.column_names else {1}
    if formats - READABLE_FORMATS:
        name = "the index" if isinstance(index, pa.Table) else f"index {storage.redact(os.fspath(index))}"
        found = ", ".join(str(found) for found in sorted(formats, key=str))
        readable = " and ".join(str(number) for number in sorted(READABLE_FORMATS))
        raise DataError(
            f"{name} was written by probe format {found}, this version reads {readable}: "
            "probe its manifest again (python -m jobs.prepare index)"
        )
    usable = table.filter(pc.equal(table.column("status"), OK))
    return usable, _unusable(table)


def info_to_row(info: VideoInfo) -> dict[str, Any]:
    """The index columns describing a probed video."""
    pts_start, pts_step, pts_step_den, pts = compact_pts(info.pts, info.fps, info.time_base)
    return {
        "status": OK,
        "probe_format": PROBE_FORMAT,
        "num_frames": info.num_frames,
        "fps": info.fps,
        "duration": info.duration,
        "width": info.width,
        "height": info.height,
        "codec": info.codec,
        "keyframes": list(info.keyframes),
        "keyframe_pts": list(info.keyframe_pts),
        "keyframe_dts": list(info.keyframe_dts),
        "stream_index": info.stream_index,
        "time_base": str(info.time_base),
        "pts_start": pts_start,
        "pts_step": pts_step,
        "pts_step_den": pts_step_den,
        "pts": pts,
        "pts_ordered": info.pts_ordered,
        "rotation": info.rotation,
    }


def info_from_row(row: dict[str, Any]) -> VideoInfo:
    """The VideoInfo of a usable index row, so decoding needn't probe again."""
    count = row["num_frames"]
    pts = tuple(row["pts"]) or expand_pts(row["pts_start"], row["pts_step"], row.get("pts_step_den") or 1, count)
    return VideoInfo(
        path=row["path"],
        num_frames=count,
        fps=row["fps"],
        duration=row["duration"],
        width=row["width"],
        height=row["height"],
        codec=row["codec"],
        keyframes=tuple(row["keyframes"]),
        keyframe_pts=tuple(row["keyframe_pts"]),
        keyframe_dts=tuple(row["keyframe_dts"]),
        stream_index=row["stream_index"],
        time_base=Fraction(row["time_base"]),
        pts=pts,
        pts_ordered=row["pts_ordered"],
        rotation=row["rotation"],
    )


def _probe_batch(batch: pa.Table) -> pa.Table:
    rows = []
    for row in batch.to_pylist():
        try:
            row.update(info_to_row(probe(row["path"], check_last_frame=True)))
        except VideoDecodeError as error:
            row.update(status=error.reason, probe_format=PROBE_FORMAT)
        rows.append(row)
    schema = pa.schema(list(batch.schema) + INDEX_FIELDS)
    return pa.Table.from_pylist(rows, schema=schema)


def compact_pts(pts: tuple[int, ...], fps: float, time_base: Fraction) -> tuple[int, int, int, list[int]]:
    """(start, step numerator, step denominator, []) when `expand_pts` gives back every pts exactly, else
    (start, 0, 1, every pts). The step tried: the first difference, the one the frame rate implies, and close
    fractions of the mean step; each is checked against every frame, so a wrong guess only costs space."""
    if len(pts) < 2:
        return (pts[0] if pts else 0), 0, 1, []
    mean = Fraction(pts[-1] - pts[0], len(pts) - 1)
    candidates = [Fraction(pts[1] - pts[0])]
    if fps > 0 and time_base:
        candidates.append(1 / (Fraction(fps).limit_denominator(1001) * time_base))
    candidates += [mean.limit_denominator(bound) for bound in (10, 100, 1001)]
    for step in dict.fromkeys(candidates):
        if step > 0 and expand_pts(pts[0], step.numerator, step.denominator, len(pts)) == tuple(pts):
            return pts[0], step.numerator, step.denominator, []
    return pts[0], 0, 1, list(pts)


def expand_pts(start: int, step: int, step_den: int, count: int) -> tuple[int, ...]:
    """start + i × step / step_den rounded half up, for i < count: how muxers round a rate into a time base."""
    return tuple(start + (2 * i * step + step_den) // (2 * step_den) for i in range(count))


def _unusable(table: pa.Table) -> list[tuple[str, str]]:
    return [(row["path"], row["status"]) for row in table.select(["path", "status"]).to_pylist() if row["status"] != OK]
