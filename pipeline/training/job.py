"""What the driver hands every Ray Train worker: the typed config and what the driver learnt before training."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from pipeline import secrets
from pipeline.config import TrainingJobConfig
from pipeline.tracking.continuation import credentials_to_environment


@dataclass(frozen=True)
class ResumePoint:
    """Where the workers start when Ray Train has no checkpoint of this call to give them."""

    checkpoint: str | None = None  # the folder to continue from; None: from scratch
    preexisting: tuple[str, ...] = ()  # checkpoint folder names the run had before this call (not its restarts')


@dataclass(frozen=True)
class TrainJob:
    """The `train_loop_config` of the TorchTrainer: picklable, typed, the same on every worker and every restart.

    `config` holds environment-interpolated values as their `${oc.env:...}` text, resolved by `resolved()` on the
    worker; it is left out of `repr` (Ray Train may print or export its train_loop_config), and what may be written
    anywhere is `public_config`.
    """

    config: TrainingJobConfig = field(repr=False)
    public_config: dict[str, Any] = field(repr=False)  # credentials removed, interpolations unresolved
    config_yaml: str = field(repr=False)  # `public_config` as YAML, for the run's config.yaml artifact
    labels: list[str] = field(repr=False)
    num_classes: int
    input_size: tuple[int, int, int]  # (T, H, W) of the training clips
    excluded: list[tuple[str, str]] = field(repr=False)  # (path, reason) of the videos probing left out
    steps_per_epoch: int
    mlflow_run_id: str
    skip_counter: str  # name of this run's skip-counter actor
    epoch_clock: str  # name of the actor that tells the datasets which epoch to draw (pipeline.data.order)
    resume: ResumePoint = field(default_factory=ResumePoint)
    data_identity: dict[str, str] = field(default_factory=dict, repr=False)  # manifest and label map digests

    def resolved(self) -> TrainJob:
        """This job with the environment interpolations of its config resolved in this process (on a worker), and
        the tracking URI's credentials moved into MLflow's environment variables."""
        config = secrets.resolve_on_worker(self.config)
        config.mlflow.tracking_uri = credentials_to_environment(config.mlflow.tracking_uri)
        return dataclasses.replace(self, config=config)
