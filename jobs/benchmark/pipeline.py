"""`python -m jobs.benchmark pipeline`: training clips/s per CPU core of the Ray Data video path, end to end.

Probes the videos once, then times `pipeline.dataset.train_dataset` (shuffle, seek-and-decode, sample, short-side
jitter, crop, flip) for each repeated-augmentation setting in one run, on a local Ray given `--cpus` decode CPUs
(or on the cluster of RAY_ADDRESS / `ray start`, whose CPUs are its own: `--cpus` then only divides the figures).
Clips/s per core is the input side's budget unit: a GPU that trains at G clips/s needs G / (clips/s per core) cores.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pyarrow as pa

from jobs.benchmark.data import DEFAULT_VIDEOS, VIDEO_SUFFIXES
from pipeline.data.index import info_to_row
from pipeline.data.video import probe


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("videos", nargs="*", type=Path, help=f"videos (default: every video in {DEFAULT_VIDEOS})")
    parser.add_argument("--num-clips", type=int, nargs="+", default=[1, 2], help="settings to compare (default: 1 2)")
    parser.add_argument("--repeat", type=int, default=24, help="times each video is listed (default: %(default)s)")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs Ray may decode on (default: %(default)s)")
    parser.add_argument("--num-frames", type=int, default=16, help="(default: %(default)s)")
    parser.add_argument("--sampling-rate", type=int, default=4, help="(default: %(default)s)")
    parser.add_argument("--crop-size", type=int, default=224, help="(default: %(default)s)")
    parser.add_argument("--short-side", type=int, nargs=2, default=[256, 320], help="jitter range (default: 256 320)")
    parser.add_argument("--json", type=Path, help="also write the figures as JSON to this file")


def run(args: argparse.Namespace) -> int:
    import ray

    from pipeline.cluster import connect
    from pipeline.data.dataset import DecodeTasks, train_dataset
    from pipeline.data.sampling import ClipSpec
    from pipeline.data.transforms import TrainTransform

    paths = args.videos or sorted(p for p in DEFAULT_VIDEOS.iterdir() if p.suffix in VIDEO_SUFFIXES)
    rows = [{"path": str(p), "label": 0, **info_to_row(probe(p))} for p in paths]
    index = pa.Table.from_pylist(rows * args.repeat)
    connect(None, args.cpus, log_to_driver=False)  # under `ray job submit` or `ray start`: that cluster

    def clips_and_seconds(num_clips: int) -> tuple[int, float]:
        transform = TrainTransform(
            crop_size=args.crop_size,
            short_side=tuple(args.short_side),
            random_resized_crop=False,
            crop_area=(1.0, 1.0),
            crop_aspect=(1.0, 1.0),
            flip=True,
        )
        tasks = DecodeTasks(
            cpus=1.0, concurrency=None, resources={}, videos_per_task=len(paths), skip_counter=f"bench-{num_clips}"
        )
        spec = ClipSpec(args.num_frames, args.sampling_rate, 30.0)
        dataset = train_dataset(index, spec=spec, transform=transform, num_clips=num_clips, tasks=tasks)
        start, clips = time.perf_counter(), 0
        for batch in dataset.iter_batches(batch_size=8, batch_format="numpy"):
            clips += len(batch["label"])
        return clips, time.perf_counter() - start

    clips_and_seconds(args.num_clips[0])  # untimed: starts Ray's worker processes
    results = []
    for num_clips in args.num_clips:
        clips, seconds = clips_and_seconds(num_clips)
        results.append(
            {
                "num_clips": num_clips,
                "clips": clips,
                "seconds": round(seconds, 2),
                "clips_per_sec": round(clips / seconds, 2),
                "clips_per_sec_per_core": round(clips / seconds / args.cpus, 2),
            }
        )
    ray.shutdown()
    print(
        f"{len(index)} videos ({len(paths)} files × {args.repeat}), {args.num_frames}×{args.sampling_rate} clips, "
        f"crop {args.crop_size}, short side {args.short_side[0]}-{args.short_side[1]}, {args.cpus} decode CPUs"
    )
    print(f"{'num_clips':>9} {'clips':>6} {'seconds':>8} {'clips/s':>8} {'per core':>9} {'vs first':>9}")
    for result in results:
        ratio = result["clips_per_sec"] / results[0]["clips_per_sec"]
        print(
            f"{result['num_clips']:>9} {result['clips']:>6} {result['seconds']:>8} {result['clips_per_sec']:>8} "
            f"{result['clips_per_sec_per_core']:>9} {ratio:>8.2f}×"
        )
    if args.json:
        args.json.write_text(json.dumps({"videos": [str(p) for p in paths], "cpus": args.cpus, "results": results}))
    return 0
