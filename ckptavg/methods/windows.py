"""Many outputs from one read: sliding windows (LAWA) and parameter sweeps (docs/ALGORITHMS.md §12).

Owns two wrapper plans that turn other plans into weight matrices with several rows: `Windows` (one row per
window of consecutive checkpoints, any plan filling each window) and `Sweep` (one row per plan of a family that
differs in one parameter), and `sweep`, which builds the family. Every row is exactly the row the wrapped plan
gives on its own (same floats), so each output equals its single-output run.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..errors import PlanError
from ..layout import TensorSpec
from .base import Entry, Plan, TensorAccess, WeightMatrix, Weights


class _WindowAccess:
    """The tensor access of one window: checkpoint indices counted from the window's first checkpoint."""

    def __init__(self, data: TensorAccess, offset: int) -> None:
        self._data, self._offset = data, offset

    @property
    def specs(self) -> Sequence[TensorSpec]:
        return self._data.specs

    def load(self, index: int, key: str) -> torch.Tensor:
        return self._data.load(self._offset + index, key)

    def average(self, members: Sequence[int]) -> dict[str, torch.Tensor]:
        return self._data.average([self._offset + m for m in members])

    def progress(self, phase: str, done: int, total: int) -> None:
        self._data.progress(phase, done, total)


def _placed(row: Weights, offset: int, n: int, name: str, params: Mapping[str, Any]) -> Weights:
    """`row`, computed over checkpoints ``offset ..``, as a row over all n checkpoints (zeros elsewhere)."""
    def pad(values: Sequence[float]) -> tuple[float, ...]:
        return (0.0,) * offset + tuple(values) + (0.0,) * (n - offset - len(values))

    return Weights(pad(row.values), row.residual, {k: pad(v) for k, v in row.by_tensor.items()}, name, dict(params))


def _joined(*names: str) -> str:
    return ",".join(n for n in names if n)


