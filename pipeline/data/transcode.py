"""Re-encoding a dataset once before training, so that every epoch decodes less: fewer pixels, nearer keyframes.

A clip's decode starts at the keyframe before it and converts every kept frame at the stored resolution, so storage
decides most of the input side's cost (BENCHMARKS.md). Each video is re-encoded with libx264 (yuv420p, even
dimensions, the shorter side scaled down to `short_side`, never up, a keyframe at least every `gop` frames) into an
MP4 that keeps every frame, the frame rate and the timestamps, so that a manifest's `start_sec`/`end_sec` and every
frame index mean the same in the new file. Audio is dropped: training reads none, and it would only cost bytes and a
second codec that not every source's container can carry into MP4.

Every write is atomic: a video is encoded into a hidden temporary file beside its target and renamed into place
once complete, so an interrupted run never leaves a video that looks finished. Each output carries a record of what
it was made from (source path, size and modification time, the settings) in its MP4 comment tag, inside the same
file, so the record and the video can't disagree; a rerun re-encodes whatever lacks a matching record (a new or
changed source, other settings) and keeps the rest.
"""

from __future__ import annotations

import json
import math
import os
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import av
import pyarrow as pa
import ray

from pipeline.data.manifest import ManifestError, label_map_path, read_label_map, read_manifest, write_label_map
from pipeline.data.manifest import write_manifest as _write_manifest_file
from pipeline.data.skips import CrashGuard, SkipCounters, decode_slots, skip_counter
from pipeline.data.video import VideoDecodeError, VideoInfo, probe
from pipeline.errors import ConfigError, DataError

RECORD_VERSION = 1
X264_PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow")
X264_TUNES = ("", "film", "animation", "grain", "stillimage", "fastdecode", "zerolatency")
VIDEOS_FOLDER = "videos"
OUTSIDE_ROOT_FOLDER = "_outside_root"  # where videos from outside the manifest's root go, under their full path


@dataclass(frozen=True)
class EncodeSettings:
    """How each video is re-encoded (the defaults of `jobs.prepare transcode` are measured in BENCHMARKS.md)."""

    short_side: int  # the shorter side is scaled down to this many pixels; a smaller video keeps its size
    gop: int  # at most this many frames from one keyframe to the next
    crf: int  # libx264's constant rate factor: 0 lossless, 23 its default, 51 worst
    preset: str  # libx264's encoder speed against quality and size at one CRF
    tune: str  # libx264's tune: "" for none, or e.g. "fastdecode" (no CABAC, no deblocking: faster, larger)

    def __post_init__(self) -> None:
        if self.short_side < 2:
            raise ConfigError(f"short side must be at least 2 pixels, got {self.short_side}")
        if self.gop < 1:
            raise ConfigError(f"GOP must be at least 1 frame, got {self.gop}")
        if not 0 <= self.crf <= 51:
            raise ConfigError(f"CRF must be between 0 and 51, got {self.crf}")
        if self.preset not in X264_PRESETS:
            raise ConfigError(f"unknown x264 preset {self.preset!r}: one of {', '.join(X264_PRESETS)}")
        if self.tune not in X264_TUNES:
            raise ConfigError(f"unknown x264 tune {self.tune!r}: one of {', '.join(map(repr, X264_TUNES))}")


@dataclass(frozen=True)
class TranscodeSummary:
    """What a manifest's re-encode did; `failed` lists (source, reason), as the failed list file does."""

    manifest: Path
    videos: int
    encoded: int
    reused: int
    failed: list[tuple[str, str]]
    failed_list: Path
    rows: int
    rows_written: int
    bytes_in: int
    bytes_out: int


def output_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """(width, height) of the re-encoded video: scaled down so the shorter side is `short_side`, both even (rounded
    down, so that an odd side is never scaled up)."""
    scale = min(1.0, short_side / min(width, height))
    return 2 * max(1, int(width * scale / 2)), 2 * max(1, int(height * scale / 2))


def source_record(source: str, settings: EncodeSettings) -> dict[str, Any]:
    """What an output made now from `source` would be made from; an output is reused only if its record is this."""
    stat = os.stat(source)
    return {
        "version": RECORD_VERSION,
        "source": source,
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "settings": asdict(settings),
    }


