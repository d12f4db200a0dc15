"""Videos that decode silently wrong unless handled: a rotation in the display matrix, a variable frame rate, AVI
timestamps; and how far the fused resize (converting straight to the output size) moves pixels."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from pipeline.data.sampling import ClipSpec, random_clip, uniform_clips
from pipeline.data.transforms import crop, resize
from pipeline.data.video import FrameCrop, decode_clips, decode_frames, probe
from tests.videos import H264_BFRAMES_LONG_GOP, MPEG4_AVI, read_index, sequential_frames, write_indexed_video

ROTATED = replace(H264_BFRAMES_LONG_GOP, num_frames=30, width=64, height=80)


@pytest.mark.parametrize("rotation", [90, 180, 270])
def test_frames_come_out_as_displayed(tmp_path: Path, rotation: int) -> None:
    path = write_indexed_video(tmp_path / f"rotated{rotation}.mp4", replace(ROTATED, rotation=rotation))
    info = probe(path)
    shown = (80, 64) if rotation == 180 else (64, 80)
    assert (info.rotation, info.height, info.width) == (rotation, *shown)
    indices = [29, 3, 17, 0]
    frames = decode_frames(path, indices, info)
    assert frames.shape == (4, *shown, 3)
    assert [read_index(frame) for frame in frames] == indices


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="the ffmpeg command is not installed")
def test_rotation_matches_ffmpeg_autorotate(tmp_path: Path) -> None:
    """FFmpeg's own command turns frames by the display matrix (autorotate): the same frames, pixel for pixel."""
    path = write_indexed_video(tmp_path / "rotated.mp4", replace(ROTATED, rotation=90))
    raw = subprocess.run(
        ["ffmpeg", "-v", "error", "-i", str(path), "-f", "rawvideo", "-pix_fmt", "rgb24", "-"],
        capture_output=True,
        check=True,
    ).stdout
    reference = np.frombuffer(raw, np.uint8).reshape(-1, 64, 80, 3)
    ours = decode_frames(path, range(ROTATED.num_frames))
    assert ours.shape == reference.shape
    assert np.abs(ours.astype(int) - reference).max() <= 2  # the same conversion, up to its rounding


def test_a_variable_frame_rate_video_is_sampled_by_time(tmp_path: Path) -> None:
    """30 fps for 40 frames, then 10 fps: each sample is the frame on screen τ / target_fps seconds after the last."""
    spec = replace(H264_BFRAMES_LONG_GOP, num_frames=90, slow_from=40)
    path = write_indexed_video(tmp_path / "vfr.mkv", spec)
    info = probe(path)
    times = info.frame_times()
    assert times is not None and np.diff(times)[-1] == pytest.approx(3 * np.diff(times)[0], rel=0.05)
    clip_spec = ClipSpec(num_frames=8, sampling_rate=4, target_fps=30.0)
    clips = uniform_clips(info.num_frames, info.fps, clip_spec, 3, times=times)
    clips += [
        random_clip(info.num_frames, info.fps, clip_spec, np.random.default_rng(n), times=times) for n in range(4)
    ]
    for clip in clips:
        shown = [read_index(frame) for frame in decode_frames(path, clip.indices, info)]
        moments = times[shown[0]] + np.arange(8) * 4 / 30
        on_screen = [int(np.searchsorted(times, moment + 1e-6, side="right")) - 1 for moment in moments]
        assert shown == on_screen
    assert any(np.diff(clip.indices).min() < np.diff(clip.indices).max() for clip in clips)  # spans the change


def test_avi_timestamps_proved_by_a_decode_let_frames_be_skipped_exactly(tmp_path: Path) -> None:
    """An AVI with B-frames whose frames decode with exactly the probed timestamps is identified by them (so the
    decoder may skip frames nothing needs); the frames stay exact."""
    path = write_indexed_video(tmp_path / "bframes.avi", MPEG4_AVI)
    assert not probe(path).pts_ordered
    info = probe(path, check_last_frame=True)
    assert info.pts_ordered
    indices = [49, 2, 30, 31, 14, 15, 16, 0]
    reference = sequential_frames(path, set(indices))
    for index, frame in zip(indices, decode_frames(path, indices, info)):
        assert read_index(frame) == index
        np.testing.assert_array_equal(frame, reference[index])


def test_avi_whose_decoded_timestamps_disagree_stays_counted(shared_videos: Path) -> None:
    """The shared AVI packs B-frames (its decoded timestamps come out of order): identified by counting still."""
    assert not probe(shared_videos / "mpeg4_with_audio.avi", check_last_frame=True).pts_ordered


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(255**2 / np.mean((a.astype(np.float64) - b) ** 2)))


@pytest.mark.parametrize(
    ("box", "least_psnr"),
    [
        ((0, 0, 256, 340), 37),  # the whole frame (validation's resize): no offset, only the filters differ
        ((25, 50, 200, 200), 33),  # a box whose corner lands on a whole output pixel
        ((10, 20, 200, 200), 27),  # a corner 0.4 px off the output grid: rounded, so the view moves by 0.4 px
    ],
)
def test_fused_resize_is_the_same_box_up_to_rounding(shared_videos: Path, box: tuple[int, ...], least_psnr: float):
    """The box converted straight to its output size against the whole frame decoded, cropped and resized (the
    path before fusing). Its corner is rounded to the output grid (at most 0.5 px off)."""
    path = shared_videos / "k400_demo_340x256.mp4"
    info = probe(path)
    indices = [0, 60, 61, 200]
    size = (112, 112) if box[2] == box[3] else (84, 112)
    (fused,) = decode_clips(path, [(indices, FrameCrop(box, size))], info)
    after = resize(crop(decode_frames(path, indices, info), box), *size)
    assert fused.shape == after.shape == (4, *size, 3)
    assert _psnr(fused, after) > least_psnr


def test_fused_resize_of_a_rotated_video_cuts_the_displayed_box(tmp_path: Path) -> None:
    path = write_indexed_video(tmp_path / "rotated.mp4", replace(ROTATED, rotation=270))
    info = probe(path)
    box = (4, 8, 48, 64)
    (fused,) = decode_clips(path, [([5, 9], FrameCrop(box, (24, 32)))], info)
    after = resize(crop(decode_frames(path, [5, 9], info), box), 24, 24 * 64 // 48)
    assert np.abs(fused.astype(int) - after).mean() < 8
