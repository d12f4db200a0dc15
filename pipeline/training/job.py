"""What the driver hands every Ray Train worker: the typed config and what the driver learnt before training."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.config import TrainingJobConfig


@dataclass(frozen=True)
class TrainJob:
    """The `train_loop_config` of the TorchTrainer: picklable, typed, the same on every worker and every restart."""

    config: TrainingJobConfig
    config_yaml: str  # the config as the user wrote it, for the run's config.yaml artifact
    labels: list[str]
    num_classes: int
    input_size: tuple[int, int, int]  # (T, H, W) of the training clips
    excluded: list[tuple[str, str]]  # (path, reason) of the videos probing left out
    steps_per_epoch: int
    mlflow_run_id: str
    skip_counter: str  # name of this run's skip-counter actor
    epoch_clock: str  # name of the actor that tells the datasets which epoch to draw (pipeline.data.order)
