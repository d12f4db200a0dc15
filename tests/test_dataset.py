"""Ray Datasets of clips: shapes and dtypes, the seeded order and clips of each epoch, exact eval views, and counted
skips and clamps per epoch."""

from __future__ import annotations

import uuid
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import ray

from pipeline.data import dataset
from pipeline.data.order import EpochOrder, IndexSource, set_epoch
from pipeline.data.sampling import uniform_clips
from pipeline.data.skips import SLOTS_PER_SHARD, SkipSnapshot, skip_counter
from pipeline.data.video import decode_frames, probe
from tests.clips import SPEC, decode_tasks, eval_transform, train_transform
from tests.videos import H264_BFRAMES_LONG_GOP, MPEG4_AVI, VP9_WEBM, corrupt_keyframes, index_of, write_indexed_video


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("clips")
    long_gop = write_indexed_video(folder / "long_gop.mp4", H264_BFRAMES_LONG_GOP)
    return {
        "long_gop": long_gop,
        "webm": write_indexed_video(folder / "vp9.webm", VP9_WEBM),
        "avi": write_indexed_video(folder / "mpeg4.avi", MPEG4_AVI),
        "short": write_indexed_video(folder / "short.mp4", replace(H264_BFRAMES_LONG_GOP, num_frames=20)),
        # Passes the index (its last GOP decodes) but no clip of it can: it starts in a broken GOP.
        "broken_early": corrupt_keyframes(long_gop, folder / "broken_early.mp4", [0, 1]),
        "vanishing": write_indexed_video(folder / "vanishing.mp4", VP9_WEBM),
    }


@pytest.mark.faults
def test_train_clips_are_uint8_rows_per_clip_and_failures_are_skipped_and_counted_each_epoch(
    ray_session, videos: dict[str, Path]
) -> None:
    names = ["long_gop", "webm", "avi", "short", "broken_early", "vanishing"]
    index = index_of([videos[name] for name in names])
    videos["vanishing"].unlink()  # gone after indexing: found only when decoding
    tasks = decode_tasks(videos_per_task=1)  # 6 tasks an epoch, spread over the counter's shards by task id
    transform = train_transform(short_side=(32, 40))
    handle = skip_counter(tasks.skip_counter, decode_slots=4 * SLOTS_PER_SHARD)  # 4 shards, as a large cluster has
    assert len(handle.shards) == 4

    epochs = []
    for epoch in range(2):
        clips = dataset.train_dataset(
            index, spec=SPEC, transform=transform, num_clips=2, tasks=tasks, seed=0, epoch=epoch
        )
        rows = clips.take_all()
        epochs.append(rows)
        assert handle.counts(epoch) == SkipSnapshot(skipped=2, clamped=2)  # short: 2 clips
        assert sorted(row["label"] for row in rows) == [0, 0, 1, 1, 2, 2, 3, 3]
        for row in rows:
            assert row["clip"].dtype == np.uint8 and row["clip"].shape == (8, 32, 32, 3)
    reasons = handle.reasons()
    assert set(reasons) == {str(videos["broken_early"]), str(videos["vanishing"])}
    assert reasons[str(videos["vanishing"])] == "file not found"
    assert handle.totals().skipped == 4
    reported = ray.get([shard.__ray_call__.remote(lambda shard: len(shard._counts)) for shard in handle.shards])
    assert sum(1 for epochs_seen in reported if epochs_seen) >= 2, reported  # 12 tasks all on one: p = 2e-7
    first, second = ([row["clip"] for row in sorted(rows, key=lambda row: row["label"])] for rows in epochs)
    assert not all(np.array_equal(a, b) for a, b in zip(first, second))  # new positions and crops each epoch


