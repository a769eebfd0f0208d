"""ckptavg's exception types: each is also the built-in type a caller would expect."""

from __future__ import annotations

import re
from collections.abc import Mapping


def one_line(value: object, limit: int | None = None) -> str:
    """`value` for a one-line message: control characters escaped (a newline in a file name or tensor key),
    and cut to `limit` characters, since names and values in a hostile file can be megabytes long."""
    text = value if isinstance(value, str) else repr(value)
    cut = text if limit is None else text[: limit + 1]
    escaped = "".join(c if c.isprintable() else repr(c)[1:-1] for c in cut)
    return escaped if limit is None or len(escaped) <= limit else escaped[:limit] + "..."


def first_line(e: BaseException) -> str:
    """The first non-empty line of an exception's message, or its type's name when it has none."""
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def listing(items: list[str], limit: int, sep: str = ", ") -> str:
    """The first `limit` items for an error message, then how many were left out: ``a, b and 3 more``."""
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return sep.join(items[:limit]) + more


class _Named:
    """Messages that mention library parameters, which the command line shows as its flags."""

    params: tuple[str, ...] = ()

    def with_names(self, names: Mapping[str, str]) -> str:
        """The message with each of `params` replaced by its name in `names` (a flag), whole words only: never
        a part of a path or file name (`runs/best/last.pt` keeps its `best` and `last`), nor of a longer name."""
        text = str(self)
        for param in self.params:
            if param in names:
                text = re.sub(rf"(?<![\w./\\-]){re.escape(param)}(?![\w/\\-]|\.\w)", names[param], text)
        return text


class CkptavgError(_Named, Exception):
    """Base class of every error ckptavg raises for bad input (not for bugs).

    `params` names the library parameters that the message mentions, written in it as plain words
    (``decay must be between 0 and 1``); the command line shows each as its flag (``--decay``), through
    one table, so that library messages never name flags.
    """

    def __init__(self, message: str = "", *, params: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.params = params


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


class CkptavgWarning(_Named, UserWarning):
    """Something the user should know that does not stop the work; `params` as for `CkptavgError`."""

    def __init__(self, message: str = "", *, params: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.params = params
