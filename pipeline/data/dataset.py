"""Ray Datasets of ready-to-train clips, built from an index; any CPU in the Ray cluster can produce them.

The index (one row per usable video) is read through `pipeline.data.order.IndexSource`: every epoch, tasks of
`videos_per_task` videos in that epoch's seeded order (training) or in index order (validation, testing), each
video exactly once; `map_batches` then decodes, samples and transforms each video into uint8 clips. Clip positions
and crops come from a random stream seeded by (seed, epoch, video), so a rerun with the same seed sees the same
clips. A clip shrunk from a larger box is converted to RGB straight at its output size by the decoder.
A video that fails to decode is skipped, logged and counted (see `pipeline.data.skips`); the job goes on.
A decode that kills its process is retried by Ray (Ray Data retries map tasks without limit, `max_retries=-1`);
a video that kills it twice while being watched is skipped and counted the same way.
More videos per task amortise Ray's per-task overhead, fewer stream sooner and hold less memory. Video files must
be readable at the same absolute path on every node (a shared file system).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import ray

from pipeline.data.index import info_from_row, info_to_row, read_usable
from pipeline.data.order import EpochOrder, IndexSource, clip_rng, epoch_permutation
from pipeline.data.sampling import ClipSpec, SampledClip, random_clip, segment_frames, uniform_clips
from pipeline.data.skips import DEFAULT_COUNTER, CrashGuard, SkipCounters, decode_slots, skip_counter
from pipeline.data.transforms import Box, EvalTransform, TrainTransform, crop, resize
from pipeline.data.video import FrameCrop, VideoDecodeError, VideoInfo, decode_clips
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
    seed: int,
    epoch: int | str,
) -> ray.data.Dataset:
    """Training clips in a new order every epoch: columns `clip` (uint8, T×crop×crop×3) and `label` (int64).

    Each video gives `num_clips` rows from one decode (repeated augmentation), each at its own random position
    with its own random crop, drawn from (seed, epoch, video). `epoch`: a number, or the name of the
    `pipeline.data.order.EpochClock` that the training loop sets before each epoch.
    """
    videos = _videos(index, tasks, EpochOrder(seed, epoch))
    return _map(videos, _TrainViews(spec, num_clips, transform), tasks, seed)


def val_dataset(
    index: str | os.PathLike | pa.Table,
    *,
    spec: ClipSpec,
    transform: EvalTransform,
    tasks: DecodeTasks,
    epoch: int | str = 0,
) -> ray.data.Dataset:
    """One deterministic view per video, for per-epoch validation: the centre clip, short side resized, centre
    crop (`transform` with one crop). Columns `clip` and `label`. `epoch` (as for `train_dataset`) only files
    the skip counts under the right epoch."""
    videos = _videos(index, tasks, EpochOrder(0, epoch, shuffle=False))
    return _map(videos, _EvalViews(spec, 1, transform, False), tasks, 0)


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
    videos = _videos(index, tasks, None)
    return _map(videos, _EvalViews(spec, num_clips, transform, True), tasks, 0)


test_dataset.__test__ = False  # not a test, though pytest would collect it by name wherever it is imported


def video_test_views(info: VideoInfo, *, spec: ClipSpec, transform: EvalTransform, num_clips: int) -> np.ndarray:
    """The views `test_dataset` cuts from one video (clips × crops, T, H, W, 3), made here; raises VideoDecodeError."""
    maker = _ClipMaker(_EvalViews(spec, num_clips, transform, False), counter=None, threads=1, seed=0)
    return maker.video({"path": info.path, "label": 0, "epoch": 0, "video_id": 0, **info_to_row(info)})[0]["clip"]


def clips_in_a_loop(
    index: pa.Table,
    *,
    spec: ClipSpec,
    transform: TrainTransform,
    num_clips: int,
    seed: int,
    epoch: int,
    fused: bool = True,
) -> Iterator[dict[str, np.ndarray]]:
    """The training clips of one epoch made here, video after video, with no Ray: the work of `train_dataset`'s
    tasks without Ray Data around it (benchmarks compare the two; `fused=False`: resize after decoding)."""
    usable, _ = read_usable(index)
    order = epoch_permutation(usable.num_rows, seed, epoch)
    maker = _ClipMaker(_TrainViews(spec, num_clips, transform, fused), counter=None, threads=1, seed=seed)
    for video_id, row in zip(order, usable.take(order).to_pylist()):
        yield maker.video({**row, "epoch": epoch, "video_id": int(video_id)})[0]


def _videos(index: str | os.PathLike | pa.Table, tasks: DecodeTasks, order: EpochOrder | None) -> ray.data.Dataset:
    usable, _ = read_usable(index)
    if usable.num_rows == 0:
        raise DataError("the index has no usable videos")
    usable = usable.append_column("video_id", pa.array(range(usable.num_rows), pa.int64()))
    source = IndexSource(usable, tasks.videos_per_task, order)
    # The same resources as the decode step, so that Ray Data fuses reading a task's rows into its decode task.
    return ray.data.read_datasource(source, override_num_blocks=source.num_tasks, **_remote_args(tasks))


def _map(videos: ray.data.Dataset, views: _TrainViews | _EvalViews, tasks: DecodeTasks, seed: int) -> ray.data.Dataset:
    counter = skip_counter(tasks.skip_counter, decode_slots(tasks.concurrency, tasks.cpus))
    maker = _ClipMaker(views, counter, threads=max(1, int(tasks.cpus)), seed=seed)
    return videos.map_batches(maker, batch_size=None, batch_format="pyarrow", **_remote_args(tasks))


def _remote_args(tasks: DecodeTasks) -> dict[str, Any]:
    return {
        "compute": ray.data.TaskPoolStrategy(size=tasks.concurrency),
        "num_cpus": tasks.cpus,
        "resources": dict(tasks.resources) or None,
    }


@dataclass(frozen=True)
class _Plan:
    """One clip of a video as planned before decoding: its frames, its box, and the crop the decoder applies (None:
    the whole frame is decoded and cut afterwards)."""

    clip: SampledClip
    box: Box | None
    crop: FrameCrop | None


@dataclass(frozen=True)
class _TrainViews:
    spec: ClipSpec
    num_clips: int
    transform: TrainTransform
    fused: bool = True  # False: always decode whole frames and resize afterwards (benchmarks compare the two)

    def plan(self, count: int, info: VideoInfo, first: int, rng: np.random.Generator) -> list[_Plan]:
        times = _segment_times(info, first, count)
        clips = [
            random_clip(count, info.fps, self.spec, rng, first_frame=first, times=times) for _ in range(self.num_clips)
        ]
        boxes = [self.transform.box(info.height, info.width, rng) for _ in clips]
        size = self.transform.crop_size
        # The decoder scales a box that shrinks (converting straight to the output size, bilinear as swscale does);
        # a smaller one, or a bicubic crop resize, is cut from the whole frame and resized afterwards.
        fuse = self.fused and self.transform.interpolation == "bilinear"
        return [
            _Plan(clip, box, FrameCrop(box, (size, size)) if fuse and min(box[2:]) >= size else None)
            for clip, box in zip(clips, boxes)
        ]

    def views(self, clips: list[np.ndarray], plans: list[_Plan], rng: np.random.Generator) -> list[np.ndarray]:
        size = self.transform.crop_size
        return [
            self.transform.finish(
                clip if plan.crop else resize(crop(clip, plan.box), size, size, self.transform.interpolation), rng
            )
            for clip, plan in zip(clips, plans)
        ]


@dataclass(frozen=True)
class _EvalViews:
    spec: ClipSpec
    num_clips: int
    transform: EvalTransform
    with_ids: bool

    def plan(self, count: int, info: VideoInfo, first: int, rng: np.random.Generator) -> list[_Plan]:
        times = _segment_times(info, first, count)
        clips = uniform_clips(count, info.fps, self.spec, self.num_clips, first_frame=first, times=times)
        # Whole frames, resized after decoding: test views stay exact to the reference resize (the fused swscale
        # resize moves pixels by up to half a pixel, acceptable for random training crops, not for test scores).
        return [_Plan(clip, None, None) for clip in clips]

    def views(self, clips: list[np.ndarray], plans: list[_Plan], rng: np.random.Generator) -> list[np.ndarray]:
        return [view for clip in clips for view in self.transform(clip)]


def _segment_times(info: VideoInfo, first: int, count: int) -> np.ndarray | None:
    times = info.frame_times()
    return None if times is None else times[first : first + count]


@dataclass(frozen=True)
class _ClipMaker:
    """The map_batches UDF: index rows in, one output batch of views per decodable video."""

    views: _TrainViews | _EvalViews
    counter: SkipCounters | None  # None: used outside Ray Data (`clips_in_a_loop`)
    threads: int
    seed: int

    def __call__(self, batch: pa.Table) -> Iterator[dict[str, np.ndarray]]:
        guard = CrashGuard(self.counter)
        skipped: list[tuple[str, str]] = []
        clamped = 0
        for row in batch.to_pylist():
            crashed = guard.should_skip(row["path"])
            if crashed:
                skipped.append((row["path"], crashed))
                continue
            guard.decoding(row["path"])
            try:
                columns, clamped_here = self.video(row)
            except VideoDecodeError as error:
                skipped.append((row["path"], error.reason))
                continue
            clamped += clamped_here
            yield columns
        guard.finish(batch.column("epoch")[0].as_py() if batch.num_rows else 0, skipped, clamped)

    def video(self, row: dict[str, Any]) -> tuple[dict[str, np.ndarray], int]:
        """The rows of one video's views, and how many of its clips were clamped; raises VideoDecodeError."""
        info = info_from_row(row)
        rng = clip_rng(self.seed, row["epoch"], row["video_id"])
        times = info.frame_times()
        first, count = segment_frames(info.num_frames, info.fps, row.get("start_sec"), row.get("end_sec"), times)
        plans = self.views.plan(count, info, first, rng)
        requests = [(plan.clip.indices, plan.crop) for plan in plans]
        clips = decode_clips(info.path, requests, info, threads=self.threads)  # one decode for all of its clips
        views = self.views.views(clips, plans, rng)
        return self._rows(views, row), sum(plan.clip.clamped for plan in plans)

    def _rows(self, views: list[np.ndarray], row: dict[str, Any]) -> dict[str, np.ndarray]:
        columns = {"clip": np.stack(views), "label": np.full(len(views), row["label"], dtype=np.int64)}
        if isinstance(self.views, _EvalViews) and self.views.with_ids:
            columns["video_id"] = np.full(len(views), row["video_id"], dtype=np.int64)
            columns["view"] = np.arange(len(views), dtype=np.int64)
        return columns
