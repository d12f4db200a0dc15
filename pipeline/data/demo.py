"""A small, learnable demo dataset whose classes are motions, so a correct model must use time.

Each video shows one bright, lopsided blob over a dark background with per-frame noise. The class is how the blob
moves: left, right, up, down, up-right, down-left, growing or shrinking. Shape, colours, size, start position,
orientation and speed are random, drawn alike for every class, so a single frame says next to nothing about the
class; each class has its reverse (right/left, up-right/down-left, growing/shrinking), so the order of the frames
matters too. The blob is bright on dark because a small model learns motion from a few hundred steps only when the
moving edge is the strongest signal in the clip (with mid-grey colours of either brightness, mvit_tiny and a small
3D CNN stayed at chance for 300 steps). Version 2 had clockwise and counter-clockwise rotation instead of the two
diagonals: in 10 five-seed runs every miss of a best epoch was that pair, whose direction only a small feature
showed at 64² (BENCHMARKS.md, issue 12). Videos are H.264 mp4 files; output is bit-identical for a seed on a given
machine (single-threaded x264 without SIMD, per-video seeded RNGs). `DEMO_VERSION`, written to `demo.json` with the
settings, tells a folder made by another version apart.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pyarrow as pa

from pipeline.data.manifest import LABEL_MAP_NAME, write_label_map, write_manifest
from pipeline.errors import ConfigError

MOTIONS = (
    "moving left",
    "moving right",
    "moving up",
    "moving down",
    "moving up-right",
    "moving down-left",
    "growing",
    "shrinking",
)
# The direction of each move in image axes (x right, y down).
DIRECTIONS = {
    "moving left": (-1, 0),
    "moving right": (1, 0),
    "moving up": (0, -1),
    "moving down": (0, 1),
    "moving up-right": (1, -1),
    "moving down-left": (-1, 1),
}
REACH = 1.5  # the blob's outline is at most this many radii from its centre
DEMO_VERSION = 3  # 2: a satellite disc, and rotations instead of the diagonals; 3: the diagonals
SETTINGS_FILE = "demo.json"
# One thread and no assembly: with its SIMD routines on, this x264 build gave 2 to 4 different bitstreams for the
# same frames over 10 encodes (80×80; 32- and 64-pixel-wide frames happened to be stable). Plain C costs ~30 s here.
X264_OPTIONS = {"preset": "veryfast", "crf": "20", "x264-params": "threads=1:lookahead-threads=1:asm=0"}


@dataclass(frozen=True)
class DemoDataset:
    """Where a demo dataset was written. Manifest paths are relative to `root`, the manifests' folder."""

    root: Path
    train_manifest: Path
    val_manifest: Path
    label_map: Path


@dataclass(frozen=True)
class DemoSettings:
    """What a demo folder was made with (its `demo.json`): a folder of other settings is made again, not reused."""

    version: int
    seed: int
    num_classes: int
    videos_per_class: int
    size: int
    num_frames: int
    fps: int
    val_fraction: float


