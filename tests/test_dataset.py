"""Ray Datasets of clips: shapes and dtypes, per-epoch randomness, exact eval views, and counted skips."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import ray

from pipeline.data import dataset
from pipeline.data.sampling import uniform_clips
from pipeline.data.skips import SkipSnapshot, skip_counter
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
    tasks = decode_tasks()
    transform = train_transform(short_side=(32, 40))
    clips = dataset.train_dataset(index, spec=SPEC, transform=transform, num_clips=2, tasks=tasks)
    handle = skip_counter(tasks.skip_counter)

    epochs = []
    for _ in range(2):
        before = ray.get(handle.totals.remote())
        rows = clips.take_all()
        epochs.append(rows)
        assert ray.get(handle.totals.remote()) - before == SkipSnapshot(skipped=2, clamped=2)  # short: 2 clips
        assert sorted(row["label"] for row in rows) == [0, 0, 1, 1, 2, 2, 3, 3]
        for row in rows:
            assert row["clip"].dtype == np.uint8 and row["clip"].shape == (8, 32, 32, 3)
    reasons = ray.get(handle.reasons.remote())
    assert set(reasons) == {str(videos["broken_early"]), str(videos["vanishing"])}
    assert reasons[str(videos["vanishing"])] == "file not found"
    assert ray.get(handle.totals.remote()).skipped == 4
    first, second = ([row["clip"] for row in sorted(rows, key=lambda row: row["label"])] for rows in epochs)
    assert not all(np.array_equal(a, b) for a, b in zip(first, second))  # new positions and crops each epoch


def test_each_epoch_is_shuffled_anew(ray_session, videos: dict[str, Path]) -> None:
    index = index_of([videos[name] for name in ["webm"] * 12])
    tasks = decode_tasks(concurrency=1)
    clips = dataset.train_dataset(index, spec=SPEC, transform=train_transform(), num_clips=1, tasks=tasks)
    orders = [[row["label"] for row in clips.take_all()] for _ in range(3)]
    assert all(sorted(order) == list(range(12)) for order in orders)
    assert len({tuple(order) for order in orders}) > 1


def test_val_views_are_the_centre_clip_resized_and_centre_cropped_exactly(ray_session, videos: dict[str, Path]) -> None:
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
