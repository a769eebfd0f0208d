"""Sliding windows and sweeps (ckptavg.methods.windows): row counts, each row equal to the wrapped plan's own
row (float ==), row names and params, tensor access shifted per window, and errors."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch

from ckptavg.errors import PlanError
from ckptavg.layout import TensorSpec
from ckptavg.methods.base import Entry, Plan, TensorAccess, WeightMatrix
from ckptavg.methods.ema import Ema
from ckptavg.methods.linear import Linear
from ckptavg.methods.uniform import Swa
from ckptavg.methods.windows import Sweep, Windows, sweep
from ckptavg.methods.wsm import Wsm
from ckptavg.read.metadata import Meta


@dataclass(frozen=True)
class Ckpt:
    name: str
    path: Path
    meta: Meta


def ckpts(n: int, steps: bool = True) -> list[Ckpt]:
    return [Ckpt(f"c{i}", Path(f"c{i}"), Meta(step=100 * (i + 1) + i * i if steps else None)) for i in range(n)]


@pytest.mark.parametrize(("n", "window", "stride"), [(8, 5, 1), (8, 8, 1), (8, 1, 1), (8, 3, 2), (9, 3, 3), (10, 4, 3),
                                                       (5, 2, 7)])
def test_window_count_and_placement(n: int, window: int, stride: int) -> None:
    entries = ckpts(n)
    matrix = Windows(Swa(), window, stride).weights(entries)
    assert len(matrix.rows) == (n - window) // stride + 1
    for o, row in enumerate(matrix.rows):
        start = o * stride
        assert row.values == (0.0,) * start + (1.0 / window,) * window + (0.0,) * (n - start - window)
        assert dict(row.params) == {"window": o, "step": entries[start + window - 1].meta.step, "index": o}
        assert row.name == f"window={o}"
    assert matrix.details["windows"][0]["checkpoints"] == ["c0", f"c{window - 1}"]


INNER: list[Plan] = [Swa(), Ema(decay=0.9), Ema(step_decay=0.99), Ema(sigma_rel=0.1, init="zero"),
                     Wsm("minus-sqrt"), Wsm("cosine", final=0.1, by_step=True), Linear((0.1, 0.2, 0.3, 0.4))]


@pytest.mark.parametrize("inner", INNER, ids=lambda p: p.method + str(sorted(p.params().items()))[:40])
def test_each_window_row_is_the_inner_plans_row(inner: Plan) -> None:
    entries = ckpts(9)
    matrix = Windows(inner, 4, 2).weights(entries)
    for o, row in enumerate(matrix.rows):
        alone = inner.weights(entries[2 * o:2 * o + 4]).rows[0]
        assert row.values[2 * o:2 * o + 4] == alone.values
        assert row.residual == alone.residual
        assert all(v == 0.0 for i, v in enumerate(row.values) if not 2 * o <= i < 2 * o + 4)


def test_windows_of_a_multi_row_plan() -> None:
    entries = ckpts(6)
    shapes = ("linear", "minus-sqrt")
    matrix = Windows(Wsm(shapes), 3, 3).weights(entries)
    assert [r.name for r in matrix.rows] == [f"schedule={s},window={o}" for o in (0, 1) for s in shapes]
    assert dict(matrix.rows[3].params) == {"schedule": "minus-sqrt", "window": 1, "step": entries[5].meta.step, "index": 1}
    assert matrix.rows[3].values[3:] == Wsm("minus-sqrt").weights(entries[3:]).rows[0].values


def test_step_is_none_without_metadata() -> None:
    assert [r.params["step"] for r in Windows(Swa(), 2).weights(ckpts(3, steps=False)).rows] == [None, None]


class _Access:
    """A fake tensor access: checkpoint i holds the tensor [i]."""

    def __init__(self, n: int) -> None:
        self.n = n

    @property
    def specs(self) -> Sequence[TensorSpec]:
        return ()

    def load(self, index: int, key: str) -> torch.Tensor:
        assert 0 <= index < self.n
        return torch.tensor([float(index)])

    def average(self, members: Sequence[int]) -> dict[str, torch.Tensor]:
        return {"x": torch.tensor([sum(members) / len(members)])}


@dataclass(frozen=True)
class _ReadsData(Plan):
    """A plan that reads tensors: all weight on the checkpoint whose tensor is largest; by_tensor from average."""

    method: ClassVar[str] = "reads-data"

    def weights(self, ckpts: Sequence[Entry], data: TensorAccess | None = None) -> WeightMatrix:
        assert data is not None
        loaded = [float(data.load(i, "x")) for i in range(len(ckpts))]
        values = [1.0 if v == max(loaded) else 0.0 for v in loaded]
        return WeightMatrix.single(values, details={"loaded": loaded, "mean": float(data.average([0, 1])["x"])})


def test_tensor_access_is_shifted_per_window() -> None:
    matrix = Windows(_ReadsData(), 2, 2).weights(ckpts(6), _Access(6))
    assert [w["details"]["loaded"] for w in matrix.details["windows"]] == [[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]]
    assert [w["details"]["mean"] for w in matrix.details["windows"]] == [0.5, 2.5, 4.5]
    assert [r.values.index(1.0) for r in matrix.rows] == [1, 3, 5]


# ---------------------------------------------------------------- sweeps

SWEEPS: list[tuple[Plan, str, list[Any], Any]] = [
    (Ema(sigma_rel=0.05), "sigma_rel", [0.05, 0.1, 0.15, 0.2], lambda v: Ema(sigma_rel=v)),
    (Ema(decay=0.9), "decay", [0.9, 0.99, 0.999], lambda v: Ema(decay=v)),
    (Ema(step_decay=0.99, hold="midpoint"), "step_decay", [0.9, 0.99], lambda v: Ema(step_decay=v, hold="midpoint")),
    (Wsm("cosine"), "final", [0.0, 0.1, 0.5], lambda v: Wsm("cosine", final=v)),
]


@pytest.mark.parametrize(("plan", "field", "values", "single"), SWEEPS, ids=[s[1] for s in SWEEPS])
def test_sweep_rows_equal_single_runs(plan: Plan, field: str, values: list[Any], single: Any) -> None:
    entries = ckpts(7)
    swept = sweep(plan, field, values)
    assert isinstance(swept, Sweep)
    matrix = swept.weights(entries)
    assert [r.name for r in matrix.rows] == [f"{field}={v}" for v in values]
    assert [dict(r.params) for r in matrix.rows] == [{field: v} for v in values]
    for row, value in zip(matrix.rows, values, strict=True):
        alone = single(value).weights(entries).rows[0]
        assert (row.values, row.residual) == (alone.values, alone.residual)


def test_sweep_of_one_value_is_the_plan() -> None:
    assert sweep(Ema(decay=0.9), "decay", [0.5]) == Ema(decay=0.5)


def test_windows_of_a_sweep() -> None:
    entries = ckpts(5)
    matrix = Windows(sweep(Ema(decay=0.9), "decay", [0.5, 0.9]), 3).weights(entries)
    assert len(matrix.rows) == 6
    assert matrix.rows[5].name == "decay=0.9,window=2"
    assert matrix.rows[5].values[2:] == Ema(decay=0.9).weights(entries[2:]).rows[0].values


@pytest.mark.parametrize(("build", "message", "params"), [
    (lambda: Windows(Swa(), 0), "window must be an integer >= 1, not 0", ("window",)),
    (lambda: Windows(Swa(), 2, stride=0), "stride must be", ("stride",)),
    (lambda: Windows(Swa(), 2.5),  # type: ignore[arg-type]
     "window must be an integer", ("window",)),
    (lambda: Windows(Swa(), 9).weights(ckpts(4)), "only 4 were selected", ("window",)),
    (lambda: Sweep((), "decay"), "at least one plan", ()),
    (lambda: Sweep((Ema(decay=0.9), Swa()), "decay"), "of one method", ()),
    (lambda: Sweep((Ema(decay=0.9), Ema(decay=0.8, init="zero")), "decay"), "also differ in init", ("init",)),
    (lambda: Sweep((Ema(decay=0.9), Ema(decay=0.9)), "decay"), "decay names a value twice", ("decay",)),
    (lambda: Sweep((Ema(decay=0.9),), "colour"), "'colour' is not a parameter of ema", ()),
    (lambda: sweep(Ema(decay=0.9), "colour", [1]), "not a parameter", ()),
])
def test_errors(build: Any, message: str, params: tuple[str, ...]) -> None:
    with pytest.raises(PlanError, match=message) as info:
        build()
    assert info.value.params == params