def read_record(target: str | os.PathLike) -> dict[str, Any] | None:
    """The record an output carries, or None for a file that has none (or is not a readable MP4)."""
    try:
        with av.open(str(target), metadata_errors="ignore") as container:
            return json.loads(container.metadata.get("comment", ""))
    except (av.error.FFmpegError, OSError, ValueError):
        return None


def transcode_video(source: str, target: Path, settings: EncodeSettings, threads: int = 1) -> int:
    """Re-encode `source` into `target` atomically, recording what it was made from; the bytes written.

    Raises VideoDecodeError for a source that can't be probed or decoded, or that yields fewer frames than probed.
    """
    record = source_record(source, settings)
    info = probe(source)
    target.parent.mkdir(parents=True, exist_ok=True)
    for leftover in target.parent.glob(f".{target.name}.*.partial"):  # from an interrupted earlier run
        leftover.unlink(missing_ok=True)
    partial = target.with_name(f".{target.name}.{uuid.uuid4().hex}.partial")
    try:
        _encode(info, partial, settings, json.dumps(record, sort_keys=True), threads)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return target.stat().st_size


def _encode(info: VideoInfo, partial: Path, settings: EncodeSettings, record: str, threads: int) -> None:
    """Decode every frame of the probed video in order and encode it at the new size with its own timestamp and
    duration (the durations make the container's frame rate the source's, to the tick)."""
    width, height = output_size(info.width, info.height, settings.short_side)
    options = {"crf": str(settings.crf), "preset": settings.preset, "g": str(settings.gop), "threads": str(threads)}
    if settings.tune:
        options["tune"] = settings.tune
    durations: dict[int, int] = {}  # pts -> duration of the frames sent to the encoder and not yet out of it
    decoded = 0
    try:
        with av.open(info.path, metadata_errors="ignore") as source, av.open(str(partial), "w", format="mp4") as out:
            video = source.streams[info.stream_index]
            video.codec_context.thread_count = threads
            out.metadata["comment"] = record
            stream = out.add_stream("libx264", rate=video.average_rate or round(info.fps), options=options)
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            stream.time_base = stream.codec_context.time_base = info.time_base
            _copy_picture_properties(video.codec_context, stream.codec_context)
            for frame in source.decode(video):
                if decoded == info.num_frames:
                    break
                scaled = frame.reformat(width, height, format="yuv420p", interpolation="BICUBIC")
                scaled.pts, scaled.time_base = info.pts[decoded], info.time_base  # presentation order
                durations[scaled.pts] = frame.duration
                out.mux(_with_durations(stream.encode(scaled), durations))
                decoded += 1
            out.mux(_with_durations(stream.encode(), durations))
    except av.error.FFmpegError as error:
        raise VideoDecodeError(info.path, f"re-encoding failed: {error.strerror}") from None
    if decoded < info.num_frames:
        raise VideoDecodeError(info.path, f"only {decoded} of its {info.num_frames} frames decoded")


def _with_durations(packets: list[av.Packet], durations: dict[int, int]) -> list[av.Packet]:
    for packet in packets:
        duration = durations.pop(packet.pts, None)  # popped: keys stay unique among the frames in flight
        if duration:
            packet.duration = duration
    return packets


def _copy_picture_properties(source: av.codec.context.CodecContext, target: av.codec.context.CodecContext) -> None:
    """Keep the pixel aspect ratio and the colour description, so the new file shows what the old one did.

    The range is kept too, except from the full-range yuvj formats, which the conversion to yuv420p already moves to
    the limited range that yuv420p means by default.
    """
    if source.sample_aspect_ratio:
        target.sample_aspect_ratio = source.sample_aspect_ratio
    names = ["colorspace", "color_primaries", "color_trc"]
    for name in names if (source.pix_fmt or "").startswith("yuvj") else ["color_range", *names]:
        setattr(target, name, getattr(source, name))


