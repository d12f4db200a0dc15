"""Checks on the driver of what would otherwise fail only inside every worker, minutes in and once per retry.

The config's ranges and choices are checked when it loads (`pipeline/config.py`); what needs the model is here:
the preset at the training clip size (an input grid its blocks can't pool) and pretrained weights of the wrong
shape or family. The model is built once on the driver's CPU, which costs about a second for MViT-B.
"""

from __future__ import annotations

from pathlib import Path

import mvit
from pipeline.config import TrainingJobConfig
from pipeline.errors import ConfigError, ModelError


def check_model(cfg: TrainingJobConfig, num_classes: int) -> None:
    """Build the configured model at the training clip size and load its pretrained weights, as each worker will."""
    settings, data = cfg.model, cfg.data
    input_size = (data.num_frames, data.crop_size, data.crop_size)
    try:
        model = mvit.create_model(
            settings.name,
            num_classes=num_classes,
            input_size=input_size,
            drop_path_rate=settings.drop_path_rate,
            head_dropout=settings.head_dropout,
            activation_checkpointing=settings.activation_checkpointing,
            pool_memory_format=settings.pool_memory_format,
        )
    except ValueError as error:
        raise ConfigError(
            f"model.name {settings.name} at data.num_frames={data.num_frames}, data.crop_size={data.crop_size}: "
            f"{str(error).splitlines()[0]}"
        ) from None
    if not settings.pretrained:
        return
    if not Path(settings.pretrained).is_file():
        raise ModelError(f"model.pretrained {settings.pretrained}: no such file")
    try:
        mvit.load_pretrained(model, settings.pretrained, source=settings.pretrained_source)
    except Exception as error:  # a misshapen or foreign state dict (ValueError), or not a torch file at all
        reason = (str(error).splitlines()[0] if str(error) else type(error).__name__).removeprefix(
            f"{settings.pretrained}: "
        )
        raise ModelError(f"model.pretrained {settings.pretrained} ({settings.pretrained_source}): {reason}") from None
