"""Option values that may be comma lists: `--decay 0.9,0.99` is a sweep, one output per value.

Each parser turns the text of one option into a tuple of checked values, or raises `typer.BadParameter`, which
the app prints as one usage error (exit 2), as for a plain number out of range. No torch here: `--help` must
stay fast.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from enum import Enum

import typer


class Floats(tuple[float, ...]):
    """The numbers of one option, in the order given (more than one: a sweep)."""

    def __str__(self) -> str:  # how --help shows a default
        return ",".join(f"{v:g}" for v in self)


class Ints(tuple[int, ...]):
    """The integers of one option, in the order given."""

    def __str__(self) -> str:
        return ",".join(str(v) for v in self)


class Names(tuple[str, ...]):
    """The names (choices) of one option, in the order given."""

    def __str__(self) -> str:
        return ",".join(self)


def _parts(value: object) -> list[str]:
    parts = [p.strip() for p in str(value).split(",")]
    if not all(parts):
        raise typer.BadParameter(f"{value!r} has an empty item; give values separated by single commas.")
    return parts


def floats(lo: float = -math.inf, hi: float = math.inf, *, open_lo: bool = False) -> Callable[[object], Floats]:
    """A parser of one number or a comma list of them, each in [lo, hi] (or (lo, hi] with `open_lo`)."""

    def parse(value: object) -> Floats:
        if isinstance(value, Floats):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):  # a default
            return Floats((float(value),))
        try:
            out = Floats(float(p) for p in _parts(value))
        except ValueError:
            raise typer.BadParameter(f"{value!r} is not a number or a comma list of numbers.") from None
        for v in out:
            if not math.isfinite(v) or v < lo or v > hi or (open_lo and v == lo):
                bounds = f"{'(' if open_lo else '['}{lo:g}, {hi:g}{']' if math.isfinite(hi) else ')'}"
                raise typer.BadParameter(f"{v:g} is not in {bounds}.")
        return out

    return parse


def ints(lo: int = 0) -> Callable[[object], Ints]:
    """A parser of one integer >= lo or a comma list of them."""

    def parse(value: object) -> Ints:
        if isinstance(value, Ints):
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            return Ints((value,))
        try:
            out = Ints(int(p) for p in _parts(value))
        except ValueError:
            raise typer.BadParameter(f"{value!r} is not an integer or a comma list of integers.") from None
        low = [v for v in out if v < lo]
        if low:
            raise typer.BadParameter(f"{low[0]} is not >= {lo}.")
        return out

    return parse


def names(choices: type[Enum]) -> Callable[[object], Names]:
    """A parser of one choice or a comma list of them, each a value of `choices`."""
    allowed = [str(c.value) for c in choices]

    def parse(value: object) -> Names:
        if isinstance(value, Names):
            return value
        out = Names((str(value.value),) if isinstance(value, Enum) else _parts(value))
        bad = [v for v in out if v not in allowed]
        if bad:
            raise typer.BadParameter(f"{bad[0]!r} is not one of {', '.join(allowed)}.")
        return out

    return parse
