"""`python -m jobs.benchmark augment`: what the recipe's augmentations cost, next to what decoding a clip costs.

Per 16×224² clip on one CPU thread (the decode tasks' setting): decoding a random 16×4 clip of a Kinetics video,
the inception crop, RandAugment (the recipe's string, bicubic and bilinear), colour jitter, and the crop resized
bicubic; contenders interleaved, CPU seconds of this process. Random erasing runs on the training device after
normalisation, so it is timed per batch there (`--device`). `--pipeline` also times the whole Ray Data path, the
recipe's augmentation on and off, in clips/s per decode core.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from jobs.benchmark.data import DEFAULT_VIDEOS
from pipeline.data.augment import ColorJitter, RandAugment, RandomErasing, parse_rand_augment
from pipeline.data.sampling import ClipSpec, random_clip
from pipeline.data.transforms import TrainTransform
from pipeline.data.video import decode_frames, probe

RECIPE = "rand-m7-n4-mstd0.5-inc1"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--video", type=Path, default=DEFAULT_VIDEOS / "k400_demo_340x256.mp4")
    parser.add_argument("--clips", type=int, default=40, help="clips per contender (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=8, help="batch of the erasing timing")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--pipeline", action="store_true", help="also time the Ray Data path, recipe on and off")
    parser.add_argument("--repeat", type=int, default=16, help="--pipeline: times the video is listed")
    parser.add_argument("--json", type=Path, help="also write the figures as JSON to this file")


def _crop(interpolation: str) -> TrainTransform:
    return TrainTransform(224, (256, 320), True, (0.08, 1.0), (0.75, 1.3333), True, (), interpolation)


def _contenders(args: argparse.Namespace) -> dict[str, Callable[[np.random.Generator], object]]:
    """name → one clip's work; the augment contenders start from a decoded, cropped 224² clip."""
    info = probe(args.video)
    spec = ClipSpec(16, 4, 30.0)
    frames = decode_frames(args.video, random_clip(info.num_frames, info.fps, spec, np.random.default_rng(0)).indices)
    cropped = _crop("bilinear")(frames, np.random.default_rng(0))
    recipe = parse_rand_augment(RECIPE)
    return {
        "decode 16×4 clip": lambda rng: decode_frames(
            args.video, random_clip(info.num_frames, info.fps, spec, rng).indices, info, threads=1
        ),
        "inception crop + flip (bilinear)": lambda rng: _crop("bilinear")(frames, rng),
        "inception crop + flip (bicubic)": lambda rng: _crop("bicubic")(frames, rng),
        f"RandAugment {RECIPE} (bicubic)": lambda rng: RandAugment(recipe, "bicubic")(cropped, rng),
        f"RandAugment {RECIPE} (bilinear)": lambda rng: RandAugment(recipe, "bilinear")(cropped, rng),
        "colour jitter 0.4": lambda rng: ColorJitter(0.4, 0.4, 0.4)(cropped, rng),
    }


def _per_clip_ms(args: argparse.Namespace) -> dict[str, float]:
    torch.set_num_threads(1)
    contenders = _contenders(args)
    seconds: dict[str, list[float]] = {name: [] for name in contenders}
    rngs = {name: np.random.default_rng(1) for name in contenders}  # the same draws for every repeat
    for _ in range(args.clips):  # interleaved: machine noise falls on every contender alike
        for name, work in contenders.items():
            start = time.process_time()
            work(rngs[name])
            seconds[name].append(time.process_time() - start)
    return {name: 1000 * statistics.mean(values) for name, values in seconds.items()}


def _erase_ms(args: argparse.Namespace) -> float:
    device = torch.device(args.device)
    clips = torch.randn(args.batch_size, 3, 16, 224, 224, device=device)
    erasing = RandomErasing(0.25, "pixel", 1, np.random.default_rng(0))
    erasing(clips)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(20):
        erasing(clips)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return 1000 * (time.perf_counter() - start) / 20


def _pipeline(args: argparse.Namespace) -> dict[str, float]:
    import ray

    from jobs.benchmark.gpu_parts import _decode_rate
    from pipeline.data.augment import clip_augments

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        settings = {"recipe augment": clip_augments(RECIPE, "bicubic", 0.0), "no augment": ()}
        _decode_rate(args.video, 2, 2, ())  # untimed: starts the decode workers
        rates: dict[str, list[float]] = {name: [] for name in settings}
        for _ in range(2):
            for name, augments in settings.items():
                rates[name].append(_decode_rate(args.video, args.repeat, 2, augments))
        return {name: statistics.mean(values) for name, values in rates.items()}
    finally:
        ray.shutdown()


def run(args: argparse.Namespace) -> int:
    per_clip = _per_clip_ms(args)
    decode = per_clip["decode 16×4 clip"]
    print(f"{args.video.name}: CPU ms per 16×224² clip, one thread, mean of {args.clips} (interleaved)")
    print(f"{'work':<52} {'ms/clip':>8} {'vs decode':>9}")
    for name, ms in per_clip.items():
        print(f"{name:<52} {ms:>8.1f} {ms / decode:>8.2f}×")
    report = {"video": str(args.video), "clips": args.clips, "ms_per_clip": per_clip}
    report["erase_ms_per_batch"] = {"device": args.device, "batch": args.batch_size, "ms": _erase_ms(args)}
    print(f"random erasing (0.25, pixel), batch of {args.batch_size} on {args.device}: "
          f"{report['erase_ms_per_batch']['ms']:.2f} ms")  # fmt: skip
    if args.pipeline:
        report["pipeline_clips_per_s_per_core"] = _pipeline(args)
        for name, rate in report["pipeline_clips_per_s_per_core"].items():
            print(f"Ray Data path, {name}: {rate:.2f} clips/s per decode core (2 CPUs, num_clips 2)")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0
