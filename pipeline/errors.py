"""The one family of errors a user can cause, each kind with its own exit code.

Every job catches :class:`UserError` only, prints its one-line message and exits with the kind's code; anything
else is a bug and keeps its traceback. The codes are the same in every job (the README lists them).
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input or a run that cannot go on; ``str()`` is one line naming the thing (key, file, row, model)."""

    exit_code = 1


class ConfigError(UserError, ValueError):
    """A configuration key that is unknown, mistyped, out of range or inconsistent with another."""

    exit_code = 2


class DataError(UserError, ValueError):
    """A manifest, label map, index or video that cannot be used."""

    exit_code = 3


class ModelError(UserError, ValueError):
    """A checkpoint, weights file or model reference that cannot be loaded."""

    exit_code = 4


class TrainingStopped(UserError, RuntimeError):
    """Training stopped itself to protect what it has written (e.g. too many non-finite steps in a row)."""

    exit_code = 5


class TrackingError(UserError, RuntimeError):
    """The run's MLflow record could not be completed (a store that stopped answering); checkpoints are intact."""

    exit_code = 6
