"""Weighting plans: each averaging method is a small frozen value, validated when it is built.

A plan turns the metadata of the ordered, selected checkpoints into a weight matrix (outputs x
checkpoints, plus any residual mass a row leaves on an initial value) before a tensor is read; the
few plans that need tensor data (graft, soup) get a narrow `TensorAccess`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch

from ..errors import CkptavgWarning, PlanError
from ..layout import TensorSpec
from ..read.metadata import Meta


class Entry(Protocol):
    """What a plan sees of one checkpoint: a name for messages and its metadata (step, epoch, metrics)."""

    @property
    def name(self) -> str: ...

    @property
    def path(self) -> Path: ...

    @property
    def meta(self) -> Meta: ...


class TensorAccess(Protocol):
    """The narrow view of tensor data that plans needing it (graft, soup) get: nothing else reads files."""

    @property
    def specs(self) -> Sequence[TensorSpec]:
        """The output layout, in state-dict order."""
        ...

    def load(self, index: int, key: str) -> torch.Tensor:
        """Tensor `key` of checkpoint `index` (in plan order), as stored."""
        ...

    def average(self, members: Sequence[int]) -> dict[str, torch.Tensor]:
        """The uniform average of the checkpoints at `members`, in the output dtypes, as a state dict."""
        ...

    def progress(self, phase: str, done: int, total: int) -> None:
        """Report how far a long pass over the data has come (graft's entropies, soup's evaluations)."""
        ...


@dataclass(frozen=True)
class Weights:
    """One output row: a weight per checkpoint, in checkpoint order, and the mass left on an initial value.

    `by_tensor` holds per-tensor weights where a method has them (grafting: `values` is then the
    parameter-count-weighted mean weight of each checkpoint; phema: one-hot rows that copy counters). `name` and `params` tell the rows of a
    sweep apart (``sigma_rel=0.1``; empty for a single row).
    """

    values: tuple[float, ...]
    residual: float = 0.0
    by_tensor: Mapping[str, tuple[float, ...]] = field(default_factory=dict)
    name: str = ""
    params: Mapping[str, Any] = field(default_factory=dict)

    def for_tensor(self, name: str) -> tuple[float, ...]:
        """The weights that apply to one tensor."""
        return self.by_tensor.get(name, self.values)


@dataclass(frozen=True)
class WeightMatrix:
    """The weights of a plan: one row per output (outputs x checkpoints), and the method's extras.

    `details` is JSON-able (graft groups, soup scores); it goes into `plan --json` and the output metadata.
    """

    rows: tuple[Weights, ...]
    details: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def single(cls, values: Sequence[float], residual: float = 0.0, details: Mapping[str, Any] | None = None
               ) -> WeightMatrix:
        """A one-row matrix: what every method but a sweep returns."""
        return cls((Weights(tuple(values), residual),), details or {})


class Plan:
    """Base class of the weighting plans; subclasses are frozen dataclasses."""

    method: ClassVar[str]
    summary: ClassVar[str] = ""  # one line for `--help` and the README
    paper: ClassVar[str] = ""  # where the method comes from (arXiv id or URL)
    command: ClassVar[str] = ""  # the command that reaches the method when it has none of its own (lr: linear)
    min_checkpoints: ClassVar[int] = 1
    combines_profiles: ClassVar[bool] = False  # takes snapshots of several EMA profiles at one step (phema)

    def params(self) -> dict[str, Any]:
        """The plan's parameters as plain values (recorded in the output and in `plan --json`)."""
        return dataclasses.asdict(self)  # type: ignore[call-overload, no-any-return]

    def weights(self, ckpts: Sequence[Entry], data: TensorAccess | None = None) -> WeightMatrix:
        """Weights for checkpoints already ordered oldest first; `data` only for plans that read tensors."""
        raise NotImplementedError  # pragma: no cover - every registered plan overrides it

    def notes(self, ckpts: Sequence[Entry], matrix: WeightMatrix) -> list[CkptavgWarning]:
        """What a user should know about these weights: an "average" of one checkpoint, or mass left on a zero
        start that scales the output. Methods add their own (`Ema`: an old checkpoint outweighing the newest)."""
        out = []
        if len(ckpts) == 1:
            out.append(CkptavgWarning(f"{self.method} of one checkpoint ({ckpts[0].name}): the output is its "
                                      "weights (converted to the output dtype), not an average."))
        for row in matrix.rows:
            if abs(row.residual) > 1e-12:
                label = f" ({row.name})" if row.name else ""
                out.append(CkptavgWarning(
                    f"{self.method}{label} leaves {row.residual:.3g} of the weight on a zero start, so the output is "
                    f"scaled by {1 - row.residual:.3g}, running statistics included; use init first or bias-correct.",
                    params=("init",)))
        return out

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
