"""Which worker failures Ray Train retries: the ones a restart can fix.

A `UserError` raised in a worker (a bad setting, unloadable weights or checkpoints, a run that stopped itself on
non-finite losses) happens again on every restart, so it ends the run at once, whatever `scaling.max_failures`
says; with `max_failures=-1` it would otherwise restart forever. Everything else (a dead worker, a lost node, an
OOM, a full disk) counts against `scaling.max_failures` as before.

Ray Train V2 has no public hook for its failure policy yet, so `RunTrainer` hands the controller this policy in
place of the default one, through the trainer's only seam for it (`_initialize_and_run_controller`). The fault
suite's `max_failures=-1` test fails if a Ray upgrade moves that seam.
"""

from __future__ import annotations

import logging
from typing import Any

from ray.train import WorkerGroupError
from ray.train.torch import TorchTrainer
from ray.train.v2._internal.execution.failure_handling import DefaultFailurePolicy, FailureDecision

from pipeline.errors import UserError

log = logging.getLogger(__name__)


def unfixable(error: BaseException) -> UserError | None:
    """The UserError among a worker group's failures, if any: a restart would meet it again."""
    if isinstance(error, WorkerGroupError):
        for failure in error.worker_failures.values():
            if isinstance(failure, UserError):
                return failure
    return None


class UserErrorsEndTheRun(DefaultFailurePolicy):
    """Ray Train's default policy, except that a UserError in any worker is raised at once, never retried."""

    def make_decision(self, training_failed_error: Any) -> FailureDecision:
        found = unfixable(training_failed_error)
        if found is not None:
            log.warning("not retried (a restart would fail the same way): %s: %s", type(found).__name__, found)
            return FailureDecision.RAISE
        return super().make_decision(training_failed_error)


class RunTrainer(TorchTrainer):
    """A TorchTrainer whose controller ends the run on a UserError instead of retrying it."""

    def _initialize_and_run_controller(self, **controller_init_kwargs: Any) -> Any:
        if "failure_policy" not in controller_init_kwargs:
            raise RuntimeError("this Ray Train no longer takes a failure_policy; see pipeline/training/failures.py")
        controller_init_kwargs["failure_policy"] = UserErrorsEndTheRun(self.run_config.failure_config)
        return super()._initialize_and_run_controller(**controller_init_kwargs)
