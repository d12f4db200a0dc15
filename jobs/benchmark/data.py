"""`python -m jobs.benchmark data`: clips/s per CPU of `decode_frames` against reference decoders.

- window: PySlowFast's way: seek to the keyframe before the clip, decode to the clip's end, convert every frame of
  the clip's window with `frame.to_rgb().to_ndarray()` (PyAV's defaults), then pick the clip's frames.
- window-1t: the same with single-thread colour conversion, as decode_frames converts.
- floor: the least a frame-by-frame decoder can do: the same decode, converting only the kept frames (one thread).
- torchcodec (0.13, exact seek mode, one FFmpeg thread) and decord (0.6, one thread), where installed: each opens the
  video once per clip, as a training epoch does, and so pays for its own index of the file there.

The references identify a decoded frame as decode_frames does: by pts where the container stores real ones (MP4,
MKV, TS), else (AVI) by counting from the keyframe the decode started at. Every decoder uses one decoder thread,
decodes the same random clips, and is timed in CPU seconds (all threads of this process), interleaved so that load
from other processes falls on all alike. Every output is checked against an exact reference, the video decoded once
front to back: ours and the PyAV references must match it (a mismatch is a bug and stops the benchmark); a peer that
returns other frames is reported as "wrong frames" instead of a speed.
"""

from __future__ import annotations

import argparse
import hashlib
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
EXACT = ("ours", "window", "window-1t", "floor")  # must return the reference's frames; peers may not


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
    decoders.update(_peers())
    print(f"{spec.num_frames}x{spec.sampling_rate} clips at {spec.target_fps:g} fps, {args.clips} per video")
    print("clips/s per CPU, and time ratios (window/ours: how many times faster than the window baseline)")
    ratios = [(name, "ours") for name in decoders if name not in ("ours", "floor")] + [("ours", "floor")]
    print(f"{'video':<26}" + "".join(f"{n:>12}" for n in decoders) + "".join(f"{f'{a}/{b}':>16}" for a, b in ratios))
    for path in videos:
        try:
            info = probe(path)
        except VideoDecodeError as error:
            print(f"benchmark data: error: {error}", file=sys.stderr)
            return 2
        rng = np.random.default_rng(args.seed)
        clips = [random_clip(info.num_frames, info.fps, spec, rng).indices.tolist() for _ in range(args.clips)]
        seconds, wrong = _time_interleaved(str(path), info, clips, decoders)
        speeds = [f"{'wrong frames' if wrong[n] else f'{len(clips) / seconds[n]:.1f}':>12}" for n in decoders]
        shown = [f"{'-' if wrong[a] else f'{seconds[a] / seconds[b]:.2f}x':>16}" for a, b in ratios]
        print(f"{Path(path).name:<26}" + "".join(speeds) + "".join(shown))
        for name in (n for n in decoders if wrong[n]):
            print(f"  {name}: other frames than the exact reference's in {wrong[name]} of {len(clips)} clips")
    return 0


def _peers() -> dict[str, Decoder]:
    """The installed benchmark peers; each one missing is named with how to install it (they are no dependency)."""
    peers: dict[str, Decoder] = {}
    try:
        from torchcodec.decoders import VideoDecoder
    except (ImportError, RuntimeError, OSError) as error:  # RuntimeError/OSError: FFmpeg's libraries are missing
        print(
            f"torchcodec skipped ({type(error).__name__}: {str(error).splitlines()[0][:100]}); to compare, "
            "`pip install --no-deps torchcodec==0.13.*` and `apt-get install -y ffmpeg`"
        )
    else:

        def torchcodec(path: str, info: VideoInfo, indices: list[int]) -> np.ndarray:
            decoder = VideoDecoder(path, seek_mode="exact", num_ffmpeg_threads=1, dimension_order="NHWC")
            return decoder.get_frames_at(indices).data.numpy()

        peers["torchcodec"] = torchcodec
    try:
        import decord
    except ImportError as error:
        print(f"decord skipped ({error}); to compare, `pip install decord==0.6.*`")
    else:
        peers["decord"] = lambda path, info, indices: (
            decord.VideoReader(path, num_threads=1).get_batch(indices).asnumpy()
        )
    return peers


