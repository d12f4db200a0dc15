"""The parts of `python -m jobs.benchmark gpu-check` (see jobs/benchmark/gpu_check.py): each returns its figures,
or `{"skipped": reason}`, and raises on failure (the runner records it and goes on)."""

from __future__ import annotations

import argparse
import gc
import platform
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch

import mvit
from jobs.benchmark import model as model_bench
from jobs.benchmark.data import DEFAULT_VIDEOS
from jobs.benchmark.torchvision_reference import load_torchvision_mvit_v1_b
from pipeline.precision import autocast

RECIPE_AUGMENT = "rand-m7-n4-mstd0.5-inc1"
SYNC_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy", "cpu")
HEADLINES = (
    "skipped",
    "fp32_vs_torchvision_rel_error",
    "bf16_vs_fp32_rel_error",
    "clips_per_s",
    "mfu_pct",
    "peak_mib",
    "vs_torchvision",
    "largest_batch",
    "syncs_in_steps",
    "syncs_at_flush",
    "chosen",
    "val_top1",
    "top1",
    "gpu_train_clips_per_s",
    "decode_clips_per_s_per_core",
    "cores_needed",
)


@dataclass
class Context:
    """What the parts share: the sizes, the output folder, and what earlier parts made."""

    sizes: Any  # gpu_check.Sizes
    out: Path
    video: Path | None
    demo_folder: Path | None = None
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    checkpoint: str | None = None
    demo: Any = None

    @property
    def device(self) -> torch.device:
        return torch.device(self.sizes.device)


def fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {fmt(v)}" for k, v in value.items()) + "}"
    return str(value)


def machine(sizes: Any) -> dict[str, Any]:
    info = {"torch": torch.__version__, "python": platform.python_version(), "cpu": model_bench._cpu_name()}
    if sizes.device == "cuda" and torch.cuda.is_available():
        info.update(gpu=torch.cuda.get_device_name(0), cuda=torch.version.cuda)
    return info


def _relative(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).norm() / expected.norm())


def parity(ctx: Context) -> dict[str, Any]:
    """fp32 logits against torchvision's mvit_v1_b (same weights; TF32 off, so fp32 means fp32), bf16 against fp32."""
    flags = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        torch.manual_seed(0)
        ours, figures = mvit.create_model(ctx.sizes.preset), {}
        builder = load_torchvision_mvit_v1_b() if ctx.sizes.preset == "mvit_b_16x4" else None
        reference = builder() if builder else None
        if reference is not None:
            mvit.load_weights(ours, reference.state_dict(), "torchvision")
            reference.to(ctx.device).eval()
        else:
            figures["torchvision"] = f"skipped: mvit_v1_b exists only at 16×224² (this run: {ctx.sizes.preset})"
        ours.to(ctx.device).eval()
        clip = torch.randn(2, 3, *ours.input_size, device=ctx.device)
        with torch.inference_mode():
            fp32 = ours(clip).float()
            with autocast("bf16", ctx.device):
                bf16 = ours(clip).float()
            if reference is not None:
                figures["fp32_vs_torchvision_rel_error"] = _relative(fp32, reference(clip).float())
        figures["bf16_vs_fp32_rel_error"] = _relative(bf16, fp32)
        return figures
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags


def _bench_args(ctx: Context, **changes: Any) -> argparse.Namespace:
    settings = {
        "preset": ctx.sizes.preset,
        "input_size": None,
        "batch_size": ctx.sizes.batch,
        "precision": ctx.sizes.precision,
        "mode": "train",
        "compile": False,
        "device": ctx.sizes.device,
        "threads": None,
        "warmup": ctx.sizes.warmup,
        "repeats": ctx.sizes.repeats,
        "no_torchvision": False,
        "pool_memory_format": "contiguous",
        "activation_checkpointing": False,
        "ceiling_size": ctx.sizes.ceiling_size,
    }
    return argparse.Namespace(**{**settings, **changes})


