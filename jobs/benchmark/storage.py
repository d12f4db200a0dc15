"""`python -m jobs.benchmark storage`: decoding videos from an object store (a local S3 server) against local disk.

Each video is uploaded to a bucket of moto's S3 server (started here on a free loopback port, behind a proxy that
counts every request and the bytes it answers), and the same random 16×4 clips are decoded from the local file and
from the object, the readers interleaved clip by clip so that load from other processes falls on all alike:

- local: `decode_clips` on the file (FFmpeg reads it itself);
- s3 whole: the object fetched in one request into memory, then decoded (`decode_clips` on the URI does this up to
  `video_source.WHOLE_FETCH_MAX_BYTES`);
- s3 ranged 4 MiB: FFmpeg's reads served as 4 MiB ranged requests (what a decode does above that size), and the
  same with 1 MiB ranges;
- s3 ranged 32 KiB: FFmpeg's own 32 KiB reads, each one ranged request (PyAV over a pyarrow file as it comes).

Reported per reader: wall milliseconds per clip (the wait for the bytes included; timed straight from the server),
and per clip the bytes the server sent and its requests, counted in a separate pass through the proxy (local: the
bytes this process read, /proc/self/io rchar). The probe of each object is
counted too: it reads each object once. `--long-seconds` adds a generated 640×360 video of that length, of which a
clip is a small part. Needs `moto[server]` (the dev extra).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import av
import numpy as np
import pyarrow.fs as pafs

from jobs.benchmark.data import DEFAULT_VIDEOS
from jobs.benchmark.local_s3 import FaultProxy, MotoServer
from pipeline import storage
from pipeline.data.sampling import ClipSpec, random_clip
from pipeline.data.video import VideoInfo, decode_clips, probe
from pipeline.data.video_source import VideoSource

BUCKET = "bench"
DEFAULT = ("k400_demo_340x256.mp4", "h264_1080p_short.mp4")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("videos", nargs="*", type=Path, help=f"videos (default: {', '.join(DEFAULT)} of ../shared)")
    parser.add_argument("--clips", type=int, default=20, help="random clips per video (default: %(default)s)")
    parser.add_argument(
        "--long-seconds", type=int, default=60, help="a generated video this long, 0: none (%(default)s)"
    )
    parser.add_argument("--seed", type=int, default=0, help="clip positions (default: %(default)s)")


def run(args: argparse.Namespace) -> int:
    videos = [str(path) for path in args.videos] or [str(DEFAULT_VIDEOS / name) for name in DEFAULT]
    with tempfile.TemporaryDirectory() as folder:
        if args.long_seconds:
            videos.append(_long_video(Path(folder) / f"long_{args.long_seconds}s_640x360.mp4", args.long_seconds))
        server = MotoServer()
        proxy = FaultProxy(server.url)
        try:
            pafs.S3FileSystem(endpoint_override=server.url, allow_bucket_creation=True).create_dir(BUCKET)
            print(f"16x4 clips at 30 fps, {args.clips} per video; moto S3 at {server.url} behind a counting proxy")
            print(f"{'video':<28}{'MB':>7}  {'reader':<18}{'ms/clip':>9}{'kB/clip':>10}{'requests/clip':>15}")
            for path in videos:
                _compare(path, server, proxy, args.clips, args.seed)
        finally:
            proxy.stop()
            server.stop()
    return 0


def _use(endpoint: str) -> None:
    """Point this process's S3 clients at the local server, with its dummy credentials."""
    os.environ.update(
        AWS_ENDPOINT_URL=endpoint,
        AWS_ACCESS_KEY_ID="benchmark",
        AWS_SECRET_ACCESS_KEY="benchmark",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_EC2_METADATA_DISABLED="true",
    )