def _time_interleaved(
    path: str, info: VideoInfo, clips: list[list[int]], decoders: dict[str, Decoder]
) -> tuple[dict[str, float], dict[str, int]]:
    """CPU seconds of each decoder over all clips, and in how many clips it returned other frames than the exact
    reference."""
    reference = _reference_hashes(path, {index for clip in clips for index in clip})
    seconds, wrong = dict.fromkeys(decoders, 0.0), dict.fromkeys(decoders, 0)
    names = list(decoders)
    for number, indices in enumerate(clips):
        for name in names[number % len(names) :] + names[: number % len(names)]:
            started = time.process_time()
            output = decoders[name](path, info, indices)
            seconds[name] += time.process_time() - started
            if [_hash(frame) for frame in output] != [reference[index] for index in indices]:
                if name in EXACT:
                    raise AssertionError(f"{path}: {name} returned other frames than the reference for {indices}")
                wrong[name] += 1
    return seconds, wrong


def _reference_hashes(path: str, keep: set[int]) -> dict[int, str]:
    """The exact reference: every frame decoded front to back, numbered by position; hashes of the kept ones."""
    with av.open(path) as container:
        frames = enumerate(container.decode(container.streams.video[0]))
        return {index: _hash(frame.to_ndarray(format="rgb24")) for index, frame in frames if index in keep}


def _hash(frame: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(frame).data).hexdigest()


def _ours(path: str, info: VideoInfo, indices: list[int]) -> np.ndarray:
    return decode_frames(path, indices, info)


def _window(path: str, info: VideoInfo, indices: list[int]) -> np.ndarray:
    return _pick_from_window(path, info, indices, lambda frame: frame.to_rgb().to_ndarray())


def _window_1t(path: str, info: VideoInfo, indices: list[int]) -> np.ndarray:
    return _pick_from_window(path, info, indices, lambda frame: frame.to_ndarray(format="rgb24", threads=1))


def _pick_from_window(
    path: str, info: VideoInfo, indices: list[int], to_rgb: Callable[[av.VideoFrame], np.ndarray]
) -> np.ndarray:
    first, last = min(indices), max(indices)
    window = {index: to_rgb(frame) for index, frame in _frames_to(path, info, first, last) if index >= first}
    return np.stack([window[index] for index in indices])


def _floor(path: str, info: VideoInfo, indices: list[int]) -> np.ndarray:
    wanted = set(indices)
    kept = {
        index: frame.to_ndarray(format="rgb24", threads=1)
        for index, frame in _frames_to(path, info, min(indices), max(indices))
        if index in wanted
    }
    return np.stack([kept[index] for index in indices])


def _frames_to(path: str, info: VideoInfo, first: int, last: int) -> Iterator[tuple[int, av.VideoFrame]]:
    """(index, frame) for every frame decoded from the keyframe before index `first` up to index `last`.

    A frame's index comes from its pts in pts-ordered containers; elsewhere it is counted from the start keyframe,
    recognised by its pts (frames shown before it, from an open GOP, are passed over).
    """
    position = max(k for k, keyframe in enumerate(info.keyframes) if keyframe <= first)
    start, anchor = info.keyframes[position], info.keyframe_pts[position]
    index_of = {pts: index for index, pts in enumerate(info.pts)}
    with av.open(path) as container:
        stream = container.streams[info.stream_index]
        stream.codec_context.thread_count = 1
        if start > 0:
            container.seek(anchor, stream=stream, backward=True)  # exact in MP4; AVI seeks by its index of keyframes
        counted = None if info.pts_ordered else start - 1
        for frame in container.decode(stream):
            if counted is None:
                index = index_of[frame.pts]
            elif counted >= start or frame.pts == anchor or start == 0:
                counted = index = counted + 1
            else:
                continue
            yield index, frame
            if index >= last:
                return
