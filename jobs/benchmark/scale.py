"""`python -m jobs.benchmark scale`: what an epoch's datasets cost the driver as the index grows to Kinetics size.

For each N, a synthetic index of N rows pointing at a few real short videos is made into one epoch's datasets
exactly as training makes them (`build_datasets`, then `streaming_split` over `--workers` consumers with equal
shards, as Ray Train splits "train"), and the first `--clips` clips are streamed to the consumers. Reported: set-up
time, time to the first batch, clips/s, the peak RSS of this driver (and its RSS before, what imports and Ray cost)
and of Ray Data's split coordinator (where an epoch's order is drawn), and the object store's bytes and objects.
Also the index's own size per video (10 s and 1 h videos, constant and variable frame rate), and how many calls per
second one skip-counter actor (a shard of a pipeline's counter) serves.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import threading
import time
import uuid
from fractions import Fraction
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq

from jobs.benchmark.data import DEFAULT_VIDEOS
from jobs.benchmark.pipeline import RECIPE
from pipeline.data.index import compact_pts, info_to_row
from pipeline.data.video import probe

DEFAULT_FILES = ("k400_demo_340x256.mp4", "ntsc_29.97fps.mp4")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("videos", nargs="*", type=Path, help=f"videos (default: {', '.join(DEFAULT_FILES)})")
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000, 60_000, 240_000], help="index sizes N")
    parser.add_argument("--clips", type=int, default=512, help="clips streamed per N (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=2, help="consumers, as Train workers (default: 2)")
    parser.add_argument("--config", type=Path, default=RECIPE, help="recipe whose data settings to use")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides (data.*)")
    parser.add_argument("--cpus", type=int, default=4, help="logical CPUs of the local Ray (default: 4)")
    parser.add_argument("--actor-seconds", type=float, default=10.0, help="length of each actor load (0: skip)")
    parser.add_argument("--actor-callers", type=int, default=8, help="concurrent tasks calling the actor")
    parser.add_argument("--json", type=Path, help="also write the figures as JSON to this file")


def run(args: argparse.Namespace) -> int:
    import ray

    from pipeline.config import load_config, typed

    paths = args.videos or [DEFAULT_VIDEOS / name for name in DEFAULT_FILES]
    rows = [{"path": str(path), "label": 0, **info_to_row(probe(path, check_last_frame=True))} for path in paths]
    figures: dict = {"index_bytes_per_video": index_bytes_per_video(rows[0])}
    print("index bytes per video:", json.dumps(figures["index_bytes_per_video"]))
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    cfg = typed(load_config(args.config, args.set))
    figures["epochs"] = []
    for count in args.rows:
        table = pa.Table.from_pylist([{**rows[i % len(rows)], "label": i % 400} for i in range(len(rows))])
        index = pa.concat_tables([table] * (count // table.num_rows) + [table.slice(0, count % table.num_rows)])
        figures["epochs"].append(epoch_figures(index, cfg, args))
        print(json.dumps(figures["epochs"][-1]))
    if args.actor_seconds > 0:
        figures["actor"] = [actor_load(pattern, args) for pattern in ("per task", "per video")]
        for result in figures["actor"]:
            print(json.dumps(result))
    ray.shutdown()
    if args.json:
        args.json.write_text(json.dumps(figures))
    return 0


def index_bytes_per_video(row: dict) -> dict[str, float]:
    """Arrow and Parquet bytes per row of an index of 1,000 such rows, for the video as probed and as if 10 s and
    1 h long at 30 fps (a keyframe every 250 frames): constant frame rate in MP4's 1/15360 time base ("cfr"), in
    Matroska's 1 ms time base (33, 33, 34 ms: "ms"), and variable (a frame late every 7: "vfr", every pts listed),
    each stored as the index stores it."""
    sizes = {}
    for label, seconds in (("10s", 10), ("1h", 3600)):
        frames = 30 * seconds
        for rate in ("cfr", "ms", "vfr"):
            time_base = Fraction(1, 1000) if rate == "ms" else Fraction(1, 15360)
            step = Fraction(1, 30) / time_base
            pts = tuple(round(i * step) + (1 if rate == "vfr" and i % 7 == 6 else 0) for i in range(frames))
            start, step_num, step_den, listed = compact_pts(pts, 30.0, time_base)
            keyframes = list(range(0, frames, 250))
            synthetic = {
                **row,
                "num_frames": frames,
                "time_base": str(time_base),
                "keyframes": keyframes,
                "keyframe_pts": [pts[i] for i in keyframes],
                "keyframe_dts": [pts[i] for i in keyframes],
                "pts_start": start,
                "pts_step": step_num,
                "pts_step_den": step_den,
                "pts": listed,
            }
            # 1,000 copies of the row built once (from_pylist of 1,000 hour-long pts lists takes seconds), then
            # made to differ, as real rows do, so that Parquet cannot fold them
            table = pa.concat_tables([pa.Table.from_pylist([synthetic])] * 1000).combine_chunks()
            paths = pa.array([f"{row['path']}.{i}" for i in range(1000)], table.schema.field("path").type)
            table = table.set_column(table.schema.get_field_index("path"), "path", paths)
            streams = pa.array(range(1000), table.schema.field("stream_index").type)
            table = table.set_column(table.schema.get_field_index("stream_index"), "stream_index", streams)
            path = Path(f"/tmp/scale-index-{uuid.uuid4().hex}.parquet")
            pq.write_table(table, path)
            sizes[f"{label}_{rate}_arrow"] = round(table.nbytes / 1000, 1)
            sizes[f"{label}_{rate}_parquet"] = round(path.stat().st_size / 1000, 1)
            path.unlink()
    return sizes


def epoch_figures(index: pa.Table, cfg, args: argparse.Namespace) -> dict:
    from pipeline.data.order import set_epoch
    from pipeline.training.driver import DataPlan, build_datasets

    name = f"scale-{uuid.uuid4().hex[:8]}"
    before = psutil.Process().memory_info()
    peaks = _RssWatcher()
    peaks.start()
    started = time.perf_counter()
    datasets = build_datasets(cfg.data, DataPlan(index, index, [], []), name, cfg.train.seed, f"epoch-{name}")
    shards = datasets["train"].streaming_split(args.workers, equal=True)
    set_epoch(f"epoch-{name}", 0)
    set_up = time.perf_counter() - started
    first_batch: list[float] = []
    clips = [0] * args.workers
    quota = args.clips // args.workers

    def consume(number: int) -> None:
        for batch in shards[number].iter_torch_batches(batch_size=cfg.train.batch_size):
            if not first_batch:
                first_batch.append(time.perf_counter())
            clips[number] += len(batch["label"])
            if clips[number] >= quota:
                break

    iterating = time.perf_counter()
    consumers = [threading.Thread(target=consume, args=(number,)) for number in range(args.workers)]
    for consumer in consumers:
        consumer.start()
    for consumer in consumers:
        consumer.join()
    ended = time.perf_counter()
    store = _object_store()
    peaks.stop.set()
    peaks.join()
    return {
        "rows": index.num_rows,
        "index_mib": round(index.nbytes / 2**20, 1),
        "set_up_s": round(set_up, 2),
        "first_batch_s": round(first_batch[0] - iterating, 2) if first_batch else None,
        "clips": sum(clips),
        "clips_per_s": round(sum(clips) / (ended - iterating), 2),
        "driver_rss_before_mib": round(before.rss / 2**20),
        "driver_peak_rss_mib": round(peaks.driver / 2**20),
        "driver_peak_private_mib": round(peaks.driver_private / 2**20),
        "coordinator_peak_private_mib": round(peaks.coordinator / 2**20),
        **store,
    }


class _RssWatcher(threading.Thread):
    """Peak RSS of this process, and peak private memory (RSS less pages shared with other processes, such as the
    object store's mapping) of it and of the split coordinator actor, sampled every 50 ms."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.driver = self.driver_private = self.coordinator = 0
        self.stop = threading.Event()

    def run(self) -> None:
        me = psutil.Process()
        while not self.stop.is_set():
            memory = me.memory_info()
            self.driver = max(self.driver, memory.rss)
            self.driver_private = max(self.driver_private, memory.rss - memory.shared)
            for child in me.children(recursive=True):
                try:
                    if "SplitCoordinator" in " ".join(child.cmdline()):
                        memory = child.memory_info()
                        self.coordinator = max(self.coordinator, memory.rss - memory.shared)
                except psutil.Error:
                    continue
            time.sleep(0.05)


def _object_store() -> dict[str, float]:
    import ray
    from ray._private.internal_api import memory_summary

    summary = memory_summary(ray.get_runtime_context().gcs_address, stats_only=True)
    used = re.search(r"Plasma memory usage (\d+) MiB, (\d+) objects", summary)
    return {"plasma_mib": int(used.group(1)), "plasma_objects": int(used.group(2))} if used else {}


def actor_load(pattern: str, args: argparse.Namespace) -> dict:
    """`--actor-callers` tasks calling one skip-counter shard for `--actor-seconds`, as decode tasks of 16 videos do:
    "per task" is this design (start and report: 2 calls per task), "per video" the earlier one (start, a note
    before each of the 16 videos, report: 18 calls)."""
    import ray

    from pipeline.data.skips import SLOTS_PER_SHARD, skip_counter

    counters = skip_counter(f"scale-actor-{uuid.uuid4().hex[:8]}")
    counter = counters.shards[0]  # one shard (the only one: 1 decode slot)
    notes = 16 if pattern == "per video" else 0

    @ray.remote(num_cpus=0)
    def caller(number: int, until: float) -> tuple[list[float], float, float]:
        latencies = []
        task = 0
        began_at = time.time()
        while time.time() < until:
            name = f"{number}-{task}"
            for call in [("start", name)] + [("decoding", name, "video.mp4", 1)] * notes + [("report", name, 0, [], 0)]:
                began = time.perf_counter()
                ray.get(getattr(counter, call[0]).remote(*call[1:]))
                latencies.append(time.perf_counter() - began)
            task += 1
        return latencies, began_at, time.time()

    ray.get([caller.remote(n, time.time() + 1) for n in range(args.actor_callers)])  # starts the processes
    actor = psutil.Process(ray.get(counter.__ray_call__.remote(lambda _: os.getpid())))
    cpu_before = sum(actor.cpu_times()[:2])
    until = time.time() + args.actor_seconds
    answers = ray.get([caller.remote(n, until) for n in range(args.actor_callers)])
    actor_cpu = sum(actor.cpu_times()[:2]) - cpu_before
    latencies = np.concatenate([answer[0] for answer in answers])
    calls_per_s = len(latencies) / (max(a[2] for a in answers) - min(a[1] for a in answers))
    # the actor's own CPU time (on a loaded machine calls per second measure the callers as much as the actor)
    cpu_ms_per_call = 1000 * actor_cpu / len(latencies)
    return {
        "pattern": pattern,
        "callers": args.actor_callers,
        "calls_per_s": round(calls_per_s),
        "p50_ms": round(1000 * float(np.percentile(latencies, 50)), 2),
        "p99_ms": round(1000 * float(np.percentile(latencies, 99)), 2),
        "videos_per_s_served": round(calls_per_s * 16 / (2 + notes)),
        "actor_cpu_ms_per_call": round(cpu_ms_per_call, 3),
        "calls_per_s_one_core": round(1000 / cpu_ms_per_call) if cpu_ms_per_call else None,  # alone on a core
        "slots_per_shard": SLOTS_PER_SHARD,  # a counter has a shard per this many concurrent decode tasks
    }
