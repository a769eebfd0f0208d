"""Weighting plans: each averaging method is a small frozen value, validated when it is built.

A plan turns the ordered, selected checkpoints into one weight per checkpoint (plus any residual
mass the method leaves on an initial value) before a single tensor is read.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from .errors import PlanError
from .sources import Checkpoint


@dataclass(frozen=True)
class Weights:
    """One weight per checkpoint, in checkpoint order, and the mass left on an initial value."""

    values: tuple[float, ...]
    residual: float = 0.0


class Plan:
    """Base class of the weighting plans; subclasses are frozen dataclasses."""

    method: ClassVar[str]
    min_checkpoints: ClassVar[int] = 1

    def params(self) -> dict[str, Any]:
        """The plan's parameters as plain values (recorded in the output and in `plan --json`)."""
        return dataclasses.asdict(self)  # type: ignore[call-overload, no-any-return]

    def weights(self, ckpts: Sequence[Checkpoint]) -> Weights:
        """Weights for checkpoints already ordered oldest first."""
        raise NotImplementedError  # pragma: no cover - every registered plan overrides it

    def check_count(self, n: int) -> None:
        if n < self.min_checkpoints:
            raise PlanError(
                f"{self.method} needs at least {self.min_checkpoints} checkpoints, but {n} were selected."
            )


PLANS: dict[str, type[Plan]] = {}


def register(cls: type[Plan]) -> type[Plan]:
    """Class decorator: make a plan available by its method name."""
    PLANS[cls.method] = cls
    return cls


@register
@dataclass(frozen=True)
class Swa(Plan):
    """Uniform average (stochastic weight averaging, Izmailov et al. 2018, arXiv 1803.05407)."""

    method: ClassVar[str] = "swa"

    def weights(self, ckpts: Sequence[Checkpoint]) -> Weights:
        self.check_count(len(ckpts))
        n = len(ckpts)
        return Weights(tuple(1.0 / n for _ in range(n)))