def demo_settings(folder: str | os.PathLike) -> DemoSettings | None:
    """The settings a demo folder was made with; None when it has no readable `demo.json` (an older version)."""
    try:
        return DemoSettings(**json.loads((Path(folder) / SETTINGS_FILE).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def make_demo_dataset(
    out_dir: str | os.PathLike,
    *,
    seed: int = 0,
    num_classes: int = 8,
    videos_per_class: int = 40,
    size: int = 80,
    num_frames: int = 40,
    fps: int = 30,
    val_fraction: float = 0.2,
) -> DemoDataset:
    """Write videos/, train.csv, val.csv and labels.txt under out_dir; the last val_fraction of each class is val."""
    if not 1 <= num_classes <= len(MOTIONS):
        raise ConfigError(f"num_classes must be 1..{len(MOTIONS)}, got {num_classes}")
    if size < 32 or size % 2 or num_frames < 2:
        raise ConfigError("size must be even and at least 32, and num_frames at least 2")
    root = Path(out_dir)
    val_per_class = round(videos_per_class * val_fraction)
    splits: dict[str, list[tuple[str, int]]] = {"train": [], "val": []}
    for label, motion in enumerate(MOTIONS[:num_classes]):
        for number in range(videos_per_class):
            # version and seed in the path: manifests of other videos differ, so no index cached for them is reused
            relative = f"videos/v{DEMO_VERSION}-seed{seed}/{motion.replace(' ', '_')}/{number:04d}.mp4"
            rng = np.random.default_rng([seed, label, number])
            _encode(root / relative, _render(motion, rng, size, num_frames), fps)
            splits["val" if number >= videos_per_class - val_per_class else "train"].append((relative, label))
    manifests = {}
    for split, rows in splits.items():
        manifests[split] = root / f"{split}.csv"
        labels = pa.array([label for _, label in rows], pa.int64())
        table = pa.table({"path": [path for path, _ in rows], "label": labels})
        write_manifest(table, manifests[split])
    write_label_map(list(MOTIONS[:num_classes]), root / LABEL_MAP_NAME)
    settings = DemoSettings(DEMO_VERSION, seed, num_classes, videos_per_class, size, num_frames, fps, val_fraction)
    (root / SETTINGS_FILE).write_text(json.dumps(asdict(settings)) + "\n")  # last: a cut-off run leaves none
    return DemoDataset(root, manifests["train"], manifests["val"], root / LABEL_MAP_NAME)


@dataclass(frozen=True)
class MotionPath:
    """Where the blob is in each frame: centre (T, 2) as (x, y) pixels, radius (T,), and its orientation in
    radians (fixed: no class turns)."""

    centre: np.ndarray
    radius: np.ndarray
    angle: float


def motion_path(motion: str, rng: np.random.Generator, size: int, num_frames: int) -> MotionPath:
    """A random path of the given motion that keeps the whole blob in frame.

    Every class draws its position, radius (0.08 to 0.14 of the frame, 0.05 to 0.17 while it grows or shrinks) and
    orientation from the same ranges, so one frame says next to nothing about the class; only the change between
    frames does. A move covers 75-100% of the free span along each axis it moves on.
    """
    if motion not in DIRECTIONS and motion not in ("growing", "shrinking"):
        raise ValueError(f"unknown motion {motion!r}")
    progress = np.linspace(0.0, 1.0, num_frames)
    radius = np.full(num_frames, rng.uniform(0.08, 0.14) * size)
    if motion in ("growing", "shrinking"):
        small, large = rng.uniform(0.05, 0.07) * size, rng.uniform(0.15, 0.17) * size
        radius = small + (large - small) * (progress if motion == "growing" else 1 - progress)
    margin = REACH * radius.max() + 1
    centre = np.tile(rng.uniform(margin, size - margin, 2), (num_frames, 1))
    angle = rng.uniform(0, 2 * np.pi)
    if motion in DIRECTIONS:
        travel = rng.uniform(0.75, 1.0) * (size - 2 * margin)  # the same on both axes: a diagonal is at 45°
        for axis, sign in enumerate(DIRECTIONS[motion]):
            if sign:
                start = rng.uniform(margin, size - margin - travel)
                centre[:, axis] = start + travel * (progress if sign > 0 else 1 - progress)
    return MotionPath(centre, radius, angle)


def _render(motion: str, rng: np.random.Generator, size: int, num_frames: int) -> np.ndarray:
    """(T, size, size, 3) uint8 frames of one irregular blob following a random path of `motion`."""
    background = rng.uniform(0, 60, 3).astype(np.float32)  # dark, flat
    colour = rng.uniform(170, 255, 3).astype(np.float32)  # bright
    harmonics = [(k, rng.uniform(0.1, (REACH - 1) / 3), rng.uniform(0, 2 * np.pi)) for k in (1, 2, 3)]
    path = motion_path(motion, rng, size, num_frames)
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    dx = xs - path.centre[:, 0, None, None].astype(np.float32)  # (T, size, size)
    dy = ys - path.centre[:, 1, None, None].astype(np.float32)
    theta = np.arctan2(dy, dx) - np.float32(path.angle)
    outline = 1 + sum(amplitude * np.cos(k * theta + phase) for k, amplitude, phase in harmonics)
    radius = path.radius[:, None, None].astype(np.float32)
    alpha = np.clip(radius * outline - np.hypot(dx, dy) + 0.5, 0, 1)[..., None]
    noise = rng.standard_normal((num_frames, size, size, 3), dtype=np.float32) * 6
    frames = background * (1 - alpha) + colour * alpha + noise
    return np.clip(frames, 0, 255).astype(np.uint8)


def _encode(path: Path, frames: np.ndarray, fps: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps, options=dict(X264_OPTIONS))
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.codec_context.time_base = Fraction(1, fps)
        for number, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts = number
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
