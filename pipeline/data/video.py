"""Frame-exact video decoding with PyAV: probe a video once, then decode only what a clip needs.

A frame's index is its position in presentation (display) order. `probe` demuxes the video stream without decoding
it and records every packet timestamp, so `decode_frames` can seek to the keyframe before the first wanted frame,
identify each decoded frame exactly, skip decoding frames that nothing needs, and convert to RGB only the frames it
returns. Frames come out as displayed: a rotation in the container's display matrix is applied. A clip that is
shrunk anyway can ask for a box of each frame at its output size (`FrameCrop`): the frame is then converted to RGB
straight at the scaled size, in the one swscale call, instead of at full resolution and then resized. A path may
be a local file or a URI (`s3://...`): see `pipeline.data.video_source` for how an object's bytes are fetched.
"""

from __future__ import annotations

import bisect
import itertools
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from fractions import Fraction

import av
import numpy as np
from av.video.reformatter import VideoReformatter

from pipeline.data.allocator import keep_freed_memory
from pipeline.data.video_source import VideoSource, open_source
from pipeline.errors import DataError
from pipeline.storage import StorageError, is_uri

# Containers that store real presentation timestamps; in these a decoded frame is identified by its pts. Elsewhere
# (AVI, raw streams) the demuxer guesses pts, so frames are identified by counting from a keyframe instead.
PTS_ORDERED_FORMATS = frozenset({"mov,mp4,m4a,3gp,3g2,mj2", "matroska,webm", "mpegts"})
# A container whose video ends this much before its header says is truncated, not merely rounded.
TRUNCATION_TOLERANCE_SEC = 0.5


class VideoDecodeError(DataError):
    """A video that can't be probed or decoded; str() is one line naming the path and the reason."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(str(path), reason)
        self.path = str(path)
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


@dataclass(frozen=True)
class VideoInfo:
    """What decoding needs to know about a video, measured once by `probe`."""

    path: str
    num_frames: int
    fps: float
    duration: float
    width: int  # as displayed (after `rotation`)
    height: int
    codec: str
    keyframes: tuple[int, ...]  # presentation indices of the frames a decode can start from
    keyframe_pts: tuple[int, ...]  # their pts: to seek to, and to recognise them once decoded
    keyframe_dts: tuple[int, ...]  # their dts: to seek to in containers that seek by decode time
    stream_index: int
    time_base: Fraction
    pts: tuple[int, ...]  # pts of every frame, in presentation order
    pts_ordered: bool  # True: frames are identified by pts; False: by counting from a keyframe
    rotation: int = 0  # degrees counter-clockwise (0, 90, 180, 270) that turn a decoded frame into the displayed one

    def frame_times(self) -> np.ndarray | None:
        """Each frame's time in seconds from the first, or None when the frames are evenly spaced (constant rate)."""
        steps = np.diff(np.asarray(self.pts, dtype=np.int64))
        if steps.size == 0 or (steps == steps[0]).all():
            return None
        return (np.asarray(self.pts, dtype=np.int64) - self.pts[0]) * float(self.time_base)


@dataclass(frozen=True)
class FrameCrop:
    """The box (top, left, height, width) of the displayed frame that a clip shows, and its output size (height,
    width); for a box at least as large as the output."""

    box: tuple[int, int, int, int]
    size: tuple[int, int]


def probe(path: str | os.PathLike, *, check_last_frame: bool = False) -> VideoInfo:
    """Demux the video stream once and describe it; with check_last_frame, also prove the last frame decodes.

    Raises VideoDecodeError for anything that makes the video unusable.
    With check_last_frame (as indexing probes), a container that only guesses timestamps (AVI and the like) is
    also decoded once in full: if its frames come out with exactly the probed timestamps, in order, they are
    identified by timestamp from then on, which lets decoding skip the frames that nothing needs.
    """
    path = str(path)
    if not is_uri(path):
        _check_file(path)
    with _source(path, probing=True) as source:  # an object in storage is read once for all the passes below
        with _ffmpeg_errors(path, "cannot read"), _open(source) as container:
            info = _describe(path, container)
        info = _with_rotation(info, _display_rotation(source, info))
        if check_last_frame:
            try:
                _decode_clips(source, [([info.num_frames - 1], None)], info, threads=1)
            except VideoDecodeError as error:
                raise VideoDecodeError(path, f"the last frame does not decode ({error.reason})") from None
            if not info.pts_ordered and len(set(info.pts)) == len(info.pts) and _decodes_in_pts_order(source, info):
                info = replace(info, pts_ordered=True)
    return info


