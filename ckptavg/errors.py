"""ckptavg's exception types: each is also the built-in type a caller would expect."""

from __future__ import annotations


def listing(items: list[str], limit: int, sep: str = ", ") -> str:
    """The first `limit` items for an error message, then how many were left out: ``a, b and 3 more``."""
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return sep.join(items[:limit]) + more


class CkptavgError(Exception):
    """Base class of every error ckptavg raises for bad input (not for bugs)."""


class CheckpointFormatError(CkptavgError, ValueError):
    """A file is missing, unreadable, truncated, of an unknown format, or refused by safe loading."""


class IncompatibleCheckpointsError(CkptavgError, ValueError):
    """Checkpoints disagree on keys, shapes or dtypes."""


class SelectionError(CkptavgError, ValueError):
    """The inputs or selection options leave no usable checkpoint, or need metadata that is missing."""


class PlanError(CkptavgError, ValueError):
    """Bad method parameters, or the wrong number of checkpoints for a method."""


class OutputError(CkptavgError, FileExistsError):
    """The output exists, is one of the inputs, or cannot be written."""


class BatchNormError(CkptavgError, RuntimeError):
    """BatchNorm recalibration cannot run: no BN layers, a failed import, weights that do not fit."""


class NonFiniteError(CkptavgError, ValueError):
    """An input tensor holds NaN or Inf (or the average overflows the output dtype)."""


class CkptavgWarning(UserWarning):
    """Something the user should know that does not stop the work."""