def speed(ctx: Context, mode: str, compiled: bool) -> dict[str, Any]:
    """`jobs.benchmark model` (bf16 on the GPU): ours and torchvision alternating, the same batch and weights."""
    if compiled and not ctx.sizes.compile:
        return {"skipped": "torch.compile is off in --tiny (CPU code generation takes minutes)"}
    report = model_bench._speed(_bench_args(ctx, mode=mode, compile=compiled))
    ours = report["rows"][0]
    return {
        "clips_per_s": ours["clips/s"],
        "tflops": ours["TFLOP/s"],
        "mfu_pct": ours["MFU %"],
        "peak_mib": ours["peak MiB"],
        "vs_torchvision": report["ratio_vs_torchvision"],
        "ceiling_tflops": report["ceiling"]["TFLOP/s"],
        "rows": report["rows"],
        "notes": report["notes"],
    }


def _fits(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: int, precision: str) -> bool:
    """One training step at `batch`; False on CUDA out-of-memory (the memory is released)."""
    device = next(model.parameters()).device
    try:
        clip = torch.randn(batch, 3, *model.input_size, device=device)
        with autocast(precision, device):
            loss = model(clip).float().logsumexp(-1).mean()
        loss.backward()
        optimizer.step()
        return True
    except torch.cuda.OutOfMemoryError:
        return False
    finally:
        optimizer.zero_grad(set_to_none=True)
        clip = loss = None
        gc.collect()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()


