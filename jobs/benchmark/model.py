"""`python -m jobs.benchmark model`: model sizes, attention kernels, and training-step / inference speed.

Three reports:
  --counts        parameters and GMACs of every preset beside the published figures
  --sdpa-report   per block of --preset: the attention kernel PyTorch picks, and which of flash / memory-efficient /
                  cuDNN / math can run that block (with its relative-position mask for MViTv2), for --precision,
                  --batch-size, --device (and backward in train mode)
  (default)       speed of --preset: a training step (--mode train: forward under autocast, cross-entropy, backward,
                  AdamW step, zero_grad) or a forward (--mode infer), with clips/s, step time, peak memory, TFLOP/s
                  and MFU against a matmul ceiling measured in the same run. torchvision's mvit_v1_b, given the same
                  weights and input, is timed in the same run when it can be (mvit_b_16x4 at 16×224²).

Each prints a table; ``--json FILE`` also writes the figures as JSON (``--json -`` prints JSON instead of the table).
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import platform
import resource
import statistics
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import mvit
from jobs.benchmark.torchvision_reference import load_torchvision_mvit_v1_b
from mvit.pooling import POOL_MEMORY_FORMATS
from pipeline.precision import AUTOCAST_DTYPES, autocast, compute_dtype

TORCHVISION_INPUT = (16, 224, 224)  # mvit_v1_b's positional embeddings are fixed to this clip size


def add_arguments(parser: argparse.ArgumentParser) -> None:
    report = parser.add_mutually_exclusive_group()
    report.add_argument("--counts", action="store_true", help="params and GMACs of every preset vs published figures")
    report.add_argument("--sdpa-report", action="store_true", help="attention backend of every block of --preset")
    parser.add_argument("--preset", default="mvit_b_16x4", choices=mvit.list_models())
    parser.add_argument("--input-size", type=int, nargs=3, metavar=("T", "H", "W"), help="default: the preset's")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument(
        "--precision", choices=tuple(AUTOCAST_DTYPES), default="fp32", help="autocast dtype (fp32: none)"
    )
    parser.add_argument("--mode", choices=("infer", "train"), default="infer", help="forward, or a training step")
    parser.add_argument("--compile", action="store_true", help="torch.compile both models first")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads for CPU runs (default: torch's)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps after the first (memory) step")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per model, alternating; median reported")
    parser.add_argument("--no-torchvision", action="store_true", help="time only this project's model")
    parser.add_argument("--pool-memory-format", choices=tuple(POOL_MEMORY_FORMATS), default="contiguous")
    parser.add_argument("--activation-checkpointing", action="store_true", help="recompute blocks in backward")
    parser.add_argument("--ceiling-size", type=int, help="n of the n×n matmul ceiling (default: 8192 CUDA, 2048 CPU)")
    parser.add_argument("--json", metavar="FILE", help="write JSON to FILE, or '-' to print JSON instead of the table")


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.counts:
        report = _counts()
    elif args.sdpa_report:
        report = _sdpa_report(args)
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


def _our_model(args: argparse.Namespace) -> mvit.MViT:
    overrides: dict[str, object] = {
        "pool_memory_format": args.pool_memory_format,
        "activation_checkpointing": args.activation_checkpointing,
    }
    if args.input_size:
        overrides["input_size"] = tuple(args.input_size)
    return mvit.create_model(args.preset, **overrides)


def _sdpa_report(args: argparse.Namespace) -> dict[str, Any]:
    model = _our_model(args)
    dtype, device = compute_dtype(args.precision), torch.device(args.device)
    shape = (args.batch_size, model.config.in_channels, *model.input_size)
    blocks = mvit.sdpa_backends(model, shape, dtype, device, backward=args.mode == "train")
    short = {"FLASH_ATTENTION": "flash", "EFFICIENT_ATTENTION": "mem-efficient", "CUDNN_ATTENTION": "cudnn"}
    rows = [
        {
            "block": b.block,
            "heads": b.shape.heads,
            "q len": b.shape.q_length,
            "kv len": b.shape.kv_length,
            "head dim": b.shape.head_dim,
            "mask": b.shape.mask,
            "chosen": short.get(b.chosen, b.chosen.lower()),
            **{short.get(name, name.lower()): usable for name, usable in b.usable.items()},
        }
        for b in blocks
    ]
    reasons = sorted(
        {f"{short.get(name, name.lower())}: {why}" for b in blocks for name, why in b.reasons.items() if why != "runs"}
    )
    notes = [
        f"{args.preset}, batch {args.batch_size}, {args.precision} q/k/v on {device}"
        + (", forward + backward" if args.mode == "train" else ", forward"),
        "chosen: what scaled_dot_product_attention picks with every backend allowed; the others: whether that backend "
        "alone runs the block.",
        "mask: the block passes its MViTv2 relative-position bias as an additive float mask (in training it needs the "
        "mask's gradient too).",
        *(f"not usable: {reason}" for reason in reasons),
    ]
    if device.type != "cuda":
        notes.append("CUDA backends: not measured (this run has no GPU); run with --device cuda on a GPU machine.")
    detail = [{"block": b.block, "chosen": b.chosen, "usable": b.usable, "reasons": b.reasons} for b in blocks]
    return {"kind": "sdpa-report", "rows": rows, "blocks": detail, "notes": notes}


@dataclass
class Contender:
    """One model under test and what was measured for it."""

    name: str
    module: nn.Module
    step: Callable[[], object] | None = None
    step_flops: float = 0.0
    peak_bytes: int | None = None
    first_output: torch.Tensor | None = None  # logits of the first step, in infer mode
    seconds: list[float] = field(default_factory=list)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    """Wall seconds of one call, with the device queue drained before and after."""
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def _matmul_ceiling(device: torch.device, dtype: torch.dtype, size: int, repeats: int = 5) -> float:
    """TFLOP/s of the best of ``repeats`` n×n matmuls in ``dtype``: the attainable peak MFU is measured against."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    _timed(lambda: torch.mm(a, b), device)
    best = min(_timed(lambda: torch.mm(a, b), device) for _ in range(repeats))
    return 2 * size**3 / best / 1e12