def decode_frames(
    path: str | os.PathLike, indices: Iterable[int], info: VideoInfo | None = None, *, threads: int = 1
) -> np.ndarray:
    """The frames at `indices` (presentation order; any order, repeats allowed) as uint8 RGB (N, H, W, 3).

    Pass the `info` from the index to skip the demux pass. `threads` is the thread count of the decoder and of the
    colour conversion: one thread per CPU the caller has (FFmpeg's automatic choice spends more CPU time).
    """
    path = str(path)
    info = info if info is not None else probe(path)
    return decode_clips(path, [(indices, None)], info, threads=threads)[0]


def decode_clips(
    path: str | os.PathLike,
    clips: Sequence[tuple[Iterable[int], FrameCrop | None]],
    info: VideoInfo,
    *,
    threads: int = 1,
    source: VideoSource | None = None,
) -> list[np.ndarray]:
    """Several clips of one video from one decode: for each (indices, crop), the frames at `indices` as uint8 RGB,
    whole (N, H, W, 3) when crop is None, else the crop's box at its size (N, h, w, 3), scaled in the conversion.

    `source`: where to read the bytes (default: the one `video_source.open_source` picks; benchmarks compare).
    The first call makes this process keep freed frame memory for the next clip (`allocator.keep_freed_memory`)."""
    path = str(path)
    _check_indices(path, clips, info)
    keep_freed_memory()
    if source is not None:
        return _decode_clips(source, clips, info, threads=threads)
    with _source(path, probing=False) as opened:
        return _decode_clips(opened, clips, info, threads=threads)


def _check_indices(path: str, clips: Sequence[tuple[Iterable[int], FrameCrop | None]], info: VideoInfo) -> None:
    for index in (int(index) for indices, _ in clips for index in indices):
        if not 0 <= index < info.num_frames:
            raise VideoDecodeError(
                path, f"frame index {index} is past the end (the video has {info.num_frames} frames)"
            )


def _decode_clips(
    source: VideoSource,
    clips: Sequence[tuple[Iterable[int], FrameCrop | None]],
    info: VideoInfo,
    *,
    threads: int,
) -> list[np.ndarray]:
    wanted = [[int(index) for index in indices] for indices, _ in clips]
    unique = sorted({index for indices in wanted for index in indices})
    if not unique:
        return [np.empty((0, info.height, info.width, 3), dtype=np.uint8) for _ in clips]
    views = _ClipViews(info, wanted, [crop for _, crop in clips], threads)
    kept = _decode_unique(source, info, unique, threads, views)
    return [views.stack(kept, number, indices) for number, indices in enumerate(wanted)]


def _check_file(path: str) -> None:
    if not os.path.exists(path):
        raise VideoDecodeError(path, "file not found")
    if not os.path.isfile(path):
        raise VideoDecodeError(path, "not a regular file")
    if os.path.getsize(path) == 0:
        raise VideoDecodeError(path, "empty file")


@contextmanager
def _ffmpeg_errors(path: str, action: str) -> Iterator[None]:
    """Turn FFmpeg and OS errors into VideoDecodeError naming what was being done."""
    try:
        yield
    except av.error.FFmpegError as error:
        raise VideoDecodeError(path, f"{action}: {error.strerror}") from None
    except StorageError as error:  # a ranged read of an object that failed for good
        raise VideoDecodeError(path, f"{action}: {error.reason}") from None
    except (OSError, UnicodeDecodeError) as error:
        raise VideoDecodeError(path, f"{action}: {error}") from None


def _source(path: str, *, probing: bool) -> VideoSource:
    """Where the video's bytes come from; an object that can't be fetched is a VideoDecodeError saying why."""
    try:
        return open_source(path, probing=probing)
    except StorageError as error:
        raise VideoDecodeError(path, error.reason) from None


def _open(source: VideoSource) -> av.container.InputContainer:
    path = source.path
    try:
        return source.open()
    except FileNotFoundError:  # gone since it was probed
        raise VideoDecodeError(path, "file not found") from None
    except av.error.InvalidDataError:
        reason = "not a video file, or one truncated before its index (FFmpeg can't read it)"
        raise VideoDecodeError(path, reason) from None
    except av.error.EOFError:
        raise VideoDecodeError(path, "truncated: the file ends inside its header") from None


