"""`python -m jobs.benchmark pipeline`: CPU per training clip of the Ray Data path against the same work in a loop.

For each video and each repeated-augmentation setting, the same index (the video listed `--repeat` times) is made
into one epoch of training clips twice, alternating, in one run with Ray up:
- ray: the training's own datasets (`pipeline.training.driver.build_datasets` on the recipe's `data` settings:
  videos per task, the epoch order, fused resizing), consumed with `iter_torch_batches` as a Train worker does;
  CPU seconds of this process and of Ray's worker processes (`ray`), and of every process of the local Ray
  including its daemons (GCS, raylet, agents: `ray-all`, a cost per node rather than per clip);
- loop: `pipeline.data.dataset.clips_in_a_loop`, the same decode, sampling and transform video after video in this
  process (CPU seconds of this process), and the same with fused resizing off (`loop-unfused`).
The ratio ray / loop is what Ray Data costs on top of the work; clips per CPU-second is the budget unit: a GPU that
trains at G clips/s needs G × (CPU s per clip) cores.
On a cluster (RAY_ADDRESS, `ray start`) the CPUs are the cluster's own: `--cpus` then only divides the figures.
"""

from __future__ import annotations

import argparse
import json
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path

import psutil
import pyarrow as pa

from jobs.benchmark.data import DEFAULT_VIDEOS
from pipeline.data.index import info_to_row
from pipeline.data.video import probe

RECIPE = Path(__file__).resolve().parents[2] / "conf" / "kinetics400_mvit_b_16x4.yaml"
DEFAULT_FILES = ("k400_demo_340x256.mp4", "h264_1080p_short.mp4")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("videos", nargs="*", type=Path, help=f"videos (default: {', '.join(DEFAULT_FILES)})")
    parser.add_argument("--config", type=Path, default=RECIPE, help="recipe whose data settings to use")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides (data.*)")
    parser.add_argument("--num-clips", type=int, nargs="+", default=[1, 2], help="settings to compare (default: 1 2)")
    parser.add_argument("--repeat", type=int, default=32, help="times each video is listed (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=2, help="alternations of the contenders (default: 2)")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs Ray may decode on (default: %(default)s)")
    parser.add_argument("--json", type=Path, help="also write the figures as JSON to this file")


def run(args: argparse.Namespace) -> int:
    import ray

    from pipeline.cluster import connect
    from pipeline.config import load_config, typed

    paths = args.videos or [DEFAULT_VIDEOS / name for name in DEFAULT_FILES]
    connect(None, args.cpus, log_to_driver=False)  # under `ray job submit` or `ray start`: that cluster
    cfg = typed(load_config(args.config, args.set))
    results = []
    for path in paths:
        index = pa.Table.from_pylist([{"path": str(path), "label": 0, **info_to_row(probe(path))}] * args.repeat)
        for num_clips in args.num_clips:
            data = type(cfg.data)(**{**vars(cfg.data), "num_clips": num_clips})
            contenders = _contenders(data, cfg.train, index)
            seconds = dict.fromkeys(contenders, 0.0)
            clips = dict.fromkeys(contenders, 0)
            for _ in range(args.rounds):
                for name, contender in contenders.items():
                    used, made = contender()
                    seconds[name] += used
                    clips[name] += made
            per_clip = {name: 1000 * seconds[name] / clips[name] for name in contenders}
            results.append(
                {"video": Path(path).name, "num_clips": num_clips, "clips": clips, "cpu_ms_per_clip": per_clip}
            )
            _print(results[-1])
    ray.shutdown()
    if args.json:
        args.json.write_text(json.dumps({"cpus": args.cpus, "config": str(args.config), "results": results}))
    return 0


def _contenders(data, train, index: pa.Table) -> dict[str, Callable[[], tuple[float, int]]]:
    from pipeline.data.dataset import clips_in_a_loop
    from pipeline.data.order import epoch_clock, set_epoch
    from pipeline.data.sampling import ClipSpec
    from pipeline.data.skips import skip_counter
    from pipeline.training.driver import DataPlan, build_datasets, train_transform

    spec = ClipSpec(data.num_frames, data.sampling_rate, data.target_fps)
    epochs = iter(range(10**6))

    # One skip counter and epoch clock for every round, as a training run has: held here, created once.
    name = f"bench-{uuid.uuid4().hex[:8]}"
    actors = [skip_counter(name), epoch_clock(f"epoch-{name}")]

    def ray_path() -> tuple[float, int]:
        datasets = build_datasets(data, DataPlan(index, index, [], []), name, train.seed, f"epoch-{name}")
        set_epoch(f"epoch-{name}", next(epochs))
        batches = datasets["train"].iter_torch_batches(
            batch_size=train.batch_size, prefetch_batches=data.prefetch_batches
        )
        return _cpu_of_tree(lambda: (len(batch["label"]) for batch in batches))

    def ray_path_workers() -> tuple[float, int]:
        return ray_seconds.pop()

    ray_seconds: list[tuple[float, int]] = []

    def ray_path_all() -> tuple[float, int]:
        (work, everything), made = ray_path()
        ray_seconds.append((work, made))
        return everything, made

    def loop(fused: bool) -> Callable[[], tuple[float, int]]:
        def run_loop() -> tuple[float, int]:
            made = clips_in_a_loop(
                index,
                spec=spec,
                transform=train_transform(data),
                num_clips=data.num_clips,
                seed=train.seed,
                epoch=next(epochs),
                fused=fused,
            )
            return _cpu_of_process(lambda: (len(columns["label"]) for columns in made))

        return run_loop

    ray_path()  # untimed: starts Ray's worker processes and the actors
    assert actors
    return {"loop": loop(True), "ray-all": ray_path_all, "ray": ray_path_workers, "loop-unfused": loop(False)}


def _cpu_of_process(produce: Callable[[], Iterable[int]]) -> tuple[float, int]:
    started = time.process_time()
    made = sum(produce())
    return time.process_time() - started, made


def _cpu_of_tree(produce: Callable[[], Iterable[int]]) -> tuple[tuple[float, float], int]:
    """CPU seconds, while producing, of (this process and Ray's workers, this process and all its descendants:
    the local Ray's daemons too)."""
    before = _tree_seconds()
    made = sum(produce())
    after = _tree_seconds()
    return (after[0] - before[0], after[1] - before[1]), made


def _tree_seconds() -> tuple[float, float]:
    me = psutil.Process()
    work = everything = 0.0
    for process in [me, *me.children(recursive=True)]:
        try:
            times = process.cpu_times()
            name = process.name()
        except psutil.Error:
            continue
        seconds = times.user + times.system + times.children_user + times.children_system
        everything += seconds
        # Ray names its worker processes ray::IDLE or after their task or actor; its agents end in "Agent".
        work += seconds if process == me or (name.startswith("ray::") and not name.endswith("Agent")) else 0.0
    return work, everything


def _print(result: dict) -> None:
    ms = result["cpu_ms_per_clip"]
    print(
        f"{result['video']:<26} num_clips={result['num_clips']}  CPU ms/clip: loop {ms['loop']:.1f}  "
        f"ray {ms['ray']:.1f}  ray-all {ms['ray-all']:.1f}  loop-unfused {ms['loop-unfused']:.1f}  "
        f"ray/loop {ms['ray'] / ms['loop']:.2f}x  ray-all/loop {ms['ray-all'] / ms['loop']:.2f}x  "
        f"unfused/fused {ms['loop-unfused'] / ms['loop']:.2f}x  clips {result['clips']}"
    )