def largest_batch(ctx: Context, checkpointing: bool) -> dict[str, Any]:
    """The largest training batch that fits (bf16 on the GPU): doubling, then bisection, up to `max_batch`."""
    model = mvit.create_model(ctx.sizes.preset, activation_checkpointing=checkpointing).to(ctx.device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    fits, low, high = lambda b: _fits(model, optimizer, b, ctx.sizes.precision), 0, None
    batch = 1
    while batch <= ctx.sizes.max_batch:
        if not fits(batch):
            high = batch
            break
        low, batch = batch, batch * 2
    while high is not None and high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return {"largest_batch": low, "capped_at": None if high is not None else ctx.sizes.max_batch}


@dataclass
class _ReadCounter:
    """Counts Python-level reads of tensor values (CPU has no sync debug mode)."""

    reads: list[str] = field(default_factory=list)
    saved: dict[str, Callable] = field(default_factory=dict)

    def __enter__(self) -> _ReadCounter:
        for name in SYNC_READS:
            original = self.saved[name] = getattr(torch.Tensor, name)

            def counting(tensor, *args, _name=name, _original=original, **kwargs):
                self.reads.append(_name)
                return _original(tensor, *args, **kwargs)

            setattr(torch.Tensor, name, counting)
        return self

    def __exit__(self, *exc: object) -> None:
        for name, original in self.saved.items():
            setattr(torch.Tensor, name, original)


def _count_syncs(device: torch.device, body: Callable[[], object]) -> int:
    """Device syncs during `body`: CUDA's sync debug mode warnings, or on the CPU the Python-level value reads."""
    if device.type != "cuda":
        with _ReadCounter() as counter:
            body()
        return len(counter.reads)
    torch.cuda.synchronize(device)
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            body()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return sum("synchroniz" in str(w.message) for w in caught)


def host_syncs(ctx: Context) -> dict[str, Any]:
    """The real training step (bf16 on the GPU; erasing, mixup/cutmix, EMA) for a few steps, then the window flush."""
    from pipeline.config import load_config, typed
    from pipeline.data.augment import RandomErasing
    from pipeline.data.transforms import Normalise
    from pipeline.training.mixup import MixupCutmix
    from pipeline.training.step import TrainStep
    from pipeline.training.window import StepWindow

    device = ctx.device
    train = typed(load_config(overrides=["train.mixup_alpha=0.8", "train.cutmix_alpha=1.0", "train.ema_decay=0.999"]))
    model = mvit.create_model(ctx.sizes.preset).to(device)
    normalise = Normalise([0.45] * 3, [0.225] * 3, device)
    erasing = RandomErasing(0.25, "pixel", 1, np.random.default_rng(0))
    mixup = MixupCutmix.from_config(train.train, model.num_classes, seed=0)
    step = TrainStep.build(model, model, train.train, 1, (normalise, erasing, mixup), ctx.sizes.precision)
    window = StepWindow(device, train.train.max_bad_steps)
    shape = (2, *model.input_size, 3)
    batches = [
        {
            "clip": torch.randint(0, 256, shape, dtype=torch.uint8, device=device),
            "label": torch.arange(2, device=device),
        }
        for _ in range(4)
    ]
    step(batches[0], 0.0)  # first step: optimizer state and lazy initialisation

    def steps() -> None:
        for number, batch in enumerate(batches[1:], start=1):
            loss, applied = step(batch, 0.1)
            window.add(loss, applied, number, 2)

    in_steps = _count_syncs(device, steps)
    at_flush = _count_syncs(device, lambda: window.flush(step.lr))
    method = "torch.cuda.set_sync_debug_mode('warn')" if device.type == "cuda" else "Tensor value reads (CPU)"
    return {"steps": len(batches) - 1, "syncs_in_steps": in_steps, "syncs_at_flush": at_flush, "method": method}


def sdpa(ctx: Context) -> dict[str, Any]:
    report = model_bench._sdpa_report(_bench_args(ctx))
    return {
        "chosen": sorted({row["chosen"] for row in report["rows"]}),
        "blocks": [{"block": row["block"], "chosen": row["chosen"]} for row in report["rows"]],
        "notes": report["notes"],
    }


def _demo(ctx: Context) -> Any:
    from pipeline.data.demo import DemoDataset, make_demo_dataset
    from pipeline.data.manifest import LABEL_MAP_NAME

    if ctx.demo is None and ctx.demo_folder is not None:
        folder = Path(ctx.demo_folder).resolve()
        ctx.demo = DemoDataset(folder, folder / "train.csv", folder / "val.csv", folder / LABEL_MAP_NAME)
    if ctx.demo is None:
        ctx.demo = make_demo_dataset(ctx.out / "demo", seed=0, videos_per_class=ctx.sizes.demo_videos_per_class)
    return ctx.demo


def _indexes(ctx: Context) -> tuple[str, str]:
    """The demo's train and val manifests probed once, so that no run of part 4 probes them again."""
    from pipeline.data import index

    demo, folder = _demo(ctx), ctx.out / "index"
    if not (folder / "val.parquet").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        index.build_index(demo.train_manifest, folder / "train.parquet")
        index.build_index(demo.val_manifest, folder / "val.parquet")
    return str(folder / "train.parquet"), str(folder / "val.parquet")


def _store(ctx: Context) -> list[str]:
    return [f"run.storage_path={ctx.out / 'runs'}", f"mlflow.tracking_uri=sqlite:///{ctx.out / 'mlflow.db'}"]


def _finished(tracking_uri: str, run_id: str) -> dict[str, Any]:
    """The MLflow run's status and the metric keys it holds; raises unless it finished."""
    from mlflow.tracking import MlflowClient

    run = MlflowClient(tracking_uri).get_run(run_id)
    if run.info.status != "FINISHED":
        raise RuntimeError(f"MLflow run {run_id} is {run.info.status}, not FINISHED")
    keys = sorted(run.data.metrics)
    return {"run_id": run_id, "mlflow_status": run.info.status, "gpu_metrics": [k for k in keys if "gpu" in k]}


def ray_train(ctx: Context, precision: str) -> dict[str, Any]:
    """One epoch of the demo on one Ray Train worker on the device, logged to this check's MLflow store."""
    from pipeline.cluster import connect
    from pipeline.config import load_config
    from pipeline.training.driver import run_training

    connect(None, None if ctx.device.type == "cuda" else 4)
    (train, val), gpu = _indexes(ctx), ctx.device.type == "cuda"
    compiled = precision == "bf16" and ctx.sizes.compile
    overrides = [
        f"data.train={train}",
        f"data.val={val}",
        f"data.labels={_demo(ctx).label_map}",
        f"data.root={_demo(ctx).root}",  # the indexes name the demo's videos, which lie under its root
        *_store(ctx),
        f"run.name=gpu-check-{precision}",
        "mlflow.experiment=gpu-check",
        "mlflow.log_models=false",
        f"mlflow.system_metrics={str(gpu).lower()}",  # the GPU's metrics; on the CPU its monitor only adds seconds
        "train.epochs=1",
        f"train.batch_size={ctx.sizes.ray_batch}",
        f"data.num_clips={ctx.sizes.ray_num_clips}",
        "train.log_every_steps=2",
        f"train.precision={precision}",
        f"train.compile={str(compiled).lower()}",
        "scaling.num_workers=1",
        f"scaling.use_gpu={str(gpu).lower()}",
    ]
    start = time.perf_counter()
    outcome = run_training(load_config(overrides=overrides), base=ctx.out)
    ctx.checkpoint = ctx.checkpoint or str(outcome.result.checkpoint.path)
    figures = _finished(outcome.tracking_uri, outcome.run_id)
    return {
        **figures,
        "val_top1": outcome.metrics.get("val/top1"),
        "compile": compiled,
        "run_s": time.perf_counter() - start,
    }


def evaluate(ctx: Context) -> dict[str, Any]:
    """`jobs.evaluate` of the check's first checkpoint on one model replica on the device."""
    from jobs.cli import explicit_keys
    from pipeline.config import load_config, typed
    from pipeline.evaluation.batch import run_evaluation

    if ctx.checkpoint is None:
        raise RuntimeError("no checkpoint: both Ray Train runs failed")
    from pipeline.cluster import connect

    connect(None, None if ctx.device.type == "cuda" else 4)
    overrides = [
        f"model={ctx.checkpoint}",
        f"data.test={_indexes(ctx)[1]}",
        f"data.root={_demo(ctx).root}",
        f"data.test_clips={ctx.sizes.ray_num_clips}",
        f"evaluate.use_gpu={str(ctx.device.type == 'cuda').lower()}",
        "evaluate.replicas=1",
        "mlflow.experiment=gpu-check",
        *_store(ctx),
    ]
    cfg = load_config(overrides=overrides, evaluation=True)
    report = run_evaluation(typed(cfg), explicit_keys(overrides), ctx.out)
    return {
        **_finished(cfg.mlflow.tracking_uri, report.run_id),
        "top1": report.result.top1,
        "videos": report.result.videos,
    }


def _video(ctx: Context) -> Path:
    """The Kinetics clip of ../shared, else a synthetic 340×256 H.264 video of moving noise (10 s, 30 fps)."""
    import av

    for candidate in (ctx.video, DEFAULT_VIDEOS / "k400_demo_340x256.mp4"):
        if candidate is not None and Path(candidate).is_file():
            return Path(candidate)
    path, rng = ctx.out / "synthetic_340x256.mp4", np.random.default_rng(0)
    texture = rng.integers(0, 256, (256, 680, 3), dtype=np.uint8)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = 340, 256, "yuv420p"
        stream.codec_context.time_base = Fraction(1, 30)
        for index in range(300):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(texture[:, index : index + 340]), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


def _decode_rate(video: Path, repeat: int, cpus: int, augments: tuple) -> float:
    """Training clips/s per decode core of the Ray Data path (16×4 clips, inception crop 224², flip, `augments`)."""
    import pyarrow as pa

    from pipeline.data.dataset import DecodeTasks, train_dataset
    from pipeline.data.index import info_to_row
    from pipeline.data.sampling import ClipSpec
    from pipeline.data.transforms import TrainTransform
    from pipeline.data.video import probe

    index = pa.Table.from_pylist([{"path": str(video), "label": 0, **info_to_row(probe(video))}] * repeat)
    transform = TrainTransform(224, (256, 320), True, (0.08, 1.0), (0.75, 1.3333), True, augments)
    # a fresh counter name per dataset: the counter of the previous one may still be shutting down under that name
    tasks = DecodeTasks(
        cpus=1.0, concurrency=cpus, resources={}, videos_per_task=1, skip_counter=f"gpu-check-{uuid.uuid4().hex[:8]}"
    )
    spec = ClipSpec(16, 4, 30.0)
    dataset = train_dataset(index, spec=spec, transform=transform, num_clips=2, tasks=tasks, seed=0, epoch=0)
    start, clips = time.perf_counter(), 0
    for batch in dataset.iter_batches(batch_size=8, batch_format="numpy"):
        clips += len(batch["label"])
    return clips / (time.perf_counter() - start) / cpus


def data_vs_model(ctx: Context) -> dict[str, Any]:
    """Decode cores one device needs: its training clips/s (part 2) over the pipeline's clips/s per core, with the
    recipe's augmentation on the decode CPUs and without; and random erasing's cost per batch on the device."""
    import ray

    from pipeline.cluster import connect
    from pipeline.data.augment import RandomErasing, clip_augments

    connect(None, None if ctx.device.type == "cuda" else 4)
    video, cpus = _video(ctx), max(1, min(8, int(ray.available_resources().get("CPU", 1))))
    settings = {"recipe_augment": clip_augments(RECIPE_AUGMENT, "bicubic", 0.0), "no_augment": ()}
    _decode_rate(video, 1, cpus, ())  # untimed: starts Ray's decode workers
    rates: dict[str, list[float]] = {name: [] for name in settings}
    for _ in range(2):  # alternating, so that machine noise falls on both alike
        for name, augments in settings.items():
            rates[name].append(_decode_rate(video, ctx.sizes.pipeline_repeat, cpus, augments))
    per_core = {name: sum(values) / len(values) for name, values in rates.items()}
    trained = next(
        (ctx.results[name]["clips_per_s"] for name in ("model.train_compiled", "model.train")
         if ctx.results.get(name, {}).get("clips_per_s")),
        None,
    )  # fmt: skip
    clips = torch.randn(ctx.sizes.batch, 3, 16, 224, 224, device=ctx.device)
    erasing = RandomErasing(0.25, "pixel", 1, np.random.default_rng(0))
    erase_s = model_bench._timed(lambda: [erasing(clips) for _ in range(10)], ctx.device) / 10
    return {
        "video": str(video),
        "decode_cpus": cpus,
        "decode_clips_per_s_per_core": per_core,
        "gpu_train_clips_per_s": trained,
        "cores_needed": {k: trained / v for k, v in per_core.items()} if trained else None,
        "erase_ms_per_batch_on_device": 1000 * erase_s,
    }


PART_NAMES = (
    "parity",
    "model.train",
    "model.train_compiled",
    "model.infer",
    "model.infer_compiled",
    "model.largest_batch",
    "model.largest_batch_checkpointed",
    "model.host_syncs",
    "sdpa",
    "ray_train.bf16_compile",
    "ray_train.fp16",
    "ray_train.evaluate",
    "data",
)


def parts(ctx: Context, only: list[str] | None) -> Iterator[tuple[str, Callable[[], dict[str, Any]]]]:
    bodies: dict[str, Callable[[], dict[str, Any]]] = {
        "parity": lambda: parity(ctx),
        "model.train": lambda: speed(ctx, "train", False),
        "model.train_compiled": lambda: speed(ctx, "train", True),
        "model.infer": lambda: speed(ctx, "infer", False),
        "model.infer_compiled": lambda: speed(ctx, "infer", True),
        "model.largest_batch": lambda: largest_batch(ctx, False),
        "model.largest_batch_checkpointed": lambda: largest_batch(ctx, True),
        "model.host_syncs": lambda: host_syncs(ctx),
        "sdpa": lambda: sdpa(ctx),
        "ray_train.bf16_compile": lambda: ray_train(ctx, "bf16"),
        "ray_train.fp16": lambda: ray_train(ctx, "fp16"),
        "ray_train.evaluate": lambda: evaluate(ctx),
        "data": lambda: data_vs_model(ctx),
    }
    for name in PART_NAMES:
        if only is None or name in only:
            yield name, bodies[name]
