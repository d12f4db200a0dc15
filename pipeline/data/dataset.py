"""Ray Datasets of ready-to-train clips, built from an index; any CPU in the Ray cluster can produce them.

Rows of the index (one per usable video) are shuffled, then `map_batches` tasks decode, sample and transform each
video into uint8 clips. Every iteration re-executes the dataset, so each epoch gets a new order and new clip
positions. A video that fails to decode is skipped, logged and counted (see `pipeline.data.skips`); the job goes on.
A decode that kills its process is retried by Ray (Ray Data retries map tasks without limit, `max_retries=-1`);
a video that kills it twice is skipped and counted the same way.
Each task takes `videos_per_task` videos: more amortise Ray's per-task overhead, fewer stream sooner and hold less
memory. Video files must be readable at the same absolute path on every node (a shared file system).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import ray

from pipeline.data.index import info_from_row, read_usable
from pipeline.data.sampling import ClipSpec, SampledClip, random_clip, segment_frames, uniform_clips
from pipeline.data.skips import DEFAULT_COUNTER, CrashGuard, skip_counter
from pipeline.data.transforms import EvalTransform, TrainTransform
from pipeline.data.video import VideoDecodeError, decode_frames
from pipeline.errors import DataError


@dataclass(frozen=True)
class DecodeTasks:
    """How decoding is cut into Ray tasks and where they run.

    `cpus` per task (also the decoder's thread count), at most `concurrency` at once (None: as many as fit),
    `resources` (custom Ray resources, e.g. {"decode": 1}) to pin them to the nodes that advertise those, such as
    CPU-only decode nodes beside the GPU nodes; `videos_per_task` videos each; failures counted by the skip counter
    named `skip_counter`.
    """

    cpus: float
    concurrency: int | None
    resources: Mapping[str, float]
    videos_per_task: int
    skip_counter: str = DEFAULT_COUNTER


def train_dataset(
    index: str | os.PathLike | pa.Table,
    *,
    spec: ClipSpec,
    transform: TrainTransform,
    num_clips: int,
    tasks: DecodeTasks,
) -> ray.data.Dataset:
    """Shuffled training clips: columns `clip` (uint8, T×crop×crop×3) and `label` (int64).

    Each video gives `num_clips` rows from one decode (repeated augmentation), each at its own random position
    with its own random crop.
    """
    videos = _videos(index, tasks.videos_per_task).random_shuffle()
    return _map(videos, _TrainViews(spec, num_clips, transform), tasks)


def val_dataset(
    index: str | os.PathLike | pa.Table, *, spec: ClipSpec, transform: EvalTransform, tasks: DecodeTasks
) -> ray.data.Dataset:
    """One deterministic view per video, for per-epoch validation: the centre clip, short side resized, centre
    crop (`transform` with one crop). Columns `clip` and `label`."""
    return _map(_videos(index, tasks.videos_per_task), _EvalViews(spec, 1, transform, False), tasks)


def test_dataset(
    index: str | os.PathLike | pa.Table,
    *,
    spec: ClipSpec,
    transform: EvalTransform,
    num_clips: int,
    tasks: DecodeTasks,
) -> ray.data.Dataset:
    """`num_clips` uniformly spaced clips × the transform's 1 or 3 crops per video. Columns `clip`, `label`,
    `video_id` (the video's row in the usable index) and `view` (temporal clip × crops + crop), for averaging
    predictions per video."""
    return _map(_videos(index, tasks.videos_per_task), _EvalViews(spec, num_clips, transform, True), tasks)


test_dataset.__test__ = False  # not a test, though pytest would collect it by name wherever it is imported


def _videos(index: str | os.PathLike | pa.Table, videos_per_task: int) -> ray.data.Dataset:
    usable, _ = read_usable(index)
    if usable.num_rows == 0:
        raise DataError("the index has no usable videos")
    usable = usable.append_column("video_id", pa.array(range(usable.num_rows), pa.int64()))
    return ray.data.from_arrow(usable, override_num_blocks=math.ceil(usable.num_rows / videos_per_task))


def _map(videos: ray.data.Dataset, views: _TrainViews | _EvalViews, tasks: DecodeTasks) -> ray.data.Dataset:
    return videos.map_batches(
        _ClipMaker(views, skip_counter(tasks.skip_counter), threads=max(1, int(tasks.cpus))),
        batch_size=None,
        batch_format="pyarrow",
        compute=ray.data.TaskPoolStrategy(size=tasks.concurrency),
        num_cpus=tasks.cpus,
        resources=dict(tasks.resources) or None,
    )


@dataclass(frozen=True)
class _TrainViews:
    spec: ClipSpec
    num_clips: int
    transform: TrainTransform

    def sample(self, frame_count: int, fps: float, first: int, rng: np.random.Generator) -> list[SampledClip]:
        return [random_clip(frame_count, fps, self.spec, rng, first_frame=first) for _ in range(self.num_clips)]

    def views(self, clips: list[np.ndarray], rng: np.random.Generator) -> list[np.ndarray]:
        return [self.transform(clip, rng) for clip in clips]


@dataclass(frozen=True)
class _EvalViews:
    spec: ClipSpec
    num_clips: int
    transform: EvalTransform
    with_ids: bool

    def sample(self, frame_count: int, fps: float, first: int, rng: np.random.Generator) -> list[SampledClip]:
        return uniform_clips(frame_count, fps, self.spec, self.num_clips, first_frame=first)

    def views(self, clips: list[np.ndarray], rng: np.random.Generator) -> list[np.ndarray]:
        return [view for clip in clips for view in self.transform(clip)]


@dataclass(frozen=True)
class _ClipMaker:
    """The map_batches UDF: index rows in, one output batch of views per decodable video."""

    views: _TrainViews | _EvalViews
    counter: ray.actor.ActorHandle
    threads: int

    def __call__(self, batch: pa.Table) -> Iterator[dict[str, np.ndarray]]:
        rng = np.random.default_rng()  # fresh entropy on every execution: new clip positions and crops each epoch
        guard = CrashGuard(self.counter)
        skipped: list[tuple[str, str]] = []
        clamped = 0
        for row in batch.to_pylist():
            info = info_from_row(row)
            crashed = guard.should_skip(info.path)
            if crashed:
                skipped.append((info.path, crashed))
                continue
            first, count = segment_frames(info.num_frames, info.fps, row.get("start_sec"), row.get("end_sec"))
            clips = self.views.sample(count, info.fps, first, rng)
            indices = np.concatenate([clip.indices for clip in clips])  # one decode for all of a video's clips
            guard.decoding(info.path)
            try:
                frames = decode_frames(info.path, indices, info, threads=self.threads)
            except VideoDecodeError as error:
                skipped.append((info.path, error.reason))
                continue
            clamped += sum(clip.clamped for clip in clips)
            views = self.views.views(np.split(frames, len(clips)), rng)
            yield self._rows(views, row)
        guard.finish(skipped, clamped)

    def _rows(self, views: list[np.ndarray], row: dict[str, Any]) -> dict[str, np.ndarray]:
        columns = {"clip": np.stack(views), "label": np.full(len(views), row["label"], dtype=np.int64)}
        if isinstance(self.views, _EvalViews) and self.views.with_ids:
            columns["video_id"] = np.full(len(views), row["video_id"], dtype=np.int64)
            columns["view"] = np.arange(len(views), dtype=np.int64)
        return columns