def _video_stream(path: str, container: av.container.InputContainer) -> av.video.stream.VideoStream:
    """The first real video stream; cover art (an attached picture) doesn't count."""
    if container.format.name == "image2" or container.format.name.endswith("_pipe"):
        raise VideoDecodeError(path, f"a still image ({container.format.name}), not a video")
    for stream in container.streams.video:
        if not stream.disposition & av.stream.Disposition.attached_pic:
            return stream
    kinds = ", ".join(stream.type for stream in container.streams) or "none"
    raise VideoDecodeError(path, f"no video stream (streams: {kinds})")


def _describe(path: str, container: av.container.InputContainer) -> VideoInfo:
    stream = _video_stream(path, container)
    packets = 0
    decode_order_pts: list[int] = []
    keyframe_positions: list[int] = []
    keyframe_dts: list[int] = []
    pts_missing = False
    for packet in container.demux(stream):
        if packet.size == 0 and packet.pts is None and packet.dts is None:
            continue  # PyAV's end-of-stream marker
        packets += 1
        if packet.is_discard or packet.size == 0:
            continue  # the decoder outputs no frame for these
        timestamp = packet.pts if packet.pts is not None else packet.dts
        if timestamp is None:
            raise VideoDecodeError(path, "a video packet has no timestamp")
        pts_missing |= packet.pts is None
        if packet.is_keyframe:
            keyframe_positions.append(len(decode_order_pts))
            keyframe_dts.append(packet.dts if packet.dts is not None else timestamp)
        decode_order_pts.append(timestamp)
    if not decode_order_pts:
        raise VideoDecodeError(path, "no video frames")
    if stream.frames and packets < stream.frames:
        raise VideoDecodeError(path, f"truncated: {packets} of the {stream.frames} frames its header declares")

    pts = tuple(sorted(decode_order_pts))
    time_base = stream.time_base
    pts_ordered = container.format.name in PTS_ORDERED_FORMATS and not pts_missing and len(set(pts)) == len(pts)
    keyframe_pts = tuple(decode_order_pts[position] for position in keyframe_positions)
    keyframes = tuple(bisect.bisect_left(pts, timestamp) for timestamp in keyframe_pts)

    fps = _frame_rate(stream, pts)
    if fps <= 0:
        raise VideoDecodeError(path, "unknown frame rate")
    _check_declared_end(path, stream, end_sec=float(pts[-1] * time_base) + 1 / fps)
    width, height = stream.codec_context.width, stream.codec_context.height
    if width <= 0 or height <= 0:
        raise VideoDecodeError(path, "unknown frame size")
    return VideoInfo(
        path=path,
        num_frames=len(pts),
        fps=fps,
        duration=len(pts) / fps,
        width=width,
        height=height,
        codec=stream.codec_context.name,
        keyframes=keyframes,
        keyframe_pts=keyframe_pts,
        keyframe_dts=tuple(keyframe_dts),
        stream_index=stream.index,
        time_base=time_base,
        pts=pts,
        pts_ordered=pts_ordered,
    )


def _frame_rate(stream: av.video.stream.VideoStream, pts: tuple[int, ...]) -> float:
    """Frames per second of the frames actually present: the container's average, else measured from pts."""
    if stream.average_rate:
        return float(stream.average_rate)
    span = float((pts[-1] - pts[0]) * stream.time_base)
    if len(pts) > 1 and span > 0:
        return (len(pts) - 1) / span
    return float(stream.guessed_rate or 0)


def _check_declared_end(path: str, stream: av.video.stream.VideoStream, end_sec: float) -> None:
    """Catch truncation in containers that declare a duration but no frame count (Matroska, WebM)."""
    if stream.frames:
        return  # the frame count check is exact
    declared = _declared_end_sec(stream)
    if declared is not None and end_sec < declared - TRUNCATION_TOLERANCE_SEC:
        reason = f"truncated: the video ends at {end_sec:.2f} s but its header says {declared:.2f} s"
        raise VideoDecodeError(path, reason)


def _declared_end_sec(stream: av.video.stream.VideoStream) -> float | None:
    if stream.duration:
        return float(((stream.start_time or 0) + stream.duration) * stream.time_base)
    tag = re.fullmatch(r"(\d+):(\d+):(\d+(?:\.\d+)?)", stream.metadata.get("DURATION", ""))
    if tag:
        hours, minutes, seconds = tag.groups()
        return int(hours) * 3600 + int(minutes) * 60 + float(seconds)
    return None


class _SeekMissed(Exception):
    """No seek reached the keyframe asked for, or decoding began past it."""


class _PtsOutOfOrder(Exception):
    """The decoder's timestamps contradict the probe's; identify frames by counting instead."""


