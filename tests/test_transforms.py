"""Spatial transforms: uint8 in and out, one random choice per clip applied to every frame."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from pipeline.data.transforms import (
    EvalTransform,
    inception_box,
    resize,
    scale_jitter_box,
    short_side_resize,
    spatial_crops,
)
from tests.clips import train_transform


def _coordinates_clip(frames: int, height: int, width: int) -> np.ndarray:
    """Red = column, green = row, blue = frame number: every pixel says where it came from."""
    rows, columns = np.mgrid[0:height, 0:width]
    clip = np.empty((frames, height, width, 3), dtype=np.uint8)
    clip[..., 0], clip[..., 1] = columns, rows
    clip[..., 2] = np.arange(frames)[:, None, None]
    return clip


def test_resize_keeps_uint8_and_short_side_resize_keeps_the_aspect() -> None:
    clip = _coordinates_clip(3, 48, 64)
    assert resize(clip, 24, 32).dtype == np.uint8
    assert short_side_resize(clip, 96).shape == (3, 96, 128, 3)
    assert short_side_resize(clip.transpose(0, 2, 1, 3), 24).shape == (3, 32, 24, 3)


@pytest.mark.parametrize("random_resized_crop", [False, True])
def test_every_frame_of_a_clip_gets_the_same_crop_and_flip(random_resized_crop: bool) -> None:
    transform = train_transform(short_side=(40, 60), random_resized_crop=random_resized_crop)
    still = np.repeat(_coordinates_clip(1, 60, 80), 6, axis=0)  # six identical frames
    rng = np.random.default_rng(0)
    for _ in range(20):
        out = transform(still, rng)
        assert out.shape == (6, 32, 32, 3) and out.dtype == np.uint8
        assert all(np.array_equal(frame, out[0]) for frame in out)


def test_scale_jitter_box_is_the_crop_of_a_randomly_rescaled_frame() -> None:
    rng = np.random.default_rng(0)
    sides, tops = set(), set()
    for _ in range(500):
        top, left, height, width = scale_jitter_box(240, 320, 224, (256, 320), rng)
        assert height == width and 168 <= height <= 210  # 224 · 240/320 … 224 · 240/256
        assert 0 <= top <= 240 - height and 0 <= left <= 320 - width
        sides.add(height)
        tops.add(top)
    assert min(sides) == 168 and max(sides) == 210 and len(tops) > 20
    with pytest.raises(ValueError):
        scale_jitter_box(240, 320, 224, (200, 320), rng)


def test_inception_box_respects_area_and_aspect_and_falls_back_to_the_centre() -> None:
    rng = np.random.default_rng(0)
    for _ in range(300):
        top, left, height, width = inception_box(240, 320, (0.08, 1.0), (3 / 4, 4 / 3), rng)
        assert 0.07 <= height * width / (240 * 320) <= 1.0
        assert 0.7 <= width / height <= 1.4
        assert top + height <= 240 and left + width <= 320
    assert inception_box(240, 320, (2.0, 3.0), (3 / 4, 4 / 3), rng) == (0, 0, 240, 320)
    assert inception_box(240, 400, (2.0, 3.0), (3 / 4, 4 / 3), rng) == (0, 40, 240, 320)


def test_flip_happens_about_half_the_time_and_only_when_asked() -> None:
    clip = _coordinates_clip(2, 32, 32)
    rng = np.random.default_rng(0)
    flipping = train_transform()
    flipped = sum(int(flipping(clip, rng)[0, 0, 0, 0] == 31) for _ in range(400))
    assert 150 < flipped < 250
    steady = train_transform(flip=False)
    assert all(np.array_equal(steady(clip, rng), clip) for _ in range(20))


def test_augments_run_in_order_after_crop_and_flip() -> None:
    calls = []

    def invert(clip: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        calls.append(("invert", clip.shape))
        return 255 - clip

    def halve(clip: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        calls.append(("halve", clip.shape))
        return clip // 2

    plain = train_transform()
    augmented = replace(plain, augments=(invert, halve))
    clip = _coordinates_clip(2, 32, 48)
    out = augmented(clip, np.random.default_rng(3))
    assert calls == [("invert", (2, 32, 32, 3)), ("halve", (2, 32, 32, 3))]
    np.testing.assert_array_equal(out, (255 - plain(clip, np.random.default_rng(3))) // 2)


@pytest.mark.parametrize(
    ("height", "width", "starts"), [(32, 48, [(0, 0), (0, 8), (0, 16)]), (48, 32, [(0, 0), (8, 0), (16, 0)])]
)
def test_three_crops_run_along_the_longer_side(height: int, width: int, starts: list[tuple[int, int]]) -> None:
    crops = spatial_crops(_coordinates_clip(1, height, width), 32, 3)
    assert [(int(crop[0, 0, 0, 1]), int(crop[0, 0, 0, 0])) for crop in crops] == starts
    (centre,) = spatial_crops(_coordinates_clip(1, height, width), 32, 1)
    assert (int(centre[0, 0, 0, 1]), int(centre[0, 0, 0, 0])) == starts[1]


def test_eval_transform_resizes_the_short_side_then_crops() -> None:
    views = EvalTransform(short_side=40, crop_size=32, num_crops=3)(_coordinates_clip(4, 60, 80))
    assert len(views) == 3 and all(view.shape == (4, 32, 32, 3) and view.dtype == np.uint8 for view in views)
    with pytest.raises(ValueError):
        EvalTransform(short_side=24, crop_size=32, num_crops=1)(_coordinates_clip(1, 60, 80))
