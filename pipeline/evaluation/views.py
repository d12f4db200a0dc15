"""What evaluation and prediction share: which model to load, and the test views it must be fed."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline import storage
from pipeline.checkpoints import latest_checkpoint
from pipeline.config import EvaluationJobConfig
from pipeline.data.dataset import video_test_views
from pipeline.data.manifest import read_label_map
from pipeline.data.sampling import ClipSpec
from pipeline.data.transforms import EvalTransform
from pipeline.data.video import probe
from pipeline.errors import ConfigError
from pipeline.evaluation.loading import LoadedModel, ModelReference, ModelSourceError
from pipeline.tracking import resolve_tracking_uri

CLIP_KEYS = ("num_frames", "sampling_rate", "target_fps", "crop_size", "test_short_side", "mean", "std")


def model_reference(cfg: EvaluationJobConfig, base: Path) -> ModelReference:
    """The model this config names (with no `model`, the newest checkpoint of `run.name` under `run.storage_path`,
    a folder or a URI), local paths made absolute."""
    reference = cfg.model
    if not reference:
        found = latest_checkpoint(storage.absolute(cfg.run.storage_path, base), cfg.run.name)
        if found is None:
            where = storage.redact(f"{cfg.run.storage_path}/{cfg.run.name}")
            raise ModelSourceError(f"no model given and no checkpoint under {where}; pass model=PATH_OR_URI")
        reference = str(found)
    elif "://" not in reference and ":/" not in reference:
        reference = str((base / reference).resolve())
    return ModelReference(
        reference=reference,
        source=cfg.model_source,
        model_name=cfg.model_name,
        labels=read_label_map(storage.absolute(cfg.labels, base)) if cfg.labels else None,
        tracking_uri=resolve_tracking_uri(cfg.mlflow.tracking_uri, base),
        allow_pickle=cfg.allow_pickle,
    )


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

    @property
    def spec(self) -> ClipSpec:
        return ClipSpec(self.num_frames, self.sampling_rate, self.target_fps)

    def transform(self, num_crops: int) -> EvalTransform:
        return EvalTransform(self.test_short_side, self.crop_size, num_crops)


def clip_settings(cfg: EvaluationJobConfig, loaded: LoadedModel, explicit: set[str]) -> ClipSettings:
    """Each clip setting from the model's training config, unless `data.KEY` is in `explicit` (set by the user)."""
    values = {}
    for key in CLIP_KEYS:
        trained = loaded.data.get(key)
        values[key] = getattr(cfg.data, key) if f"data.{key}" in explicit or trained is None else trained
    values["mean"], values["std"] = list(values["mean"]), list(values["std"])
    if values["crop_size"] > values["test_short_side"]:
        raise ConfigError(
            f"data.crop_size={values['crop_size']} is above data.test_short_side={values['test_short_side']} "
            "(the model's settings with yours over them): test views are cut from that short side"
        )
    return ClipSettings(**values)


def video_views(path: str, settings: ClipSettings, num_clips: int, num_crops: int) -> np.ndarray:
    """The K×S test views of one video, uint8 (views, T, H, W, 3), exactly as
    `pipeline.data.dataset.test_dataset` cuts them; raises `VideoDecodeError` naming the file."""
    transform = settings.transform(num_crops)
    return video_test_views(probe(path), spec=settings.spec, transform=transform, num_clips=num_clips)