def _decode_unique(
    source: VideoSource, info: VideoInfo, wanted: list[int], threads: int, convert: _ClipViews
) -> dict[int, dict[int, np.ndarray]]:
    """Decode the sorted, distinct `wanted` frames, starting from the last keyframe at or before the first."""
    starts = [*sorted({kf for kf in info.keyframes if 0 < kf <= wanted[0]}, reverse=True), 0]
    for start in starts:
        try:
            return _decode_from(source, info, start, wanted, threads, convert)
        except _SeekMissed:
            continue
        except _PtsOutOfOrder:
            return _decode_from(source, replace(info, pts_ordered=False), 0, wanted, threads, convert)
    raise AssertionError("decoding from frame 0 never misses its seek")


def _decode_from(
    source: VideoSource, info: VideoInfo, start: int, wanted: list[int], threads: int, convert: _ClipViews
) -> dict[int, dict[int, np.ndarray]]:
    path = source.path
    number = _PtsNumbering(info, start) if info.pts_ordered else _CountNumbering(info, start)
    wanted_set = set(wanted)
    kept: dict[int, dict[int, np.ndarray]] = {}
    with _ffmpeg_errors(path, "decoding failed"), _open(source) as container:
        stream = container.streams[info.stream_index]
        stream.codec_context.thread_count = threads
        if threads > 1:
            stream.codec_context.thread_type = "AUTO"
        packets = _packets_from(container, stream, info, start)
        needed_pts = {info.pts[index] for index in wanted} if info.pts_ordered else None
        for frame in _decoded(packets, stream.codec_context, needed_pts):
            index = number(frame)
            if index in wanted_set:
                kept[index] = convert(index, frame)
                if len(kept) == len(wanted_set):
                    return kept
            if index is not None and index >= wanted[-1]:
                break
    if not number.anchored:
        raise _SeekMissed
    missing = next(index for index in wanted if index not in kept)
    raise VideoDecodeError(path, f"frame {missing} did not decode: the stream ends early (truncated or corrupt)")


def _packets_from(
    container: av.container.InputContainer, stream: av.video.stream.VideoStream, info: VideoInfo, start: int
) -> Iterator[av.Packet]:
    """The stream's packets from the keyframe shown at index `start`, or else from an earlier keyframe.

    Demuxers seek by different clocks (MP4 and Matroska land on a keyframe's pts, MPEG-TS on its dts), so both are
    tried, and a seek counts only if the first packet read is that keyframe.
    """
    if start == 0:
        return container.demux(stream)
    position = info.keyframes.index(start)
    keyframe_pts = info.keyframe_pts[position]
    earlier = None
    for target in dict.fromkeys((keyframe_pts, info.keyframe_dts[position])):
        container.seek(target, stream=stream, backward=True)
        packets = container.demux(stream)
        first = next(packets, None)
        if first is not None and first.is_keyframe and first.pts is not None:
            if first.pts == keyframe_pts:
                return itertools.chain([first], packets)
            if first.pts < keyframe_pts and earlier is None:
                earlier = target
    if earlier is None:
        raise _SeekMissed
    container.seek(earlier, stream=stream, backward=True)
    return container.demux(stream)


def _decoded(
    packets: Iterator[av.Packet], codec: av.codec.context.CodecContext, needed_pts: set[int] | None
) -> Iterator[av.VideoFrame]:
    """Decoded frames in output order. Given needed_pts, the decoder skips non-reference frames outside it."""
    for packet in packets:
        if packet.size == 0:
            continue
        if needed_pts is not None:
            codec.skip_frame = "DEFAULT" if packet.is_keyframe or packet.pts in needed_pts else "NONREF"
        yield from codec.decode(packet)
    codec.skip_frame = "DEFAULT"
    yield from codec.decode(None)


class _PtsNumbering:
    """Index of each decoded frame from its pts; frames shown before the start keyframe are ignored."""

    def __init__(self, info: VideoInfo, start: int) -> None:
        self.index_of = {timestamp: index for index, timestamp in enumerate(info.pts)}
        self.anchor = info.pts[start] if start > 0 else None
        self.last = -1

    @property
    def anchored(self) -> bool:
        return self.anchor is None

    def __call__(self, frame: av.VideoFrame) -> int | None:
        if self.anchor is not None:
            if frame.pts is None or frame.pts < self.anchor:
                return None
            if frame.pts > self.anchor:
                raise _SeekMissed
            self.anchor = None
        index = self.index_of.get(frame.pts)
        if index is None or index <= self.last:
            raise _PtsOutOfOrder
        self.last = index
        return index


