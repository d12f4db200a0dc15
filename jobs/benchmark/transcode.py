"""`python -m jobs.benchmark transcode`: what re-encoding (`jobs.prepare transcode`) buys per clip, and costs.

Each video is re-encoded with every setting asked for (all combinations of the lists), then the same random 16×4
clips are read from the original and from every re-encoded file, the files interleaved clip by clip so that load
from other processes falls on all alike: `decode_frames`, then the training's crop (short-side jitter 256–320, 224²,
flip) on one thread. Reported per file: bytes, encode CPU seconds, PSNR against the source frames scaled the same
way (the codec's loss alone), and clips/s per CPU (CPU seconds of this process) of decoding and of decode + crop.
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import torch

from jobs.benchmark.data import DEFAULT_VIDEOS, VIDEO_SUFFIXES
from pipeline.data.sampling import ClipSpec, random_clip
from pipeline.data.transcode import EncodeSettings, transcode_video
from pipeline.data.transforms import TrainTransform
from pipeline.data.video import VideoInfo, decode_frames, probe

CROP = TrainTransform(224, (256, 320), random_resized_crop=False, crop_area=(1, 1), crop_aspect=(1, 1), flip=True)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("videos", nargs="*", type=Path, help=f"videos (default: every video in {DEFAULT_VIDEOS})")
    parser.add_argument("--short-side", type=int, nargs="+", default=[320], help="(default: %(default)s)")
    parser.add_argument("--gop", type=int, nargs="+", default=[32], help="(default: %(default)s)")
    parser.add_argument("--crf", type=int, nargs="+", default=[23], help="(default: %(default)s)")
    parser.add_argument("--preset", nargs="+", default=["fast"], help="(default: %(default)s)")
    parser.add_argument("--tune", nargs="+", default=["none"], help="x264 tunes, none for none (default: none)")
    parser.add_argument("--clips", type=int, default=30, help="random clips per file (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="clip positions and crops (default: %(default)s)")


@dataclass
class _File:
    name: str
    info: VideoInfo
    bytes: int
    encode_seconds: float | None = None
    psnr: float | None = None
    decode_seconds: float = 0.0
    crop_seconds: float = 0.0


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(1)  # one core's work, as in a decode task of one CPU
    videos = args.videos or sorted(path for path in DEFAULT_VIDEOS.glob("*") if path.suffix in VIDEO_SUFFIXES)
    tunes = ["" if tune == "none" else tune for tune in args.tune]
    grid = [
        EncodeSettings(*values) for values in itertools.product(args.short_side, args.gop, args.crf, args.preset, tunes)
    ]
    spec = ClipSpec(16, 4, 30.0)
    print(f"16x4 clips at 30 fps, {args.clips} per file; clips/s per CPU of decode and of decode + 224² crop")
    print(
        f"{'file':<52}{'size':>10}{'MB':>7}{'bytes':>7}{'enc s':>7}{'PSNR':>6}{'dec/s':>7}{'+crop/s':>8}{'speed-up':>9}"
    )
    with tempfile.TemporaryDirectory() as scratch:
        for path in videos:
            files = [_File(path.name, probe(path), path.stat().st_size)]
            for settings in grid:
                files.append(_encoded(str(path), Path(scratch), settings))
            _time_clips(files, spec, args.clips, args.seed)
            _print(files, args.clips)
    return 0


def _encoded(source: str, scratch: Path, settings: EncodeSettings) -> _File:
    name = f"{Path(source).stem}_s{settings.short_side}_g{settings.gop}_c{settings.crf}_{settings.preset}"
    target = scratch / f"{name}_{settings.tune}.mp4" if settings.tune else scratch / f"{name}.mp4"
    started = time.process_time()
    size = transcode_video(source, target, settings)
    seconds = time.process_time() - started
    return _File(target.name, probe(target), size, encode_seconds=seconds, psnr=_psnr(source, str(target)))


def _psnr(source: str, encoded: str) -> float:
    """PSNR (dB) of the encoded frames against the source frames scaled to their size by the same scaler."""
    squared, count = 0.0, 0
    with av.open(source) as original, av.open(encoded) as new:
        for old_frame, new_frame in zip(original.decode(video=0), new.decode(video=0)):
            reference = old_frame.reformat(new_frame.width, new_frame.height, format="yuv420p", interpolation="BICUBIC")
            difference = reference.to_ndarray(format="rgb24").astype(np.float64) - new_frame.to_ndarray(format="rgb24")
            squared, count = squared + float(np.square(difference).sum()), count + difference.size
    return 10 * np.log10(255**2 / (squared / count))


def _time_clips(files: list[_File], spec: ClipSpec, clips: int, seed: int) -> None:
    info = files[0].info
    rng = np.random.default_rng(seed)
    starts = [random_clip(info.num_frames, info.fps, spec, rng).indices.tolist() for _ in range(clips)]
    for number, indices in enumerate(starts):
        for file in files[number % len(files) :] + files[: number % len(files)]:
            started = time.process_time()
            frames = decode_frames(file.info.path, indices, file.info)
            decoded = time.process_time()
            CROP(frames, np.random.default_rng([seed, number]))
            file.decode_seconds += decoded - started
            file.crop_seconds += time.process_time() - decoded


def _print(files: list[_File], clips: int) -> None:
    original = files[0]
    for file in files:
        cost = file.decode_seconds + file.crop_seconds
        print(
            f"{file.name:<52}{file.info.width:>5}x{file.info.height:<4}{file.bytes / 1e6:>7.2f}"
            f"{file.bytes / original.bytes:>6.2f}x"
            + (
                f"{file.encode_seconds:>7.2f}{file.psnr:>6.1f}"
                if file.encode_seconds is not None
                else f"{'-':>7}{'-':>6}"
            )
            + f"{clips / file.decode_seconds:>7.1f}{clips / cost:>8.1f}"
            + f"{(original.decode_seconds + original.crop_seconds) / cost:>8.2f}x"
        )
