"""Test videos whose frames carry their own presentation index, written with PyAV.

Each frame paints its index as vertical bit stripes (most significant bit on the left, white = 1), wide enough to
survive lossy compression, so a decoded frame can be identified without trusting any timestamp.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pyarrow as pa

INDEX_BITS = 10
STRIPE_WIDTH = 6


@dataclass(frozen=True)
class VideoSpec:
    """How to encode one indexed test video."""

    codec: str = "libx264"
    num_frames: int = 60
    fps: int = 30
    width: int = 64
    height: int = 48
    options: dict[str, str] = field(default_factory=dict)
    first_pts: int = 0
    pts_gap_every: int = 0  # variable frame rate: skip one tick of pts after every this many frames
    slow_from: int = 0  # variable frame rate: from this frame on, frames are 3 ticks apart (a third of the rate)
    rotation: int = 0  # display matrix: degrees counter-clockwise; the painted frame is what shows after turning
    audio_first: bool = False
    container_options: dict[str, str] = field(default_factory=dict)


H264_BFRAMES_LONG_GOP = VideoSpec(
    options={
        "preset": "veryfast",
        "x264-params": "keyint=40:min-keyint=40:scenecut=0:bframes=3:b-adapt=0:b-pyramid=normal:threads=1",
    },
    num_frames=100,
)
VP9_WEBM = VideoSpec(
    codec="libvpx-vp9",
    options={"deadline": "good", "cpu-used": "8", "g": "20", "lag-in-frames": "16", "auto-alt-ref": "1"},
    num_frames=50,
)
MPEG4_AVI = VideoSpec(codec="mpeg4", options={"g": "15", "bf": "2", "qscale": "3"}, num_frames=50, fps=25)
H264_OPEN_GOP = VideoSpec(
    options={
        "preset": "veryfast",
        "x264-params": "keyint=30:min-keyint=30:scenecut=0:bframes=3:b-adapt=0:open-gop=1:threads=1",
    },
    num_frames=70,
)


def paint_index(index: int, width: int, height: int) -> np.ndarray:
    """An RGB frame showing `index` as INDEX_BITS stripes over a mid-grey background."""
    frame = np.full((height, width, 3), 96, dtype=np.uint8)
    for bit in range(INDEX_BITS):
        if (index >> (INDEX_BITS - 1 - bit)) & 1:
            frame[:, bit * STRIPE_WIDTH : (bit + 1) * STRIPE_WIDTH] = 255
        else:
            frame[:, bit * STRIPE_WIDTH : (bit + 1) * STRIPE_WIDTH] = 0
    return frame


def read_index(frame: np.ndarray) -> int:
    """The index painted on a decoded RGB frame (H, W, 3)."""
    value = 0
    for bit in range(INDEX_BITS):
        centre = frame[:, bit * STRIPE_WIDTH + 1 : (bit + 1) * STRIPE_WIDTH - 1].mean()
        value = (value << 1) | int(centre > 128)
    return value


def write_indexed_video(path: Path, spec: VideoSpec) -> Path:
    """Encode spec.num_frames indexed frames to `path` (the container follows the suffix)."""
    assert spec.width >= INDEX_BITS * STRIPE_WIDTH, "frame too narrow for the index stripes"
    with av.open(str(path), "w", options=spec.container_options) as container:
        audio = _add_audio(container) if spec.audio_first else None
        stream = container.add_stream(spec.codec, rate=spec.fps, options=dict(spec.options))
        stream.width, stream.height, stream.pix_fmt = spec.width, spec.height, "yuv420p"
        stream.time_base = Fraction(1, spec.fps)
        stream.codec_context.time_base = Fraction(1, spec.fps)
        if spec.rotation:
            stream.set_display_rotation(spec.rotation)
        turns = spec.rotation // 90
        shown = (spec.width, spec.height) if turns % 2 == 0 else (spec.height, spec.width)
        for index in range(spec.num_frames):
            coded = np.ascontiguousarray(np.rot90(paint_index(index, *shown), -turns))
            frame = av.VideoFrame.from_ndarray(coded, format="rgb24")
            frame.pts = spec.first_pts + index + (index // spec.pts_gap_every if spec.pts_gap_every else 0)
            frame.pts += 2 * max(index - spec.slow_from, 0) if spec.slow_from else 0
            frame.time_base = Fraction(1, spec.fps)
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
        if audio is not None:
            _write_silence(container, audio, seconds=spec.num_frames / spec.fps)
    return path


def _add_audio(container: av.container.OutputContainer) -> av.audio.stream.AudioStream:
    return container.add_stream("aac", rate=16000, layout="mono")


def _write_silence(
    container: av.container.OutputContainer, stream: av.audio.stream.AudioStream, seconds: float
) -> None:
    samples_per_frame = 1024
    for start in range(0, int(seconds * 16000), samples_per_frame):
        silence = np.zeros((1, samples_per_frame), dtype=np.float32)
        frame = av.AudioFrame.from_ndarray(silence, format="fltp", layout="mono")
        frame.sample_rate, frame.pts = 16000, start
        container.mux(stream.encode(frame))
    container.mux(stream.encode())


def sequential_frames(path: Path, keep: set[int] | None = None) -> dict[int, np.ndarray]:
    """Frames of the first video stream decoded front to back, by position (only those in `keep`, if given): the
    reference for exactness."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return {
            position: frame.to_ndarray(format="rgb24")
            for position, frame in enumerate(container.decode(stream))
            if keep is None or position in keep
        }