class _CountNumbering:
    """Index of each decoded frame by counting from the start keyframe, recognised by its pts.

    Frames output before it (pictures of an open GOP that are shown before the keyframe) are ignored.
    """

    def __init__(self, info: VideoInfo, start: int) -> None:
        self.next = start
        self.anchor = info.keyframe_pts[info.keyframes.index(start)] if start > 0 else None

    @property
    def anchored(self) -> bool:
        return self.anchor is None

    def __call__(self, frame: av.VideoFrame) -> int | None:
        if self.anchor is not None:
            if frame.pts != self.anchor:
                return None
            self.anchor = None
        index = self.next
        self.next += 1
        return index


class _ClipViews:
    """Each kept frame converted to RGB as displayed for every clip that wants it: whole (one conversion shared by
    the clips without a crop), or scaled so that the clip's box comes out at its size, then cut out of the result.

    One reused scaler context; a frame that changed size mid-stream is scaled back to the probed size first."""

    def __init__(self, info: VideoInfo, wanted: list[list[int]], crops: list[FrameCrop | None], threads: int) -> None:
        self.reformatter = VideoReformatter()
        self.info, self.crops, self.threads = info, crops, threads
        self.turns = info.rotation // 90
        self.wanted_by: dict[int, set[int]] = {}
        for number, indices in enumerate(wanted):
            for index in indices:
                self.wanted_by.setdefault(index, set()).add(number)

    def __call__(self, index: int, frame: av.VideoFrame) -> dict[int, np.ndarray]:
        views: dict[int, np.ndarray] = {}
        whole = None
        for number in self.wanted_by[index]:
            crop = self.crops[number]
            if crop is None:
                whole = self._displayed(frame, self.info.height, self.info.width) if whole is None else whole
                views[number] = whole
            else:
                views[number] = self._cropped(frame, crop)
        return views

    def stack(self, kept: dict[int, dict[int, np.ndarray]], number: int, indices: list[int]) -> np.ndarray:
        if not indices:
            return np.empty((0, self.info.height, self.info.width, 3), dtype=np.uint8)
        return np.stack([kept[index][number] for index in indices])

    def _cropped(self, frame: av.VideoFrame, crop: FrameCrop) -> np.ndarray:
        (top, left, box_height, box_width), (height, width) = crop.box, crop.size
        scale_y, scale_x = height / box_height, width / box_width
        scaled_height = max(round(self.info.height * scale_y), height)
        scaled_width = max(round(self.info.width * scale_x), width)
        scaled = self._displayed(frame, scaled_height, scaled_width)
        top = min(round(top * scale_y), scaled_height - height)
        left = min(round(left * scale_x), scaled_width - width)
        return np.ascontiguousarray(scaled[top : top + height, left : left + width])

    def _displayed(self, frame: av.VideoFrame, height: int, width: int) -> np.ndarray:
        """The frame in RGB at (height, width) as displayed: scaled in its coded orientation, then turned."""
        coded = (width, height) if self.turns % 2 == 0 else (height, width)
        rgb = self.reformatter.reformat(
            frame, format="rgb24", width=coded[0], height=coded[1], threads=self.threads
        ).to_ndarray()
        return np.ascontiguousarray(np.rot90(rgb, self.turns)) if self.turns else rgb


def _display_rotation(source: VideoSource, info: VideoInfo, packets_to_try: int = 64) -> int:
    """The display matrix's rotation, as FFmpeg puts it on decoded frames, rounded to a quarter turn (0-270): read
    from the first frame that decodes (a broken first GOP is passed over; none in `packets_to_try`: 0)."""
    with _ffmpeg_errors(source.path, "cannot read"), _open(source) as container:
        stream = container.streams[info.stream_index]
        for packet in itertools.islice(container.demux(stream), packets_to_try):
            try:
                frames = stream.codec_context.decode(packet)
            except av.error.InvalidDataError:
                continue
            if frames:
                return round(frames[0].rotation / 90) % 4 * 90
    return 0


def _with_rotation(info: VideoInfo, rotation: int) -> VideoInfo:
    if rotation in (90, 270):
        return replace(info, rotation=rotation, width=info.height, height=info.width)
    return replace(info, rotation=rotation)


def _decodes_in_pts_order(source: VideoSource, info: VideoInfo) -> bool:
    """Whether every decoded frame carries the probed timestamp of its position (a whole decode, no conversion)."""
    with _ffmpeg_errors(source.path, "decoding failed"), _open(source) as container:
        stream = container.streams[info.stream_index]
        decoded = [frame.pts for frame in _decoded(container.demux(stream), stream.codec_context, None)]
    return decoded == list(info.pts)
