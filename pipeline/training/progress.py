"""What rank 0 prints on the terminal: one line per epoch and a summary at the end.

Loss, speed and time left belong where the user is looking (the terminal, `ray job logs`), not only in MLflow.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import torch

from pipeline.progress import duration, eta
from pipeline.training.validation import all_reduce_sum


def say(line: str) -> None:
    """One line on the worker's stdout, which Ray forwards to the driver's terminal. Not `print`: Ray Train patches
    it on workers to log and echo, which shows each line twice."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def set_ray_train_log_level(level: str) -> None:
    """Apply `run.ray_train_log_level` on a worker. Ray Train's LoggingConfig covers the `ray.train.*` loggers, but
    the per-worker "Reporting training result ..." dump comes from a logger named after its file, which that filter
    misses; its level is set here too (a private module: skipped if Ray moves it)."""
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:
        return
    logging.getLogger(context.__file__).setLevel(level)


class EpochProgress:
    """One epoch's sums (loss of the applied steps on the device, clips, time waiting for data) and the run's clock.

    The loss and the applied flags stay on the training device until the epoch's line is printed: one host read
    per epoch, none per step."""

    def __init__(self, epochs: int, first_epoch: int, device: torch.device) -> None:
        self.epochs, self.first_epoch, self.device = epochs, first_epoch, device
        self.run_start = time.perf_counter()
        self.start_epoch()
        self.best: tuple[float, int] | None = None  # (val top-1, epoch)
        self.last_val: dict[str, float] = {}

    def start_epoch(self) -> None:
        self.sums = torch.zeros(2, dtype=torch.float64, device=self.device)  # loss of the applied steps, their count
        self.clips, self.wait = 0, 0.0
        self.epoch_start = time.perf_counter()

    def add(self, loss: torch.Tensor, applied: torch.Tensor, clips: int) -> None:
        """Account one optimizer step; no host read."""
        applied = applied.to(torch.float64)
        self.sums.add_(torch.stack((torch.where(applied > 0, loss.detach().to(torch.float64), 0.0), applied)))
        self.clips += clips

    def epoch_figures(self) -> dict[str, float]:
        """The epoch's train figures over every worker (every rank must call this: it all-reduces)."""
        elapsed = max(time.perf_counter() - self.epoch_start, 1e-9)
        loss, steps = self.sums.tolist()
        loss, steps, clips, wait, workers = all_reduce_sum([loss, steps, self.clips, self.wait, 1], self.device)
        return {
            "loss": loss / steps if steps else float("nan"),
            "clips_per_sec": clips / elapsed,
            "data_wait_frac": wait / workers / elapsed,
        }

    def epoch_line(self, epoch: int, step: int, train: dict[str, float], val: dict[str, Any]) -> str:
        """`epoch 3/20  step 48  train loss 1.912  val top-1 0.625 top-5 1.000  12.4 clips/s  data wait 8%
        elapsed 1m02s  ETA 5m30s` (`val -` in an epoch that `train.eval_every_epochs` does not validate)."""
        shown = "val -"
        if "val/top1" in val:
            self.last_val = val
            if self.best is None or val["val/top1"] > self.best[0]:
                self.best = (val["val/top1"], epoch)
            shown = f"val top-1 {val['val/top1']:.3f} top-5 {val['val/top5']:.3f}"
        elapsed = time.perf_counter() - self.run_start
        done = epoch - self.first_epoch
        return (
            f"epoch {epoch}/{self.epochs}  step {step}  train loss {train['loss']:.3f}  {shown}  "
            f"{train['clips_per_sec']:.1f} clips/s  data wait {train['data_wait_frac']:.0%}  "
            f"elapsed {duration(elapsed)}  ETA {eta(done, self.epochs - self.first_epoch, elapsed)}"
        )

    def summary(self, state: Any) -> str:
        elapsed = duration(time.perf_counter() - self.run_start)
        if self.best is None:
            return f"training finished: {state.epoch} epochs, {state.step} steps (nothing left to train)"
        last = self.last_val
        return (
            f"training finished: {state.epoch} epochs, {state.step} steps in {elapsed}; best val top-1 "
            f"{self.best[0]:.4f} (epoch {self.best[1]}); last val top-1 {last['val/top1']:.4f} "
            f"top-5 {last['val/top5']:.4f}"
        )