def write_bad_videos(folder: Path) -> dict[str, tuple[Path, str]]:
    """Files that are unusable as videos, each in a different way: name -> (path, a word its reason contains)."""
    folder.mkdir(parents=True, exist_ok=True)
    long_gop = write_indexed_video(folder / "whole.mp4", H264_BFRAMES_LONG_GOP)
    faststart = write_indexed_video(
        folder / "whole_faststart.mp4", replace(H264_BFRAMES_LONG_GOP, container_options={"movflags": "faststart"})
    )
    webm = write_indexed_video(folder / "whole.webm", VP9_WEBM)
    (folder / "empty.mp4").write_bytes(b"")
    (folder / "notes.mp4").write_text("this is a text file, not a video\n" * 50)
    av.VideoFrame.from_ndarray(np.zeros((48, 64, 3), np.uint8), format="rgb24").to_image().save(folder / "still.png")
    return {
        "missing": (folder / "missing.mp4", "not found"),
        "empty": (folder / "empty.mp4", "empty"),
        "truncated index at the end": (_truncate(long_gop, folder / "cut.mp4", 0.6), "truncated"),
        "truncated index at the front": (_truncate(faststart, folder / "cut_faststart.mp4", 0.5), "truncated"),
        "truncated webm": (_truncate(webm, folder / "cut.webm", 0.5), "truncated"),
        "not a video": (folder / "notes.mp4", "not a video"),
        "no video stream": (_audio_only(folder / "audio.m4a"), "no video stream"),
        "a still image": (folder / "still.png", "still image"),
        "corrupt last GOP": (corrupt_keyframes(long_gop, folder / "corrupt.mp4", [-1]), "last frame"),
    }


def _truncate(source: Path, target: Path, fraction: float) -> Path:
    data = source.read_bytes()
    target.write_bytes(data[: int(len(data) * fraction)])
    return target


def _audio_only(path: Path) -> Path:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=16000, layout="mono")
        _write_silence(container, stream, seconds=0.2)
    return path


def corrupt_keyframes(source: Path, target: Path, which: list[int]) -> Path:
    """Overwrite the data of the keyframe packets numbered `which` (-1: the last), leaving the container intact."""
    with av.open(str(source)) as container:
        keyframes = [packet for packet in container.demux(container.streams.video[0]) if packet.is_keyframe]
        spans = [(keyframes[number].pos, keyframes[number].size) for number in which]
    data = bytearray(source.read_bytes())
    for position, size in spans:
        data[position : position + size] = b"\x5a" * size
    target.write_bytes(bytes(data))
    return target


def index_of(paths: list[Path]) -> pa.Table:
    """An index of `paths` built without Ray, probed as `pipeline.data.index` probes: label = position in `paths`."""
    from pipeline.data.index import info_to_row
    from pipeline.data.video import probe

    return pa.Table.from_pylist(
        [
            {"path": str(path), "label": label, **info_to_row(probe(path, check_last_frame=True))}
            for label, path in enumerate(paths)
        ]
    )