def test_the_seed_and_the_epoch_fix_the_order_and_the_clips(ray_session, videos: dict[str, Path]) -> None:
    """Each epoch is a new permutation of every video (once each, in tasks of 4); the same seed and epoch give the
    same order and the same clips, through a fixed epoch or the epoch clock; another epoch or seed gives others."""
    index = index_of([videos[name] for name in ["webm", "long_gop", "avi"] * 4])
    tasks = decode_tasks(videos_per_task=4)
    clock = f"test-epoch-{uuid.uuid4().hex}"
    runs = {"0/0": (0, 0), "0/1": (0, 1), "0/clock=1": (0, clock), "1/1": (1, 1)}

    def order(seed: int, epoch: int | str) -> list[int]:
        source = IndexSource(index, 4, EpochOrder(seed, epoch))
        set_epoch(clock, 1)  # as a training loop does, once the datasets exist
        read_tasks = source.get_read_tasks(1)
        assert [task.metadata.num_rows for task in read_tasks] == [4, 4, 4]
        return [video for task in read_tasks for part in task() for video in part.column("label").to_pylist()]

    orders = {name: order(*run) for name, run in runs.items()}
    assert all(sorted(found) == list(range(12)) for found in orders.values())
    assert orders["0/1"] == orders["0/clock=1"]
    assert len({tuple(orders[name]) for name in ("0/0", "0/1", "1/1")}) == 3

    def clips(seed: int, epoch: int | str) -> list[np.ndarray]:
        rows = dataset.train_dataset(
            index, spec=SPEC, transform=train_transform(), num_clips=1, tasks=tasks, seed=seed, epoch=epoch
        ).take_all()
        assert sorted(row["label"] for row in rows) == list(range(12))  # every video once
        return [row["clip"] for row in sorted(rows, key=lambda row: row["label"])]

    same = clips(0, 1)
    clocked = dataset.train_dataset(
        index, spec=SPEC, transform=train_transform(), num_clips=1, tasks=tasks, seed=0, epoch=clock
    )
    set_epoch(clock, 1)
    assert all(
        np.array_equal(a, row["clip"]) for a, row in zip(same, sorted(clocked.take_all(), key=lambda r: r["label"]))
    )
    for other in (clips(0, 0), clips(1, 1)):
        assert sum(np.array_equal(a, b) for a, b in zip(same, other)) < 3


def test_an_index_of_many_chunks_is_stored_as_one(ray_session, videos: dict[str, Path]) -> None:
    """A concatenation of per-file tables has a chunk per file in every column: shipped as it is, each reader of
    the index (the planner on the driver, the split coordinator) rebuilt every chunk, ~2.4 million arrays for a
    240k-row index (jobs.benchmark scale: 6.6 GB of driver memory, BENCHMARKS.md)."""
    one = index_of([videos["webm"], videos["long_gop"]])
    index = pa.concat_tables([one] * 50)
    assert index.column("path").num_chunks == 50
    source = IndexSource(index, 16, EpochOrder(0, 0))
    stored = ray.get(source._index)
    assert {column.num_chunks for column in stored.columns} == {1} and stored.equals(index)
    read = [part for task in source.get_read_tasks(1) for part in task()]
    assert sum(part.num_rows for part in read) == 100


def test_val_views_are_the_centre_clip_resized_and_centre_cropped_exactly(ray_session, videos: dict[str, Path]) -> None:
    """Exactly the reference: whole frames decoded, then the short side resized and the centre cropped (no fused
    resize for evaluation views)."""
    index = index_of([videos[name] for name in ["long_gop", "avi"]])
    rows = dataset.val_dataset(index, spec=SPEC, transform=eval_transform(40), tasks=decode_tasks()).take_all()
    assert sorted(row["label"] for row in rows) == [0, 1]
    for row in rows:
        path = index.column("path")[row["label"]].as_py()
        info = probe(path)
        (clip,) = uniform_clips(info.num_frames, info.fps, SPEC, 1)
        (expected,) = eval_transform(40)(decode_frames(path, clip.indices))
        np.testing.assert_array_equal(row["clip"], expected)


def test_test_views_are_k_clips_times_s_crops_per_video(ray_session, videos: dict[str, Path]) -> None:
    index = index_of([videos[name] for name in ["long_gop", "webm"]])
    views = dataset.test_dataset(
        index, spec=SPEC, transform=eval_transform(num_crops=3), num_clips=2, tasks=decode_tasks(videos_per_task=4)
    ).take_all()
    assert len(views) == 2 * 2 * 3
    by_video = {}
    for row in views:
        assert row["label"] == row["video_id"]  # labels were set to the row number
        by_video.setdefault(row["video_id"], []).append(row["view"])
    assert {video: sorted(found) for video, found in by_video.items()} == {0: list(range(6)), 1: list(range(6))}
