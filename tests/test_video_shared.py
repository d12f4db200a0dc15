"""The real videos of ../shared/data/videos: probe agrees with their README, clips agree with sequential decoding."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.data.sampling import ClipSpec, random_clip
from pipeline.data.video import decode_frames, probe
from tests.videos import sequential_frames

# name -> (frames, keyframes, width, height, fps) as the README of shared/data states them
README = {
    "k400_demo_340x256.mp4": (280, (0, 187, 230, 268), 340, 256, 28.0),
    "ntsc_29.97fps.mp4": (300, (0, 250), 426, 240, 30000 / 1001),
    "mpeg4_with_audio.avi": (164, (0,), 320, 240, 25.0),
    "h264_1080p_short.mp4": (72, (0,), 1920, 1080, None),
}


@pytest.mark.parametrize("name", README)
def test_probe_matches_the_readme(shared_videos: Path, name: str) -> None:
    frames, keyframes, width, height, fps = README[name]
    info = probe(shared_videos / name, check_last_frame=True)
    assert (info.num_frames, info.keyframes, info.width, info.height) == (frames, keyframes, width, height)
    if fps is not None:
        assert info.fps == pytest.approx(fps)


@pytest.mark.parametrize("name", README)
def test_random_clips_match_sequential_decoding(shared_videos: Path, name: str) -> None:
    path = shared_videos / name
    info = probe(path)
    rng = np.random.default_rng(7)
    clips = [random_clip(info.num_frames, info.fps, ClipSpec(16, 4, 30.0), rng).indices.tolist() for _ in range(2)]
    keyframe_edges = [[keyframe - 1, keyframe] for keyframe in info.keyframes if keyframe > 0]
    requests = clips + keyframe_edges + [[info.num_frames - 1, 0]]
    reference = sequential_frames(path, {index for request in requests for index in request})
    for request in requests:
        frames = decode_frames(path, request, info)
        for index, frame in zip(request, frames):
            np.testing.assert_array_equal(frame, reference[index], err_msg=f"{name} frame {index}")
