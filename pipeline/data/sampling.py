"""Which frames make a clip: T frames, τ apart at a target frame rate, mapped onto the video's own frame rate.

A T×τ clip covers (T − 1)·τ frames of time at `target_fps` (PySlowFast samples at 30 fps the same way), so on a
video at `fps` consecutive samples are τ·fps/target_fps source frames apart. Unlike PySlowFast, which spreads T
samples over T·τ frames with linspace (a stride of 4.2 for 16×4 at 30 fps), the stride here is exactly τ at the
target rate. A video shorter than a clip gets its indices clamped to the last frame, and the clip says so.

A video whose frames are not evenly spaced in time (variable frame rate) is sampled by timestamps instead: given
`times` (each frame's time in seconds), a clip's samples are τ / target_fps seconds apart and each is the frame on
screen at that moment. On evenly spaced frames the two ways pick the same frames.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ClipSpec:
    """T frames (`num_frames`) at sampling rate τ (`sampling_rate`), measured in frames at `target_fps`."""

    num_frames: int
    sampling_rate: int
    target_fps: float

    def __post_init__(self) -> None:
        if self.num_frames < 1 or self.sampling_rate < 1 or self.target_fps <= 0:
            raise ValueError(f"invalid clip spec {self}")


@dataclass(frozen=True)
class SampledClip:
    """Frame indices of one clip, and whether the video was too short so that indices were clamped."""

    indices: np.ndarray
    clamped: bool


def clip_offsets(fps: float, spec: ClipSpec) -> np.ndarray:
    """Offsets of a clip's frames from its first frame, in source frames."""
    step = spec.sampling_rate * fps / spec.target_fps
    # The epsilon keeps exact products such as 15 × 10/3 = 50 from flooring to 49 through rounding error.
    return np.floor(np.arange(spec.num_frames) * step + 1e-6).astype(np.int64)


def clip_span(spec: ClipSpec) -> float:
    """Seconds from a clip's first sample to its last."""
    return (spec.num_frames - 1) * spec.sampling_rate / spec.target_fps


def last_start(frame_count: int, fps: float, spec: ClipSpec, times: np.ndarray | None = None) -> int:
    """The last first-frame at which a whole clip fits; negative when the video is shorter than a clip."""
    if times is None:
        return frame_count - 1 - int(clip_offsets(fps, spec)[-1])
    return int(np.searchsorted(times, times[-1] - clip_span(spec) + _EPSILON, side="right")) - 1


def random_clip(
    frame_count: int,
    fps: float,
    spec: ClipSpec,
    rng: np.random.Generator,
    *,
    first_frame: int = 0,
    times: np.ndarray | None = None,
) -> SampledClip:
    """A training clip at a uniformly random position within `frame_count` frames starting at `first_frame`
    (`times`: those frames' times, for a variable frame rate)."""
    latest = last_start(frame_count, fps, spec, times)
    start = int(rng.integers(0, latest + 1)) if latest > 0 else 0
    return _clip_at(start, frame_count, fps, spec, first_frame, times)


def uniform_clips(
    frame_count: int,
    fps: float,
    spec: ClipSpec,
    num_clips: int,
    *,
    first_frame: int = 0,
    times: np.ndarray | None = None,
) -> list[SampledClip]:
    """`num_clips` test clips, each centred in one of `num_clips` equal parts of the possible starts.

    One clip is the centre clip; five are at 10 %, 30 %, 50 %, 70 % and 90 % of the range of starts.
    """
    if num_clips < 1:
        raise ValueError(f"num_clips must be at least 1, got {num_clips}")
    latest = max(last_start(frame_count, fps, spec, times), 0)
    starts = [math.floor(latest * (2 * k + 1) / (2 * num_clips) + 0.5) for k in range(num_clips)]
    return [_clip_at(start, frame_count, fps, spec, first_frame, times) for start in starts]


def segment_frames(
    frame_count: int, fps: float, start_sec: float | None, end_sec: float | None, times: np.ndarray | None = None
) -> tuple[int, int]:
    """(first frame, frame count) of the part of a video between start_sec and end_sec (None: its start or end);
    `times`: every frame's time, for a variable frame rate."""
    if times is None:
        first = round((start_sec or 0.0) * fps)
        stop = frame_count if end_sec is None else round(end_sec * fps)
    else:
        first = int(np.searchsorted(times, (start_sec or 0.0) - _EPSILON))
        stop = frame_count if end_sec is None else int(np.searchsorted(times, end_sec - _EPSILON))
    first = min(max(first, 0), frame_count - 1)
    stop = min(max(stop, first + 1), frame_count)
    return first, stop - first


_EPSILON = 1e-6  # keeps exact products such as 15 × 10/3 = 50 from flooring to 49 through rounding error


def _clip_at(
    start: int, frame_count: int, fps: float, spec: ClipSpec, first_frame: int, times: np.ndarray | None
) -> SampledClip:
    if times is None:
        positions = start + clip_offsets(fps, spec)
        clamped = bool(positions[-1] >= frame_count)
    else:
        moments = times[start] + np.arange(spec.num_frames) * (spec.sampling_rate / spec.target_fps)
        positions = np.searchsorted(times, moments + _EPSILON, side="right") - 1
        clamped = bool(moments[-1] >= times[-1] + 1 / fps - _EPSILON)
    return SampledClip(indices=first_frame + np.minimum(positions, frame_count - 1), clamped=clamped)