def target_paths(sources: list[str], base: Path, out_dir: Path) -> dict[str, Path]:
    """Where each source's re-encoded file goes: its path below `base`, under out_dir/videos, as .mp4.

    Raises ManifestError when two sources would land on one file (e.g. clip.avi and clip.mp4 side by side).
    """
    base, videos = Path(os.path.abspath(base)), out_dir / VIDEOS_FOLDER
    targets: dict[str, Path] = {}
    made_from: dict[Path, str] = {}
    for source in sources:
        path = Path(source)
        relative = path.relative_to(base) if path.is_relative_to(base) else Path(OUTSIDE_ROOT_FOLDER, *path.parts[1:])
        target = (videos / relative).with_suffix(".mp4")
        if target == path:
            raise ManifestError(f"{source} would be overwritten by its own re-encoded file; choose another --out")
        if made_from.setdefault(target, source) != source:
            raise ManifestError(f"{made_from[target]} and {source} would both be re-encoded into {target}")
        targets[source] = target
    return targets


@dataclass(frozen=True)
class TranscodePlan:
    """What a manifest's re-encode will read and write, checked before any work starts."""

    manifest: pa.Table  # as read_manifest reads it: absolute paths, integer labels
    new_manifest: Path
    names: list[str] | None  # the label map to copy, if the manifest has one
    targets: dict[str, Path]  # source -> re-encoded file, one per distinct video


def plan_transcode(
    manifest_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    root: str | os.PathLike | None = None,
    allow_outside_root: bool = False,
) -> TranscodePlan:
    """Read the manifest and decide every output; raises ManifestError for a plan that would overwrite its input,
    mix up two videos or contradict a label map already in out_dir."""
    manifest_path, out_dir = Path(manifest_path), Path(os.path.abspath(out_dir))
    manifest = read_manifest(manifest_path, root, allow_outside_root)
    new_manifest = out_dir / manifest_path.name
    if new_manifest.resolve() == manifest_path.resolve():
        raise ManifestError(f"{manifest_path}: the new manifest would overwrite it; choose another --out")
    sources = list(dict.fromkeys(manifest.column("path").to_pylist()))  # a video listed for several segments once
    targets = target_paths(sources, Path(root) if root is not None else manifest_path.parent, out_dir)
    return TranscodePlan(manifest, new_manifest, _label_names(manifest_path, out_dir), targets)


def transcode_manifest(
    manifest_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    settings: EncodeSettings,
    root: str | os.PathLike | None = None,
    *,
    allow_outside_root: bool = False,
    cpus_per_task: float = 1.0,
    concurrency: int | None = None,
    videos_per_task: int = 4,
) -> TranscodeSummary:
    """Re-encode every video of a manifest on the Ray cluster into out_dir, and write the new manifest there.

    The new manifest has the name of the old one, the same rows (labels, segments) in the same order with paths to
    the new files, relative to out_dir; the label map is copied beside it. A video that fails is left out of it,
    listed in `<name>_failed.tsv` with its reason, and the job goes on. The new manifest is written last, so one
    that exists describes a finished run.
    """
    plan = plan_transcode(manifest_path, out_dir, root, allow_outside_root)
    # An earlier run's manifest goes first: while videos are replaced it could pair a new file with an old label.
    plan.new_manifest.unlink(missing_ok=True)
    results = _run_on_ray(plan.targets, settings, cpus_per_task, concurrency, videos_per_task)
    outcomes = [results[source]["outcome"] for source in plan.targets]
    failed = [(source, results[source]["reason"]) for source in plan.targets if results[source]["outcome"] == "failed"]
    failed_list = plan.new_manifest.with_name(f"{plan.new_manifest.stem}_failed.tsv")
    _atomic(failed_list, lambda path: path.write_text("".join(f"{s}\t{r}\n" for s, r in failed), encoding="utf-8"))
    kept = _new_manifest(plan, {source for source, _ in failed})
    if kept.num_rows == 0:
        raise DataError(f"{manifest_path}: no video could be re-encoded (reasons in {failed_list})")
    if plan.names is not None:
        _atomic(Path(label_map_path(plan.new_manifest)), lambda path: write_label_map(plan.names, path))
    _atomic(plan.new_manifest, lambda path: _write_manifest_file(kept, path))
    return TranscodeSummary(
        manifest=plan.new_manifest,
        videos=len(plan.targets),
        encoded=outcomes.count("encoded"),
        reused=outcomes.count("reused"),
        failed=failed,
        failed_list=failed_list,
        rows=plan.manifest.num_rows,
        rows_written=kept.num_rows,
        bytes_in=sum(row["bytes_in"] for row in results.values()),
        bytes_out=sum(row["bytes_out"] for row in results.values()),
    )


