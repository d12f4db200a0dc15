"""`python -m jobs.benchmark gpu-check`: the CUDA path run once, every figure it owes, in one JSON and one table.

Five parts, each time-boxed; a part that fails or runs out of time is recorded with its one-line reason and the
next part runs:
  1 parity      mvit_b_16x4 fp32 logits against torchvision's mvit_v1_b with the same weights (TF32 off), and
                bf16-autocast logits against fp32: relative errors on the device
  2 model       `jobs.benchmark model` training and inference in bf16, ours against torchvision at the same batch,
                eager and torch.compile: clips/s, TFLOP/s, MFU against a matmul ceiling of the same run, peak
                memory; the largest training batch that fits, with and without activation checkpointing; and the
                host syncs of the real training step (`torch.cuda.set_sync_debug_mode`)
  3 sdpa        the attention kernel each block gets
  4 ray_train   one epoch of the demo through Ray Train on the device (bf16 + compile, then fp16 with the scaler),
                then `jobs.evaluate` on a device replica; each must finish and log to MLflow
  5 data        the clips/s one device trains at against the decode cores that rate needs, at the pipeline's
                clips/s per core measured here with the recipe's augmentation on and off

On a GPU (the default) it runs the real sizes in under 8 minutes on one H100/H200. `--tiny` runs the same code on
the CPU with mvit_tiny and a few steps (a CI test runs it so); there, torchvision and torch.compile are skipped and
noted, since mvit_v1_b only exists at 16×224² and CPU compilation takes minutes.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from jobs.benchmark import gpu_parts

DEFAULT_OUT = Path("runs/gpu-check")


@dataclass(frozen=True)
class Sizes:
    """What each part runs at, and the seconds it may take."""

    device: str
    preset: str
    precision: str  # of parts 2 and 3 (parts 1 and 4 name their own)
    batch: int  # training and inference batch of part 2 (both models)
    max_batch: int  # where the largest-batch search stops
    repeats: int
    warmup: int
    compile: bool
    ceiling_size: int
    demo_videos_per_class: int
    ray_batch: int  # per-worker batch of the Ray Train runs
    ray_num_clips: int
    pipeline_repeat: int
    boxes: dict[str, int]


FULL = Sizes(
    device="cuda",
    preset="mvit_b_16x4",
    precision="bf16",
    batch=16,
    max_batch=256,
    repeats=5,
    warmup=2,
    compile=True,
    ceiling_size=8192,
    demo_videos_per_class=10,
    ray_batch=8,
    ray_num_clips=2,
    pipeline_repeat=16,
    boxes={  # 470 s in all, under the 8 minutes an H100/H200 check may take; BUDGET_S enforces it as well
        "parity": 30,
        "model.train": 30,
        "model.train_compiled": 100,
        "model.infer": 15,
        "model.infer_compiled": 70,
        "model.largest_batch": 30,
        "model.largest_batch_checkpointed": 30,
        "model.host_syncs": 15,
        "sdpa": 10,
        "ray_train.bf16_compile": 60,
        "ray_train.fp16": 30,
        "ray_train.evaluate": 30,
        "data": 20,
    },
)
BUDGET_S = 470
TINY = replace(
    FULL,
    device="cpu",
    preset="mvit_tiny",
    precision="fp32",  # bf16 is emulated on CPUs: parts 1 and 4 still run it
    batch=2,
    max_batch=2,
    repeats=1,
    warmup=0,
    compile=False,
    ceiling_size=256,
    demo_videos_per_class=5,
    ray_batch=8,
    ray_num_clips=1,
    pipeline_repeat=2,
    boxes={name: 4 * seconds for name, seconds in FULL.boxes.items()},  # a shared 2-core CI machine
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tiny", action="store_true", help="CPU, mvit_tiny, a few steps (what CI runs)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for gpu_check.json and the runs")
    parser.add_argument("--video", type=Path, help="a 340×256 Kinetics clip for part 5 (default: ../shared's)")
    parser.add_argument("--demo", type=Path, help="a demo dataset folder for part 4 (default: one made in --out)")
    parser.add_argument("--parts", nargs="+", choices=gpu_parts.PART_NAMES, help="run only these parts")


class PartTimeout(Exception):
    """A part ran past its time box."""


@contextmanager
def time_box(seconds: int) -> Iterator[None]:
    """SIGALRM after `seconds` raises PartTimeout in the main thread, between Python operations."""

    def expire(signum: int, frame: object) -> None:
        raise PartTimeout(f"ran past its {seconds} s time box")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def run_part(name: str, seconds: int, body: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """The part's figures with status ok, or status failed / timed out with a one-line error; never raises."""
    start = time.perf_counter()
    try:
        with time_box(seconds):
            figures = body()
        status, error = "ok", None
        if "skipped" in figures:
            status = "skipped"
    except PartTimeout as timeout:
        figures, status, error = {}, "timed out", str(timeout)
    except Exception as failure:  # recorded, not fatal: the next part still runs
        figures, status, error = (
            {},
            "failed",
            f"{type(failure).__name__}: {(str(failure).splitlines() or [''])[0][:300]}",
        )
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    record = {"status": status, "seconds": round(time.perf_counter() - start, 1), "time_box_s": seconds, **figures}
    if error:
        record["error"] = error
    print(f"gpu-check {name}: {status} in {record['seconds']} s" + (f" ({error})" if error else ""), flush=True)
    return record


def run(args: argparse.Namespace) -> int:
    sizes = TINY if args.tiny else FULL
    if sizes.device == "cuda" and not torch.cuda.is_available():
        print("gpu-check: no CUDA device here; run it on a GPU machine, or with --tiny on the CPU")
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    context = gpu_parts.Context(sizes=sizes, out=args.out.resolve(), video=args.video, demo_folder=args.demo)
    report: dict[str, Any] = {"check": "gpu-check", "tiny": args.tiny, "machine": gpu_parts.machine(sizes), "parts": {}}
    started = time.perf_counter()
    budget = BUDGET_S * (4 if args.tiny else 1)
    for name, body in gpu_parts.parts(context, args.parts):
        left = int(budget - (time.perf_counter() - started))
        if left < 5:
            report["parts"][name] = {"status": "skipped", "seconds": 0.0, "skipped": f"the {budget} s budget is spent"}
            continue
        report["parts"][name] = run_part(name, min(sizes.boxes[name], left), lambda body=body: body())
        context.results[name] = report["parts"][name]
    report["total_seconds"] = round(time.perf_counter() - started, 1)
    report["date"] = datetime.date.today().isoformat()
    path = args.out / "gpu_check.json"
    path.write_text(json.dumps(report, indent=2, default=str))
    print(table(report))
    print(f"gpu-check: {path} ({report['total_seconds']} s; pid {os.getpid()})")
    return 0 if all(part["status"] in ("ok", "skipped") for part in report["parts"].values()) else 1


def table(report: dict[str, Any]) -> str:
    """One line per part: status, seconds, and its headline figures."""
    lines = ["| part | status | s | figures |", "|---|---|---|---|"]
    for name, part in report["parts"].items():
        shown = {k: v for k, v in part.items() if k in gpu_parts.HEADLINES}
        text = ", ".join(f"{k} {gpu_parts.fmt(v)}" for k, v in shown.items()) or part.get("error", "")
        lines.append(f"| {name} | {part['status']} | {part['seconds']} | {text} |")
    return "\n".join(lines)
