"""Exceptions the command line turns into a one-line message and a non-zero exit."""

from __future__ import annotations

EXIT_BAD_INPUT = 2
"""Exit status for bad input (a file, field or value): not worth retrying."""
EXIT_REJECTED = 3
"""Exit status of ``rcat decide --fail-on-reject`` when the gate rejected the update."""
EXIT_TRACKING = 4
"""Exit status when the MLflow tracking store did not answer: worth retrying."""


class RcatError(Exception):
    """Base class for errors a user can act on. ``str(error)`` is the whole one-line message."""


class InputError(RcatError):
    """Bad input: a file, field or value is wrong. The message names it and says what to do."""


class ConfigError(InputError):
    """``params.yaml`` (or another config file) failed validation."""


class TrainingFailed(RcatError):
    """A training or fine-tuning run diverged or learned nothing; the message names the stage, the epoch and what to change."""


class UpdateRejected(RcatError):
    """The update gate rejected the candidate (raised only where the caller asked to fail on reject)."""


class TrackingError(RcatError):
    """MLflow logging failed. Stages log only after writing their outputs, so those are complete."""


class TrackingUnavailable(TrackingError):
    """The MLflow tracking server or store did not answer (down, unreachable, locked), even after retries."""


class OutputError(RcatError, OSError):
    """An output could not be written (disk full, no permission). The previous file is unchanged.

    Also an :class:`OSError`, so callers that caught the underlying error keep working.
    """
