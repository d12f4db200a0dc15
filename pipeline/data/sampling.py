"""Which frames make a clip: T frames, τ apart at a target frame rate, mapped onto the video's own frame rate.

A T×τ clip covers (T − 1)·τ frames of time at `target_fps` (PySlowFast samples at 30 fps the same way), so on a
video at `fps` consecutive samples are τ·fps/target_fps source frames apart. Unlike PySlowFast, which spreads T
samples over T·τ frames with linspace (a stride of 4.2 for 16×4 at 30 fps), the stride here is exactly τ at the
target rate. A video shorter than a clip gets its indices clamped to the last frame, and the clip says so.
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


def last_start(frame_count: int, fps: float, spec: ClipSpec) -> int:
    """The last first-frame at which a whole clip fits; negative when the video is shorter than a clip."""
    return frame_count - 1 - int(clip_offsets(fps, spec)[-1])


def random_clip(
    frame_count: int, fps: float, spec: ClipSpec, rng: np.random.Generator, *, first_frame: int = 0
) -> SampledClip:
    """A training clip at a uniformly random position within `frame_count` frames starting at `first_frame`."""
    latest = last_start(frame_count, fps, spec)
    start = int(rng.integers(0, latest + 1)) if latest > 0 else 0
    return _clip_at(start, frame_count, fps, spec, first_frame)


def uniform_clips(
    frame_count: int, fps: float, spec: ClipSpec, num_clips: int, *, first_frame: int = 0
) -> list[SampledClip]:
    """`num_clips` test clips, each centred in one of `num_clips` equal parts of the possible starts.

    One clip is the centre clip; five are at 10 %, 30 %, 50 %, 70 % and 90 % of the range of starts.
    """
    if num_clips < 1:
        raise ValueError(f"num_clips must be at least 1, got {num_clips}")
    latest = max(last_start(frame_count, fps, spec), 0)
    starts = [math.floor(latest * (2 * k + 1) / (2 * num_clips) + 0.5) for k in range(num_clips)]
    return [_clip_at(start, frame_count, fps, spec, first_frame) for start in starts]


def segment_frames(frame_count: int, fps: float, start_sec: float | None, end_sec: float | None) -> tuple[int, int]:
    """(first frame, frame count) of the part of a video between start_sec and end_sec (None: its start or end)."""
    first = min(max(round((start_sec or 0.0) * fps), 0), frame_count - 1)
    stop = frame_count if end_sec is None else min(max(round(end_sec * fps), first + 1), frame_count)
    return first, stop - first


def _clip_at(start: int, frame_count: int, fps: float, spec: ClipSpec, first_frame: int) -> SampledClip:
    positions = start + clip_offsets(fps, spec)
    clamped = bool(positions[-1] >= frame_count)
    return SampledClip(indices=first_frame + np.minimum(positions, frame_count - 1), clamped=clamped)