class MemoryMeter:
    """Peak memory of one model: weights, gradients, optimizer state and activations (the shared input excluded).

    CUDA: ``max_memory_allocated`` over the model's first step, less what was allocated before the model was moved
    to the GPU. CPU: the process's peak RSS rise during the first step (Linux resets the high-water mark through
    /proc/self/clear_refs; elsewhere ``ru_maxrss``, which cannot be reset), plus the model's parameter and buffer
    bytes, which are resident before the step starts. Freed heap is handed back (malloc_trim) before each model, but
    memory the allocator still keeps is reused without raising RSS, so the CPU figure can read low.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.base = 0

    @property
    def label(self) -> str:
        if self.device.type == "cuda":
            return "CUDA max_memory_allocated over the first step, less memory allocated before the model"
        return "CPU: process peak RSS rise over the first step + parameter and buffer bytes"

    def start(self) -> None:
        """Call before the model goes to the device."""
        if self.device.type == "cuda":
            _sync(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            _release_free_heap()
            self.base = _host_rss_reset()

    def peak(self, module: nn.Module) -> int:
        """Call after the first step."""
        if self.device.type == "cuda":
            _sync(self.device)
            return torch.cuda.max_memory_allocated(self.device) - self.base
        resident = sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))
        return max(_host_peak() - self.base, 0) + resident


def _release_free_heap() -> None:
    """glibc's malloc_trim: give freed heap pages back, so that the next phase's RSS rise is its own."""
    with suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _proc_status_bytes(key: str) -> int | None:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _host_rss_reset() -> int:
    """Reset the RSS high-water mark where Linux allows it; the value to subtract from :func:`_host_peak`."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        rss = _proc_status_bytes("VmRSS")
        if rss is not None:
            return rss
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _host_peak() -> int:
    hwm = _proc_status_bytes("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _torchvision_builder(args: argparse.Namespace, input_size: tuple[int, ...]) -> tuple[Callable | None, str | None]:
    """torchvision's mvit_v1_b builder when it can run this comparison, else None and the reason."""
    if args.no_torchvision:
        return None, "torchvision: skipped (--no-torchvision)"
    if args.preset != "mvit_b_16x4" or input_size != TORCHVISION_INPUT:
        return None, (
            f"torchvision: skipped; mvit_v1_b is the same network as mvit_b_16x4 only at 16×224² (its positional "
            f"embeddings are fixed), and this run is {args.preset} at {'×'.join(map(str, input_size))}"
        )
    builder = load_torchvision_mvit_v1_b()
    if builder is None:
        return None, "torchvision: skipped; torchvision is not importable"
    return builder, None


def _contenders(args: argparse.Namespace) -> tuple[list[Contender], list[str]]:
    """This project's model, and torchvision's mvit_v1_b with the same weights when it applies (built on the CPU)."""
    torch.manual_seed(0)
    ours = _our_model(args)
    builder, skipped = _torchvision_builder(args, ours.input_size)
    if builder is None:
        return [Contender("mvit", ours)], [skipped] if skipped else []
    reference = builder()
    mvit.load_weights(ours, reference.state_dict(), "torchvision")
    return [Contender("mvit", ours), Contender("torchvision", reference)], []


def _make_step(
    module: nn.Module, args: argparse.Namespace, clip: torch.Tensor, labels: torch.Tensor
) -> Callable[[], object]:
    """The timed unit: a whole training step, or one forward under inference_mode."""
    device, precision = clip.device, args.precision
    forward = torch.compile(module) if args.compile else module

    if args.mode == "infer":
        module.eval()

        def infer() -> torch.Tensor:
            with torch.inference_mode(), autocast(precision, device):
                return forward(clip)

        return infer

    module.train()
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4, fused=device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    def train() -> None:
        with autocast(precision, device):
            loss = F.cross_entropy(forward(clip), labels)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    return train


def _speed(args: argparse.Namespace) -> dict[str, Any]:
    device, dtype = torch.device(args.device), compute_dtype(args.precision)
    ceiling_size = args.ceiling_size or (8192 if device.type == "cuda" else 2048)
    ceiling = _matmul_ceiling(device, dtype, ceiling_size)
    contenders, notes = _contenders(args)
    ours = contenders[0].module
    shape = (args.batch_size, ours.config.in_channels, *ours.input_size)
    clip = torch.randn(shape, device=device)
    labels = torch.randint(ours.num_classes, (args.batch_size,), device=device)
    meter = MemoryMeter(device)
    per_forward = 3 if args.mode == "train" else 1
    for contender in contenders:
        contender.step_flops = per_forward * 2e9 * mvit.count_gmacs(contender.module, shape)
        meter.start()
        contender.module.to(device)
        step = contender.step = _make_step(contender.module, args, clip, labels)
        contender.first_output = step()  # compiles, creates the optimizer state, and sets the memory peak
        contender.peak_bytes = meter.peak(contender.module)
        for _ in range(args.warmup):
            step()
    for _ in range(args.repeats):  # alternate, so that machine noise falls on both alike
        for contender in contenders:
            contender.seconds.append(_timed(contender.step, device))
    return _speed_report(args, contenders, ceiling, ceiling_size, meter.label, notes)


def _speed_report(
    args: argparse.Namespace,
    contenders: list[Contender],
    ceiling: float,
    ceiling_size: int,
    memory_label: str,
    notes: list[str],
) -> dict[str, Any]:
    ours_module = contenders[0].module
    clips_per_s = {c.name: args.batch_size / statistics.median(c.seconds) for c in contenders}
    reference = clips_per_s.get("torchvision")
    rows = []
    for c in contenders:
        median = statistics.median(c.seconds)
        achieved = c.step_flops / median / 1e12
        rows.append(
            {
                "model": c.name,
                "preset": args.preset if c.name == "mvit" else "mvit_v1_b",
                "input": "×".join(map(str, ours_module.input_size)),
                "batch": args.batch_size,
                "mode": args.mode,
                "precision": args.precision,
                "compile": args.compile,
                "device": args.device,
                "median ms": 1000 * median,
                "clips/s": clips_per_s[c.name],
                "peak MiB": c.peak_bytes / 2**20 if c.peak_bytes is not None else None,
                "GFLOP/step": c.step_flops / 1e9,
                "TFLOP/s": achieved,
                "MFU %": 100 * achieved / ceiling,
                "vs torchvision": clips_per_s[c.name] / reference if reference else None,
            }
        )
    ratio = clips_per_s["mvit"] / reference if reference else None
    logits_error = _logits_error(contenders) if args.mode == "infer" and reference else None
    notes = [*notes, *_speed_notes(args, ceiling, ceiling_size, memory_label, rows)]
    if ratio is not None:
        notes.append(f"mvit / torchvision clips/s: {ratio:.3f}")
    if logits_error is not None:
        notes.append(f"logits relative error mvit vs torchvision (same weights and input): {logits_error:.2e}")
    return {
        "kind": f"speed {args.mode}",
        "rows": rows,
        "ceiling": {"TFLOP/s": ceiling, "size": ceiling_size, "precision": args.precision, "device": args.device},
        "memory_measure": memory_label,
        "ratio_vs_torchvision": ratio,
        "logits_relative_error": logits_error,
        "seconds": {c.name: c.seconds for c in contenders},
        "notes": notes,
    }


def _speed_notes(
    args: argparse.Namespace, ceiling: float, ceiling_size: int, memory_label: str, rows: list[dict[str, Any]]
) -> list[str]:
    """How the speed figures were measured, and what to make of them."""
    notes = [
        f"matmul ceiling: {ceiling:.3f} TFLOP/s ({ceiling_size}² {args.precision} on {args.device}, best of 5)",
        "FLOPs: FlopCounterMode forward FLOPs at this batch"
        + ("; a training step counts 3× the forward (recomputation is not counted)" if args.mode == "train" else ""),
        f"peak memory: {memory_label}",
        f"timing: median of {args.repeats} steps after 1 + {args.warmup} untimed, the models alternating",
    ]
    if args.compile:
        notes.append("--compile: both models were torch.compile'd (the first untimed step compiles)")
    if args.activation_checkpointing or args.pool_memory_format != "contiguous":
        notes.append(
            f"mvit options: pool_memory_format={args.pool_memory_format}, "
            f"activation_checkpointing={args.activation_checkpointing} (torchvision has neither)"
        )
    if any(row["MFU %"] > 100 for row in rows):
        notes.append(
            "MFU above 100%: the plain matmul is slower than the model's own kernels in this dtype on this device "
            "(e.g. bf16 on a CPU without native bf16), so it is no ceiling and MFU means nothing here"
        )
    return notes


def _logits_error(contenders: list[Contender]) -> float:
    """‖torchvision − mvit‖ / ‖torchvision‖ of the first inference step's logits: same weights, same input."""
    outputs = {c.name: c.first_output.float() for c in contenders if c.first_output is not None}
    expected, actual = outputs["torchvision"], outputs["mvit"]
    return float((expected - actual).norm() / expected.norm())