def _compare(path: str, server: MotoServer, proxy: FaultProxy, num_clips: int, seed: int) -> None:
    uri = f"s3://{BUCKET}/{Path(path).name}"
    _use(proxy.url)
    storage.write_bytes(uri, Path(path).read_bytes())
    proxy.clear()
    info = probe(uri)
    probe_bytes, probe_requests = _traffic(proxy)
    rng = np.random.default_rng(seed)
    spec = ClipSpec(16, 4, 30.0)
    clips = [random_clip(info.num_frames, info.fps, spec, rng).indices.tolist() for _ in range(num_clips)]
    readers: dict[str, Callable[[], VideoSource]] = {
        "local": lambda: VideoSource(path),
        "s3 whole": lambda: VideoSource(uri, data=storage.read_bytes(uri)),
        "s3 ranged 4 MiB": lambda: VideoSource(uri, ranged=True),
        "s3 ranged 1 MiB": lambda: _Ranged1M(uri, ranged=True),
        "s3 ranged 32 KiB": lambda: _Ranged32k(uri, ranged=True),
    }
    fetched = {name: _fetched(readers[name], info, clips, proxy) for name in readers}
    _use(server.url)  # timed straight from the server: the proxy's own copying is not part of a read
    seconds = _timed(readers, info, clips)
    size = Path(path).stat().st_size
    probed = f"{'':>9}{probe_bytes / 1e3:>10.1f}{probe_requests:>15}"
    print(f"{Path(path).name:<28}{size / 1e6:>7.2f}  {'s3 probe (once)':<18}{probed}")
    for name in readers:
        bytes_read, requests = fetched[name]
        shown = f"{requests / len(clips):>15.1f}" if name != "local" else f"{'-':>15}"
        per_clip = f"{1000 * seconds[name] / len(clips):>9.1f}{bytes_read / len(clips) / 1e3:>10.1f}{shown}"
        print(f"{'':<28}{'':>7}  {name:<18}{per_clip}")


def _fetched(
    reader: Callable[[], VideoSource], info: VideoInfo, clips: list[list[int]], proxy: FaultProxy
) -> tuple[int, int]:
    """Bytes the server sent and requests over every clip (local: bytes this process read)."""
    total_bytes = total_requests = 0
    for indices in clips:
        proxy.clear()
        read_before = _rchar()
        with reader() as source:
            decode_clips(source.path, [(indices, None)], info, source=source)
        local = not storage.is_uri(source.path)
        sent, requests = (_rchar() - read_before, 0) if local else _traffic(proxy)
        total_bytes, total_requests = total_bytes + sent, total_requests + requests
    return total_bytes, total_requests


def _timed(readers: dict[str, Callable[[], VideoSource]], info: VideoInfo, clips: list[list[int]]) -> dict[str, float]:
    """Wall seconds of each reader over every clip (waits for bytes included), interleaved clip by clip."""
    seconds = dict.fromkeys(readers, 0.0)
    names = list(readers)
    for number, indices in enumerate(clips):
        for name in names[number % len(names) :] + names[: number % len(names)]:
            started = time.perf_counter()
            with readers[name]() as source:
                decode_clips(source.path, [(indices, None)], info, source=source)
            seconds[name] += time.perf_counter() - started
    return seconds


class _Ranged1M(VideoSource):
    range_bytes = 2**20


class _Ranged32k(VideoSource):
    range_bytes = 32 * 2**10  # PyAV's default buffer for a file object


def _traffic(proxy: FaultProxy) -> tuple[int, int]:
    traffic = proxy.traffic
    return sum(traffic.bytes_sent.values()), sum(traffic.requests.values())


def _rchar() -> int:
    with open("/proc/self/io") as io:
        return next(int(line.split()[1]) for line in io if line.startswith("rchar:"))


def _long_video(path: Path, seconds: int) -> str:
    """A 640×360, 30 fps H.264 video (a keyframe every 2 s) of moving noise, about 0.9 MB a second."""
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (90, 160, 3), dtype=np.uint8)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=30, options={"crf": "20", "preset": "ultrafast", "g": "60"})
        stream.width, stream.height, stream.pix_fmt = 640, 360, "yuv420p"
        for index in range(30 * seconds):
            small = np.roll(base, index, axis=1) ^ rng.integers(0, 40, base.shape, dtype=np.uint8)
            frame = av.VideoFrame.from_ndarray(np.repeat(np.repeat(small, 4, 0), 4, 1), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return str(path)
