"""`python -m jobs.benchmark model`: model sizes, and forward / training-step speed.

Three reports:
  --counts               parameters and GMACs of every preset beside the published figures
  --cpu-vs-torchvision   CPU inference time of mvit_b_16x4 and torchvision's mvit_v1_b, same weights and input
  (default)              time one preset: --preset, --precision, --batch-size, --mode, --compile, --device

Each prints a table; ``--json FILE`` also writes the figures as JSON (``--json -`` prints JSON instead of the table).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
import torch.nn.functional as F

import mvit

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    report = parser.add_mutually_exclusive_group()
    report.add_argument("--counts", action="store_true", help="params and GMACs of every preset vs published figures")
    report.add_argument(
        "--cpu-vs-torchvision", action="store_true", help="CPU forward time of mvit_b_16x4 vs torchvision mvit_v1_b"
    )
    parser.add_argument("--preset", default="mvit_b_16x4", choices=mvit.list_models())
    parser.add_argument("--input-size", type=int, nargs=3, metavar=("T", "H", "W"), help="default: the preset's")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--precision", choices=tuple(PRECISIONS), default="fp32")
    parser.add_argument("--mode", choices=("infer", "train"), default="infer", help="forward, or forward+backward")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model first")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads for CPU runs (default: torch's)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls before timing")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls; the median is reported")
    parser.add_argument("--json", metavar="FILE", help="write JSON to FILE, or '-' to print JSON instead of the table")


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.counts:
        report = _counts()
    elif args.cpu_vs_torchvision:
        report = _cpu_vs_torchvision(args)
        if report is None:
            return 2
    else:
        report = _speed(args)
    report = {"benchmark": f"model {report.pop('kind')}", "machine": _machine(args), **report}
    if args.json and args.json != "-":
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=2)
    if args.json == "-":
        print(json.dumps(report, indent=2))
    else:
        print(_table(report["rows"]))
        for note in report.get("notes", []):
            print(note)
    return 0


def _machine(args: argparse.Namespace) -> dict[str, Any]:
    machine = {
        "date": datetime.date.today().isoformat(),
        "cpu": _cpu_name(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    if str(args.device).startswith("cuda") and torch.cuda.is_available():
        machine["gpu"] = torch.cuda.get_device_name(torch.device(args.device))
    return machine


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _table(rows: list[dict[str, Any]]) -> str:
    headers = list(rows[0])
    cells = [[_format(row[h]) for h in headers] for row in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    lines = [" | ".join(h.ljust(w) for h, w in zip(headers, widths)), "-|-".join("-" * w for w in widths)]
    lines += [" | ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def _format(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:,.3f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _percent(measured: float, reference: float | None) -> float | None:
    return None if reference is None else 100.0 * (measured - reference) / reference


def _counts() -> dict[str, Any]:
    rows = []
    for name in mvit.list_models():
        preset = mvit.get_preset(name)
        with torch.device("meta"):
            model = mvit.create_model(name)
        params = mvit.count_parameters(model)
        gmacs = mvit.count_gmacs(model, (1, model.config.in_channels, *model.input_size))
        rows.append(
            {
                "preset": name,
                "input T×H×W": "×".join(map(str, model.input_size)),
                "classes": model.num_classes,
                "params": params,
                "ref params": preset.reference_params,
                "params Δ%": _percent(params, preset.reference_params),
                "GMACs": gmacs,
                "ref GMACs": preset.reference_gmacs,
                "GMACs Δ%": _percent(gmacs, preset.reference_gmacs),
                "reference": preset.reference,
            }
        )
    return {"kind": "counts", "rows": rows, "notes": ["GMACs: one clip at batch 1, FlopCounterMode FLOPs / 2."]}


def _timed(fn: Callable[[], object], warmup: int, repeats: int, device: torch.device) -> list[float]:
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        fn()
    sync()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        seconds.append(time.perf_counter() - start)
    return seconds


def _speed(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    overrides = {"input_size": tuple(args.input_size)} if args.input_size else {}
    model = mvit.create_model(args.preset, **overrides).to(device)
    model.train(args.mode == "train")
    clip = torch.randn(args.batch_size, model.config.in_channels, *model.input_size, device=device)
    labels = torch.randint(model.num_classes, (args.batch_size,), device=device)
    forward = torch.compile(model) if args.compile else model
    dtype = PRECISIONS[args.precision]

    def autocast() -> AbstractContextManager:
        return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()

    def step() -> None:
        if args.mode == "train":
            with autocast():
                loss = F.cross_entropy(forward(clip), labels)
            loss.backward()
            model.zero_grad(set_to_none=True)
        else:
            with torch.no_grad(), autocast():
                forward(clip)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = _timed(step, args.warmup, args.repeats, device)
    median = statistics.median(seconds)
    row = {
        "preset": args.preset,
        "input T×H×W": "×".join(map(str, model.input_size)),
        "batch": args.batch_size,
        "mode": args.mode,
        "precision": args.precision,
        "compile": args.compile,
        "device": str(device),
        "median ms": 1000 * median,
        "clips/s": args.batch_size / median,
        "peak GiB": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    }
    return {"kind": "speed", "rows": [row], "seconds": seconds}


def _cpu_vs_torchvision(args: argparse.Namespace) -> dict[str, Any] | None:
    try:
        from tests.torchvision_reference import load_torchvision_mvit_v1_b
    except ImportError:
        load_torchvision_mvit_v1_b = None  # the helper lives in the repository's tests/
    builder = load_torchvision_mvit_v1_b() if load_torchvision_mvit_v1_b else None
    if builder is None:
        print("--cpu-vs-torchvision needs torchvision and the repository's tests/ folder", file=sys.stderr)
        return None
    torch.manual_seed(0)
    reference = builder().eval()
    ours = mvit.load_weights(mvit.create_model("mvit_b_16x4"), reference.state_dict(), "torchvision").eval()
    clip = torch.randn(args.batch_size, 3, 16, 224, 224)
    cpu = torch.device("cpu")
    with torch.no_grad():
        for _ in range(args.warmup):
            reference(clip), ours(clip)
        times: dict[str, list[float]] = {"torchvision": [], "mvit": []}
        for _ in range(args.repeats):  # alternate the two so that machine noise hits both alike
            times["torchvision"] += _timed(lambda: reference(clip), 0, 1, cpu)
            times["mvit"] += _timed(lambda: ours(clip), 0, 1, cpu)
        expected, actual = reference(clip), ours(clip)
    relative_error = float((expected - actual).norm() / expected.norm())
    medians = {name: statistics.median(seconds) for name, seconds in times.items()}
    rows = [
        {
            "model": name,
            "batch": args.batch_size,
            "threads": torch.get_num_threads(),
            "median ms": 1000 * medians[name],
            "vs torchvision": medians[name] / medians["torchvision"],
        }
        for name in ("torchvision", "mvit")
    ]
    notes = [
        f"mvit / torchvision time ratio {medians['mvit'] / medians['torchvision']:.3f} "
        f"(median of {args.repeats} after {args.warmup} warm-up, fp32, no_grad); logits rel. error {relative_error:.2e}"
    ]
    return {"kind": "cpu-vs-torchvision", "rows": rows, "seconds": times, "notes": notes}
