"""Clip indices against hand-computed cases: T = 16, τ = 4, target 30 fps, on 30 fps and 25 fps videos, K = 5."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.data.sampling import (
    ClipSpec,
    clip_offsets,
    last_start,
    random_clip,
    segment_frames,
    uniform_clips,
)

SPEC_16x4 = ClipSpec(num_frames=16, sampling_rate=4, target_fps=30.0)
# At 30 fps samples are 4 frames apart; at 25 fps they are 4 × 25/30 = 10/3 frames apart, floored.
OFFSETS_30 = [0, 4, 8, 12, 16, 20, 24, 28, 32, 36, 40, 44, 48, 52, 56, 60]
OFFSETS_25 = [0, 3, 6, 10, 13, 16, 20, 23, 26, 30, 33, 36, 40, 43, 46, 50]


@pytest.mark.parametrize(("fps", "offsets"), [(30.0, OFFSETS_30), (25.0, OFFSETS_25)])
def test_clip_offsets(fps: float, offsets: list[int]) -> None:
    assert clip_offsets(fps, SPEC_16x4).tolist() == offsets


@pytest.mark.parametrize(
    ("frames", "fps", "offsets", "starts"),
    [
        # 300 frames at 30 fps: starts 0..239; clip k starts at 239·(2k+1)/10 rounded: 23.9, 71.7, 119.5, 167.3, 215.1
        (300, 30.0, OFFSETS_30, [24, 72, 120, 167, 215]),
        # 250 frames at 25 fps: starts 0..199: 19.9, 59.7, 99.5, 139.3, 179.1
        (250, 25.0, OFFSETS_25, [20, 60, 100, 139, 179]),
    ],
)
def test_five_test_clips_are_uniformly_spaced(frames: int, fps: float, offsets: list[int], starts: list[int]) -> None:
    clips = uniform_clips(frames, fps, SPEC_16x4, 5)
    assert [clip.indices.tolist() for clip in clips] == [[start + offset for offset in offsets] for start in starts]
    assert not any(clip.clamped for clip in clips)


def test_one_test_clip_is_the_centre_clip() -> None:
    (clip,) = uniform_clips(300, 30.0, SPEC_16x4, 1)
    assert clip.indices[0] == 120 and clip.indices[-1] == 180  # 120 frames before it, 119 after


@pytest.mark.parametrize(("frames", "fps", "offsets"), [(300, 30.0, OFFSETS_30), (250, 25.0, OFFSETS_25)])
def test_training_clips_keep_their_shape_and_cover_every_start(frames: int, fps: float, offsets: list[int]) -> None:
    rng = np.random.default_rng(0)
    starts = set()
    for _ in range(3000):
        clip = random_clip(frames, fps, SPEC_16x4, rng)
        assert (clip.indices - clip.indices[0]).tolist() == offsets and not clip.clamped
        starts.add(int(clip.indices[0]))
    assert starts == set(range(last_start(frames, fps, SPEC_16x4) + 1))


def test_a_video_shorter_than_a_clip_is_clamped_and_says_so() -> None:
    rng = np.random.default_rng(0)
    clip = random_clip(50, 30.0, SPEC_16x4, rng)  # needs 61 frames
    assert clip.clamped
    assert clip.indices.tolist() == [*OFFSETS_30[:13], 49, 49, 49]
    assert all(clip.clamped for clip in uniform_clips(50, 30.0, SPEC_16x4, 5))
    assert not random_clip(61, 30.0, SPEC_16x4, rng).clamped


def test_a_segment_offsets_indices_and_bounds_them() -> None:
    first, count = segment_frames(300, 30.0, start_sec=2.0, end_sec=5.0)
    assert (first, count) == (60, 90)
    rng = np.random.default_rng(1)
    for _ in range(200):
        indices = random_clip(count, 30.0, SPEC_16x4, rng, first_frame=first).indices
        assert indices.min() >= 60 and indices.max() < 150
    assert segment_frames(300, 30.0, None, None) == (0, 300)
    assert segment_frames(300, 30.0, 9.0, 20.0) == (270, 30)


def test_invalid_specs_are_refused() -> None:
    with pytest.raises(ValueError):
        ClipSpec(num_frames=0, sampling_rate=4, target_fps=30.0)
    with pytest.raises(ValueError):
        uniform_clips(300, 30.0, SPEC_16x4, 0)