@dataclass(frozen=True)
class Windows(Plan):
    """One output per sliding window of `window` consecutive checkpoints, `stride` apart (LAWA, §12).

    Window o holds checkpoints ``o*stride .. o*stride + window - 1`` (oldest first), so N checkpoints give
    ``(N - window) // stride + 1`` windows; `plan` weights each window on its own. Row o has the params
    ``{"window": o, "step": <step of the window's newest checkpoint, or None>, "index": o}`` (a plan giving
    several rows gives them for every window, with its own params added).

    Attributes:
        plan: The plan that fills each window (uniform, EMA, WSM, ...).
        window: Checkpoints per window, >= 1.
        stride: Checkpoints from one window's start to the next's, >= 1.
    """

    method: ClassVar[str] = "window"
    summary: ClassVar[str] = "One average per sliding window of consecutive checkpoints (LAWA)."
    paper: ClassVar[str] = "arXiv:2209.14981 (LAWA); arXiv:2306.03241"
    plan: Plan
    window: int
    stride: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.plan, Plan):
            raise PlanError(f"a window needs a plan to fill it, not {self.plan!r}.")
        for name in ("window", "stride"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise PlanError(f"{name} must be an integer >= 1, not {value!r}.", params=(name,))

    def params(self) -> dict[str, Any]:
        return {"method": self.plan.method, "params": self.plan.params(), "window": self.window, "stride": self.stride}

    def weights(self, ckpts: Sequence[Entry], data: TensorAccess | None = None) -> WeightMatrix:
        n = len(ckpts)
        if n < self.window:
            raise PlanError(f"window is {self.window} checkpoints, but only {n} were selected; choose window <= {n}.",
                            params=("window",))
        rows: list[Weights] = []
        windows = []
        for o, start in enumerate(range(0, n - self.window + 1, self.stride)):
            members = ckpts[start:start + self.window]
            inner = self.plan.weights(members, None if data is None else _WindowAccess(data, start))
            params = {"window": o, "step": members[-1].meta.step, "index": o}
            rows += [_placed(r, start, n, _joined(r.name, f"window={o}"), {**r.params, **params}) for r in inner.rows]
            windows.append({"index": o, "checkpoints": [members[0].name, members[-1].name], "details": dict(inner.details)})
        return WeightMatrix(tuple(rows), {"window": self.window, "stride": self.stride, "windows": windows})


@dataclass(frozen=True)
class Sweep(Plan):
    """One output per plan of a family that differs only in the parameter `field` (a sweep, §12).

    Row i is plan i's row, named ``"{field}={value}"`` with params ``{field: value}`` (added to the plan's own
    row params when it gives several rows). Build one with `sweep`.

    Attributes:
        plans: Plans of one type, equal in every field but `field`, whose values differ.
        field: The parameter that varies (a dataclass field of the plans, e.g. ``sigma_rel``).
    """

    method: ClassVar[str] = "sweep"
    summary: ClassVar[str] = "One output per value of one parameter of a method."
    plans: tuple[Plan, ...]
    field: str

    def __post_init__(self) -> None:
        if not self.plans:
            raise PlanError("a sweep needs at least one plan.")
        kind = type(self.plans[0])
        if any(type(p) is not kind for p in self.plans):
            raise PlanError(f"the plans of a sweep must be of one method, not {sorted({p.method for p in self.plans})}.")
        names: list[str] = [f.name for f in dataclasses.fields(kind)] if dataclasses.is_dataclass(kind) else []
        if self.field not in names:
            raise PlanError(f"{self.field!r} is not a parameter of {kind.method}; it has {', '.join(names) or 'none'}.")
        differ = sorted({f for f in names if f != self.field for p in self.plans
                         if getattr(p, f) != getattr(self.plans[0], f)})
        if differ:
            raise PlanError(f"the plans of a sweep over {self.field} may differ only in it, but they also differ in "
                            f"{', '.join(differ)}.", params=tuple(differ))
        values = self.values
        if len({repr(v) for v in values}) != len(values):
            raise PlanError(f"{self.field} names a value twice: {list(values)}.", params=(self.field,))

    @property
    def values(self) -> tuple[Any, ...]:
        """The value of `field` in each plan, in order."""
        return tuple(getattr(p, self.field) for p in self.plans)

    def params(self) -> dict[str, Any]:
        return {"method": self.plans[0].method, "sweep": self.field, "values": list(self.values),
                "params": self.plans[0].params()}

    def weights(self, ckpts: Sequence[Entry], data: TensorAccess | None = None) -> WeightMatrix:
        rows: list[Weights] = []
        details = []
        for plan, value in zip(self.plans, self.values, strict=True):
            matrix = plan.weights(ckpts, data)
            for r in matrix.rows:
                rows.append(dataclasses.replace(r, name=_joined(f"{self.field}={value}", r.name),
                                                params={**r.params, self.field: value}))
            details.append(dict(matrix.details))
        return WeightMatrix(tuple(rows), {"sweep": self.field, "details": details} if any(details) else {})


def sweep(plan: Plan, field: str, values: Sequence[Any]) -> Plan:
    """`plan` with `field` set to each of `values` in turn: a `Sweep`, or the plan itself for one value.

    Each plan is built (and validated) by ``dataclasses.replace``, e.g.
    ``sweep(Ema(sigma_rel=0.05), "sigma_rel", [0.05, 0.1, 0.15])``.
    """
    if not dataclasses.is_dataclass(plan) or isinstance(plan, type):
        raise PlanError(f"only dataclass plans can be swept, not {plan!r}.")
    if field not in {f.name for f in dataclasses.fields(plan)}:
        raise PlanError(f"{field!r} is not a parameter of {plan.method}.")
    plans = tuple(dataclasses.replace(plan, **{field: v}) for v in values)
    if len(plans) == 1:
        return plans[0]
    return Sweep(plans, field)
