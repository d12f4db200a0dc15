"""Small clip settings that the dataset, training and evaluation tests share: 8×4 clips, 32² crops, 1-CPU tasks."""

from __future__ import annotations

import uuid

from pipeline.data.dataset import DecodeTasks
from pipeline.data.sampling import ClipSpec
from pipeline.data.transforms import EvalTransform, TrainTransform

SPEC = ClipSpec(num_frames=8, sampling_rate=4, target_fps=30.0)  # 29 frames at 30 fps


def train_transform(**changes: object) -> TrainTransform:
    """A 32² training transform: short side 32, short-side jitter (no inception crop), flip on, unless changed."""
    settings = {
        "crop_size": 32,
        "short_side": (32, 32),
        "random_resized_crop": False,
        "crop_area": (0.08, 1.0),
        "crop_aspect": (3 / 4, 4 / 3),
        "flip": True,
    }
    return TrainTransform(**{**settings, **changes})


def eval_transform(short_side: int = 32, num_crops: int = 1) -> EvalTransform:
    return EvalTransform(short_side=short_side, crop_size=32, num_crops=num_crops)


def decode_tasks(**changes: object) -> DecodeTasks:
    """1-CPU decode tasks of 16 videos, no concurrency cap, a fresh skip counter, unless changed."""
    settings = {
        "cpus": 1.0,
        "concurrency": None,
        "resources": {},
        "videos_per_task": 16,
        "skip_counter": f"test-skips-{uuid.uuid4().hex}",
    }
    return DecodeTasks(**{**settings, **changes})
