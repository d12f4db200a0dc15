"""What evaluation and prediction share: which model to load, and the clip settings it must be fed."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig

from pipeline.manifest import read_label_map
from pipeline.model_source import LoadedModel, ModelSourceError, latest_checkpoint
from pipeline.sampling import ClipSpec, uniform_clips
from pipeline.tracking import resolve_tracking_uri
from pipeline.transforms import EvalTransform
from pipeline.video import decode_frames, probe

CLIP_KEYS = ("num_frames", "sampling_rate", "target_fps", "crop_size", "test_short_side", "mean", "std")


def model_reference(cfg: DictConfig, base: Path) -> dict[str, Any]:
    """Keyword arguments of `load_model` for this config; picklable, so model replicas can load it themselves."""
    reference = cfg.model
    if not reference:
        found = latest_checkpoint(str((base / cfg.run.storage_path).resolve()), cfg.run.name)
        if found is None:
            raise ModelSourceError(
                f"no model given and no checkpoint under {cfg.run.storage_path}/{cfg.run.name}; pass model=PATH_OR_URI"
            )
        reference = str(found)
    elif "://" not in reference and ":/" not in reference:
        reference = str((base / reference).resolve())
    return {
        "reference": reference,
        "source": cfg.model_source,
        "model_name": cfg.model_name,
        "labels": read_label_map((base / cfg.labels).resolve()) if cfg.labels else None,
        "tracking_uri": resolve_tracking_uri(cfg.mlflow.tracking_uri, base),
    }


@dataclass(frozen=True)
class ClipSettings:
    """How views are cut and normalised for a model: its training settings unless the command line says otherwise."""

    num_frames: int
    sampling_rate: int
    target_fps: float
    crop_size: int
    test_short_side: int
    mean: list[float]
    std: list[float]


def clip_settings(cfg: DictConfig, loaded: LoadedModel, explicit: set[str]) -> ClipSettings:
    values = {}
    for key in CLIP_KEYS:
        trained = loaded.data.get(key)
        values[key] = cfg.data[key] if f"data.{key}" in explicit or trained is None else trained
    values["mean"], values["std"] = list(values["mean"]), list(values["std"])
    return ClipSettings(**values)


def video_views(path: str, settings: ClipSettings, num_clips: int, num_crops: int) -> np.ndarray:
    """The K×S test views of one video, uint8 (views, T, H, W, 3), exactly as `pipeline.dataset.test_dataset`
    cuts them; raises `VideoDecodeError` naming the file."""
    info = probe(path)
    spec = ClipSpec(settings.num_frames, settings.sampling_rate, settings.target_fps)
    clips = uniform_clips(info.num_frames, info.fps, spec, num_clips)
    frames = decode_frames(path, np.concatenate([clip.indices for clip in clips]), info)
    transform = EvalTransform(settings.test_short_side, settings.crop_size, num_crops)
    return np.stack([view for clip in np.split(frames, len(clips)) for view in transform(clip)])
