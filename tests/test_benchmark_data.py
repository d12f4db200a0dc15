"""`jobs.benchmark data`: its references are exact on counted (AVI) streams too, and a peer that returns other frames
is reported as wrong instead of timed."""

from __future__ import annotations

import numpy as np
import pytest
from videos import H264_BFRAMES_LONG_GOP, MPEG4_AVI, read_index, sequential_frames, write_indexed_video

from jobs.benchmark.data import _floor, _ours, _time_interleaved, _window, _window_1t
from pipeline.data.video import decode_frames, probe


@pytest.fixture(scope="module")
def avi(tmp_path_factory):
    """MPEG-4 with B-frames in AVI (timestamps guessed: frames are counted), a keyframe every 15 frames."""
    return write_indexed_video(tmp_path_factory.mktemp("avi") / "counted.avi", MPEG4_AVI)


@pytest.mark.parametrize("reference", [_window, _window_1t, _floor])
def test_the_window_references_count_frames_in_avi(avi, reference):
    info = probe(avi)
    assert not info.pts_ordered and len(info.keyframes) > 2
    for indices in ([0, 3, 6], [16, 20, 24, 28], [31, 35, 44, 49]):  # from frame 0, and seeking to later keyframes
        assert [read_index(frame) for frame in reference(str(avi), info, indices)] == indices


@pytest.mark.parametrize("reference", [_window, _floor])
def test_the_window_references_are_exact_where_avi_timestamps_come_out_of_order(shared_videos, reference):
    path = str(shared_videos / "mpeg4_with_audio.avi")  # its decoder's pts run 1, 2, 4, 3, 5, 7, 6, ...
    info, clips = probe(path), [[0, 4, 8], [20, 24, 28, 32], [100, 104, 120, 163]]
    exact = sequential_frames(path, {index for clip in clips for index in clip})
    for indices in clips:
        assert all(np.array_equal(frame, exact[i]) for frame, i in zip(reference(path, info, indices), indices))


def test_a_peer_that_returns_other_frames_is_reported_wrong(tmp_path):
    path = str(write_indexed_video(tmp_path / "v.mp4", H264_BFRAMES_LONG_GOP))
    info = probe(path)

    def one_late(path, info, indices):
        return decode_frames(path, [index + 1 for index in indices], info)

    clips = [[5, 9, 13], [40, 44, 48], [81, 85, 89]]
    decoders = {"ours": _ours, "window": _window, "floor": _floor, "late": one_late}
    seconds, wrong = _time_interleaved(path, info, clips, decoders)
    assert wrong == {"ours": 0, "window": 0, "floor": 0, "late": 3} and all(s > 0 for s in seconds.values())
    with pytest.raises(AssertionError, match="ours returned other frames"):
        _time_interleaved(path, info, clips, {"ours": one_late, "floor": _floor})
    assert np.array_equal(_ours(path, info, clips[1]), _floor(path, info, clips[1]))
