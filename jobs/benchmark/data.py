"""`python -m jobs.benchmark data`: clips/s per CPU of `decode_frames` against reference decoders.

- window: PySlowFast's way: seek to the keyframe before the clip, decode to the clip's end, convert every frame of
  the clip's window with `frame.to_rgb().to_ndarray()` (PyAV's defaults), then pick the clip's frames.
- window-1t: the same with single-thread colour conversion, as decode_frames converts.
- floor: the least a frame-by-frame decoder can do: the same decode, converting only the kept frames (one thread).

Every decoder uses one decoder thread, decodes the same random clips, and is timed in CPU seconds (all threads of
this process), interleaved so that load from other processes falls on all alike. Outputs are checked identical.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import av
import numpy as np

from pipeline.data.sampling import ClipSpec, random_clip
from pipeline.data.video import VideoDecodeError, VideoInfo, decode_frames, probe

DEFAULT_VIDEOS = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "videos"
VIDEO_SUFFIXES = {".mp4", ".webm", ".mkv", ".avi", ".mov"}
Decoder = Callable[[str, VideoInfo, list[int]], np.ndarray]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("videos", nargs="*", type=Path, help=f"videos (default: every video in {DEFAULT_VIDEOS})")
    parser.add_argument("--clips", type=int, default=50, help="random clips per video (default: %(default)s)")
    parser.add_argument("--num-frames", type=int, default=16, help="frames per clip, T (default: %(default)s)")
    parser.add_argument("--sampling-rate", type=int, default=4, help="τ at the target fps (default: %(default)s)")
    parser.add_argument("--target-fps", type=float, default=30.0, help="(default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="clip positions (default: %(default)s)")


def run(args: argparse.Namespace) -> int:
    videos = args.videos or sorted(path for path in DEFAULT_VIDEOS.glob("*") if path.suffix in VIDEO_SUFFIXES)
    if not videos:
        print(f"benchmark data: error: no videos given and none in {DEFAULT_VIDEOS}", file=sys.stderr)
        return 2
    spec = ClipSpec(args.num_frames, args.sampling_rate, args.target_fps)
    decoders: dict[str, Decoder] = {"ours": _ours, "window": _window, "window-1t": _window_1t, "floor": _floor}
    print(f"{spec.num_frames}x{spec.sampling_rate} clips at {spec.target_fps:g} fps, {args.clips} per video")
    print("clips/s per CPU, and time ratios (window/ours: how many times faster than the window baseline)")
    ratios = f"{'window/ours':>13}{'window-1t/ours':>16}{'ours/floor':>12}"
    print(f"{'video':<26}" + "".join(f"{name:>10}" for name in decoders) + ratios)
    for path in videos:
        try:
            info = probe(path)
        except VideoDecodeError as error:
            print(f"benchmark data: error: {error}", file=sys.stderr)
            return 2
        if not info.pts_ordered:
            print(f"{Path(path).name:<26}skipped: the references identify frames by pts, which this container guesses")
            continue
        rng = np.random.default_rng(args.seed)
        clips = [random_clip(info.num_frames, info.fps, spec, rng).indices.tolist() for _ in range(args.clips)]
        seconds = _time_interleaved(str(path), info, clips, decoders)
        print(
            f"{Path(path).name:<26}"
            + "".join(f"{len(clips) / seconds[name]:>10.1f}" for name in decoders)
            + f"{seconds['window'] / seconds['ours']:>12.2f}x{seconds['window-1t'] / seconds['ours']:>15.2f}x"
            + f"{seconds['ours'] / seconds['floor']:>11.2f}x"
        )
    return 0


def _time_interleaved(
    path: str, info: VideoInfo, clips: list[list[int]], decoders: dict[str, Decoder]
) -> dict[str, float]:
    seconds = dict.fromkeys(decoders, 0.0)
    names = list(decoders)
    for number, indices in enumerate(clips):
        outputs = {}
        for name in names[number % len(names) :] + names[: number % len(names)]:
            started = time.process_time()
            outputs[name] = decoders[name](path, info, indices)
            seconds[name] += time.process_time() - started
        reference = outputs["floor"]
        if not all(np.array_equal(output, reference) for output in outputs.values()):
            raise AssertionError(f"{path}: decoders disagree on frames {indices}")
    return seconds


def _ours(path: str, info: VideoInfo, indices: list[int]) -> np.ndarray:
    return decode_frames(path, indices, info)


def _window(path: str, info: VideoInfo, indices: list[int]) -> np.ndarray:
    return _pick_from_window(path, info, indices, lambda frame: frame.to_rgb().to_ndarray())


def _window_1t(path: str, info: VideoInfo, indices: list[int]) -> np.ndarray:
    return _pick_from_window(path, info, indices, lambda frame: frame.to_ndarray(format="rgb24", threads=1))


def _pick_from_window(
    path: str, info: VideoInfo, indices: list[int], to_rgb: Callable[[av.VideoFrame], np.ndarray]
) -> np.ndarray:
    first, last = info.pts[min(indices)], info.pts[max(indices)]
    window = {pts: to_rgb(frame) for pts, frame in _frames_to(path, info, min(indices), last) if pts >= first}
    return np.stack([window[info.pts[index]] for index in indices])


def _floor(path: str, info: VideoInfo, indices: list[int]) -> np.ndarray:
    kept_pts = {info.pts[index] for index in indices}
    kept = {
        pts: frame.to_ndarray(format="rgb24", threads=1)
        for pts, frame in _frames_to(path, info, min(indices), max(kept_pts))
        if pts in kept_pts
    }
    return np.stack([kept[info.pts[index]] for index in indices])


def _frames_to(path: str, info: VideoInfo, first_index: int, last_pts: int) -> Iterator[tuple[int, av.VideoFrame]]:
    """(pts, frame) for every frame decoded from the keyframe before `first_index` up to pts `last_pts`."""
    position = max(k for k, keyframe in enumerate(info.keyframes) if keyframe <= first_index)
    with av.open(path) as container:
        stream = container.streams[info.stream_index]
        stream.codec_context.thread_count = 1
        if info.keyframes[position] > 0:
            container.seek(info.keyframe_pts[position], stream=stream, backward=True)  # exact in MP4
        for frame in container.decode(stream):
            yield frame.pts, frame
            if frame.pts >= last_pts:
                return
