"""decode_frames returns exactly the frames asked for, on videos whose frames carry their own index."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import av
import numpy as np
import pytest

from pipeline.data.video import _packets_from, decode_frames, probe
from tests.videos import (
    H264_BFRAMES_LONG_GOP,
    H264_OPEN_GOP,
    MPEG4_AVI,
    VP9_WEBM,
    VideoSpec,
    read_index,
    sequential_frames,
    write_indexed_video,
)

CASES: dict[str, VideoSpec] = {
    "h264_bframes_long_gop.mp4": H264_BFRAMES_LONG_GOP,
    "h264_open_gop.mkv": H264_OPEN_GOP,
    "vp9.webm": VP9_WEBM,
    "mpeg4.avi": MPEG4_AVI,
    "nonzero_first_pts.mp4": replace(H264_BFRAMES_LONG_GOP, num_frames=50, first_pts=900),
    "nonzero_first_pts.ts": replace(H264_BFRAMES_LONG_GOP, num_frames=50),
    "audio_first.mp4": replace(H264_BFRAMES_LONG_GOP, num_frames=50, audio_first=True),
    "variable_frame_rate.mkv": replace(H264_BFRAMES_LONG_GOP, num_frames=60, pts_gap_every=7),
}


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("indexed")
    return {name: write_indexed_video(folder / name, spec) for name, spec in CASES.items()}


def _mixed_indices(num_frames: int, keyframes: tuple[int, ...]) -> list[int]:
    """Unsorted, with repeats, around every keyframe and at both ends."""
    around_keyframes = [index for keyframe in keyframes for index in (keyframe - 1, keyframe, keyframe + 1)]
    chosen = [num_frames - 1, 7, 3, 7, *around_keyframes, 0, num_frames // 2, 3]
    return [index for index in chosen if 0 <= index < num_frames]


@pytest.mark.parametrize("name", CASES)
def test_decoded_frames_are_exactly_the_requested_ones(videos: dict[str, Path], name: str) -> None:
    path = videos[name]
    info = probe(path)
    assert info.num_frames == CASES[name].num_frames
    indices = _mixed_indices(info.num_frames, info.keyframes)
    frames = decode_frames(path, indices, info)
    assert frames.dtype == np.uint8 and frames.shape == (len(indices), info.height, info.width, 3)
    assert [read_index(frame) for frame in frames] == indices
    reference = sequential_frames(path, set(indices))
    for index, frame in zip(indices, frames):
        np.testing.assert_array_equal(frame, reference[index])


@pytest.mark.parametrize("name", CASES)
def test_single_frames_next_to_keyframes(videos: dict[str, Path], name: str) -> None:
    """Each call starts decoding at a different keyframe, or just misses one."""
    path = videos[name]
    info = probe(path)
    for index in _mixed_indices(info.num_frames, info.keyframes):
        assert read_index(decode_frames(path, [index], info)[0]) == index


def test_the_layouts_under_test_are_what_they_claim(videos: dict[str, Path]) -> None:
    long_gop = probe(videos["h264_bframes_long_gop.mp4"])
    assert long_gop.keyframes == (0, 40, 80) and long_gop.codec == "h264"
    assert probe(videos["vp9.webm"]).codec == "vp9"
    avi = probe(videos["mpeg4.avi"])
    assert avi.codec == "mpeg4" and not avi.pts_ordered  # AVI frames are identified by counting
    assert probe(videos["nonzero_first_pts.mp4"]).pts[0] > 0
    assert probe(videos["nonzero_first_pts.ts"]).pts[0] > 0
    audio_first = probe(videos["audio_first.mp4"])
    assert audio_first.stream_index == 1
    open_gop = probe(videos["h264_open_gop.mkv"])
    assert 30 in open_gop.keyframes
    vfr = probe(videos["variable_frame_rate.mkv"])
    assert np.diff(vfr.pts).max() > 1.8 * np.diff(vfr.pts).min()  # a gap of a whole frame


def test_probe_reports_size_rate_and_duration(videos: dict[str, Path]) -> None:
    info = probe(videos["mpeg4.avi"])
    assert (info.width, info.height, info.fps) == (64, 48, 25.0)
    assert info.duration == pytest.approx(50 / 25)


def test_without_info_and_with_threads_the_frames_are_the_same(videos: dict[str, Path]) -> None:
    path = videos["h264_bframes_long_gop.mp4"]
    indices = [61, 45, 45, 99]
    expected = decode_frames(path, indices, probe(path))
    np.testing.assert_array_equal(decode_frames(path, indices), expected)
    np.testing.assert_array_equal(decode_frames(path, indices, threads=2), expected)


def test_no_indices_give_an_empty_batch(videos: dict[str, Path]) -> None:
    assert decode_frames(videos["vp9.webm"], []).shape == (0, 48, 64, 3)


@pytest.mark.parametrize(
    "name", ["h264_bframes_long_gop.mp4", "h264_open_gop.mkv", "nonzero_first_pts.ts", "vp9.webm", "mpeg4.avi"]
)
def test_decoding_starts_exactly_at_the_keyframe_before_the_first_index(videos: dict[str, Path], name: str) -> None:
    """Not a correctness matter (an earlier start decodes the same frames) but the cost of every clip."""
    info = probe(videos[name])
    for position, keyframe in enumerate(info.keyframes):
        with av.open(str(videos[name])) as container:
            first = next(_packets_from(container, container.streams[info.stream_index], info, keyframe))
            assert first.is_keyframe and first.pts == info.keyframe_pts[position]
