"""Weighting plans: each averaging method is a small frozen value, validated when it is built.

A plan turns the ordered, selected checkpoints into one weight per checkpoint (plus any residual
mass the method leaves on an initial value) before a single tensor is read.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any, ClassVar

from ..errors import PlanError
from ..read.checkpoint import Checkpoint


@dataclass(frozen=True)
class GraftGroup:
    """Tensors that share one weight vector (grafting): the tensor whose entropies set it, and its followers."""

    tensor: str | None
    members: tuple[str, ...]
    entropies: tuple[float, ...]
    weights: tuple[float, ...]


@dataclass(frozen=True)
class Weights:
    """One weight per checkpoint, in checkpoint order, and the mass left on an initial value.

    Per-tensor methods (grafting) add `groups`; `values` is then the parameter-count-weighted mean
    weight of each checkpoint. Methods that evaluate candidates (soups) add `scores`.
    """

    values: tuple[float, ...]
    residual: float = 0.0
    groups: tuple[GraftGroup, ...] = ()
    scores: tuple[dict[str, Any], ...] = ()

    @cached_property
    def _by_tensor(self) -> dict[str, tuple[float, ...]]:
        return {m: g.weights for g in self.groups for m in g.members}

    def for_tensor(self, name: str) -> tuple[float, ...]:
        """The weights that apply to one tensor."""
        return self._by_tensor.get(name, self.values)


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
