"""The steps since the last log line, summed on the training device and read on the host once per window.

A step's loss and its applied flag stay on the device; so does the count of non-finite steps in a row and the step
at which that streak first passed `train.max_bad_steps`. `flush` all-reduces the sums and reads everything in one
transfer: one host sync per `train.log_every_steps` steps instead of two per step. The applied flag comes from the
all-reduced gradient norm, identical on every rank, so every rank's streak, and its decision to stop, is the same.
A streak is found at the flush after it passes the limit; the steps after it inside that window change nothing
that is kept, since the run stops before any checkpoint.
"""

from __future__ import annotations

import math
import time

import torch
import torch.distributed as dist

from pipeline.errors import TrainingStopped


class NonFiniteLossError(TrainingStopped):
    """Too many consecutive steps with a NaN or inf loss or gradient: the run stops, its checkpoints intact."""

    @classmethod
    def streak(cls, last_step: int, length: int, loss: float, limit: int) -> NonFiniteLossError:
        return cls(
            f"stopped at step {last_step}: steps {last_step - length + 1}-{last_step} all had a non-finite loss or "
            f"gradient (last loss {loss}; train.max_bad_steps={limit}). The last good checkpoint is intact."
        )


class StepWindow:
    """Device-side sums of one log window, and the run of non-finite steps, which carries over between windows."""

    def __init__(self, device: torch.device, max_bad_steps: int) -> None:
        self.device, self.limit = device, max_bad_steps
        zeros = torch.zeros(5, dtype=torch.float64, device=device)
        self.sums = zeros[:2]  # loss of the applied steps, applied steps
        self.streak = zeros[2]  # non-finite steps in a row, up to the last step
        self.stop_step = zeros[3]  # the step at which the streak first passed the limit (0: none)
        self.stop_loss = zeros[4]
        self._flags = zeros
        self.clips, self.wait, self.start = 0, 0.0, time.perf_counter()

    @property
    def pending(self) -> bool:
        """Steps were added since the last flush."""
        return self.clips > 0

    def add(self, loss: torch.Tensor, applied: torch.Tensor, step: int, clips: int) -> None:
        """Account optimizer step `step` (numbered as MLflow numbers steps) on the device; no host read."""
        loss, applied = loss.detach().to(torch.float64), applied.to(torch.float64)
        self.sums.add_(torch.stack((torch.where(applied > 0, loss, 0.0), applied)))
        self.streak.copy_((self.streak + 1) * (1 - applied))
        tripped = (self.streak > self.limit) & (self.stop_step == 0)
        self.stop_step.copy_(torch.where(tripped, float(step), self.stop_step))
        self.stop_loss.copy_(torch.where(tripped, loss, self.stop_loss))
        self.clips += clips

    def flush(self, lr: float) -> tuple[dict[str, float], bool]:
        """The window's train/* figures summed over every worker (every rank must call this: it all-reduces), and
        whether the run is inside a streak of non-finite steps; raises NonFiniteLossError past the limit. The
        window starts again; the streak carries on."""
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        totals = torch.cat((self.sums, torch.tensor([float(self.clips)], dtype=torch.float64, device=self.device)))
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(totals)
        loss_sum, steps, clips, streak, stop_step, stop_loss = torch.cat((totals, self._flags[2:])).tolist()
        if stop_step:
            raise NonFiniteLossError.streak(int(stop_step), self.limit + 1, stop_loss, self.limit)
        figures = {}
        if steps:
            figures = {
                "train/loss": loss_sum / steps,
                "train/lr": lr,
                "train/clips_per_sec": clips / elapsed,
                "train/data_wait_frac": self.wait / elapsed,
            }
        self.sums.zero_()
        self.clips, self.wait, self.start = 0, 0.0, time.perf_counter()
        return figures, streak > 0 and not math.isnan(streak)