def _new_manifest(plan: TranscodePlan, failed: set[str]) -> pa.Table:
    """The manifest's rows of the videos that re-encoded, in order, with paths relative to the new manifest."""
    sources = plan.manifest.column("path").to_pylist()
    kept = plan.manifest.filter(pa.array([source not in failed for source in sources]))
    base = plan.new_manifest.parent
    paths = [plan.targets[source].relative_to(base).as_posix() for source in kept.column("path").to_pylist()]
    return kept.set_column(kept.column_names.index("path"), "path", pa.array(paths, pa.string()))


def _label_names(manifest_path: Path, out_dir: Path) -> list[str] | None:
    """The source's class names, refusing an out_dir whose label map says something else."""
    source, target = Path(label_map_path(manifest_path)), Path(label_map_path(out_dir / manifest_path.name))
    names = read_label_map(source) if source.is_file() else None
    if target.is_file() and read_label_map(target) != names:
        raise ManifestError(f"{target} already holds other class names than {manifest_path}'s; choose another --out")
    return names


def _run_on_ray(
    targets: dict[str, Path], settings: EncodeSettings, cpus: float, concurrency: int | None, per_task: int
) -> dict[str, dict[str, Any]]:
    """Each source's outcome ("encoded", "reused" or "failed"), reason, bytes in and bytes out."""
    plan = pa.table({"source": list(targets), "target": [str(target) for target in targets.values()]})
    counter_name = f"transcode-{uuid.uuid4().hex[:12]}"
    counter = skip_counter(counter_name, decode_slots(concurrency, cpus))
    try:
        done = ray.data.from_arrow(plan, override_num_blocks=math.ceil(plan.num_rows / per_task)).map_batches(
            _Transcoder(settings, counter, threads=max(1, int(cpus))),
            batch_size=None,
            batch_format="pyarrow",
            compute=ray.data.TaskPoolStrategy(size=concurrency),
            num_cpus=cpus,
        )
        rows = pa.concat_tables(ray.get(done.to_arrow_refs())).to_pylist()
    finally:
        counter.close()
    return {row["source"]: row for row in rows}


@dataclass(frozen=True)
class _Transcoder:
    """The map_batches UDF: (source, target) rows in, one outcome row each out."""

    settings: EncodeSettings
    counter: SkipCounters
    threads: int

    def __call__(self, batch: pa.Table) -> pa.Table:
        guard = CrashGuard(self.counter)  # a video whose decoder kills the process twice is failed, not retried
        rows, failed = [], []
        for source, target in zip(batch.column("source").to_pylist(), batch.column("target").to_pylist()):
            row = {"source": source, "outcome": "failed", "reason": "", "bytes_in": 0, "bytes_out": 0}
            row["reason"] = guard.should_skip(source) or ""
            if not row["reason"]:
                guard.decoding(source)
                row.update(self._one(source, Path(target)))
            if row["outcome"] == "failed":
                failed.append((source, row["reason"]))
            rows.append(row)
        guard.finish(0, failed, 0)
        return pa.Table.from_pylist(rows, schema=_OUTCOME_SCHEMA)

    def _one(self, source: str, target: Path) -> dict[str, Any]:
        try:
            record = source_record(source, self.settings)
            if read_record(target) == record:
                return {"outcome": "reused", "bytes_in": record["size"], "bytes_out": target.stat().st_size}
            written = transcode_video(source, target, self.settings, self.threads)
        except FileNotFoundError as error:
            return {"reason": "file not found" if error.filename == source else f"{error.filename}: not found"}
        except VideoDecodeError as error:
            return {"reason": error.reason}
        except OSError as error:
            return {"reason": f"{error.filename}: {error.strerror}"}
        return {"outcome": "encoded", "bytes_in": record["size"], "bytes_out": written}


_OUTCOME_SCHEMA = pa.schema(
    [
        ("source", pa.string()),
        ("outcome", pa.string()),
        ("reason", pa.string()),
        ("bytes_in", pa.int64()),
        ("bytes_out", pa.int64()),
    ]
)


def _atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Write a file through a temporary one beside it, renamed into place (same suffix: writers choose by it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.stem}.{uuid.uuid4().hex}.partial{path.suffix}")
    try:
        write(partial)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
