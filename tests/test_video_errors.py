"""Every way a video can be unusable raises VideoDecodeError, quickly, naming the path and the reason."""

from __future__ import annotations

import pickle
import time
from dataclasses import replace
from pathlib import Path

import pytest

from pipeline.data.video import VideoDecodeError, decode_frames, probe
from tests.videos import H264_BFRAMES_LONG_GOP, read_index, write_bad_videos, write_indexed_video

pytestmark = pytest.mark.faults  # bad input: part of the fault suite (`pytest -m faults`)

UNREADABLE = [
    "missing",
    "empty",
    "truncated index at the end",
    "truncated index at the front",
    "truncated webm",
    "not a video",
    "no video stream",
    "a still image",
]


@pytest.fixture(scope="module")
def bad_videos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, str]]:
    return write_bad_videos(tmp_path_factory.mktemp("bad"))


@pytest.mark.parametrize("name", UNREADABLE)
def test_bad_input_raises_a_one_line_error_within_seconds(bad_videos: dict[str, tuple[Path, str]], name: str) -> None:
    path, reason_word = bad_videos[name]
    started = time.monotonic()
    with pytest.raises(VideoDecodeError) as raised:
        decode_frames(path, [0])
    assert time.monotonic() - started < 5
    error = raised.value
    assert error.path == str(path) and reason_word in error.reason
    assert str(error) == f"{path}: {error.reason}" and "\n" not in str(error)


def test_an_index_past_the_end_raises_and_never_pads(tmp_path: Path) -> None:
    path = write_indexed_video(tmp_path / "short.mp4", replace(H264_BFRAMES_LONG_GOP, num_frames=20))
    for indices in ([20], [3, 25], [-1]):
        with pytest.raises(VideoDecodeError, match="past the end"):
            decode_frames(path, indices)


def test_the_index_probe_catches_a_last_gop_that_does_not_decode(bad_videos: dict[str, tuple[Path, str]]) -> None:
    corrupt, _ = bad_videos["corrupt last GOP"]
    info = probe(corrupt)  # demuxing alone sees nothing wrong
    with pytest.raises(VideoDecodeError, match="last frame does not decode"):
        probe(corrupt, check_last_frame=True)
    with pytest.raises(VideoDecodeError, match="decoding failed"):
        decode_frames(corrupt, [info.num_frames - 5], info)
    assert read_index(decode_frames(corrupt, [10], info)[0]) == 10  # the rest still decodes


def test_the_error_survives_pickling_for_ray() -> None:
    error = pickle.loads(pickle.dumps(VideoDecodeError("/v.mp4", "empty file")))
    assert (error.path, error.reason, str(error)) == ("/v.mp4", "empty file", "/v.mp4: empty file")
