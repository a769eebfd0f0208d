"""WSM merge weights (ckptavg.methods.wsm): docs/ALGORITHMS.md §10 worked numbers, Megatron-LM's discretisation
recomputed independently, shape formulas, properties, step fractions, sweeps and parameter errors."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest

from ckptavg.errors import PlanError
from ckptavg.methods.wsm import SHAPES, Wsm, decay_shape, even_fractions, merge_coefficients, step_fractions
from ckptavg.read.metadata import Meta


@dataclass(frozen=True)
class Ckpt:
    name: str
    path: Path
    meta: Meta


def ckpts(steps: Sequence[int | None]) -> list[Ckpt]:
    return [Ckpt(f"c{i}", Path(f"c{i}.pt"), Meta(step=s)) for i, s in enumerate(steps)]


# ---------------------------------------------------------------- docs/ALGORITHMS.md §10, n = 5

WORKED = [
    ("linear", {}, [0.2, 0.2, 0.2, 0.2, 0.2]),
    ("minus-sqrt", {}, [0.447214, 0.185242, 0.142141, 0.119831, 0.105573]),
    ("cosine", {}, [0.095492, 0.25, 0.309017, 0.25, 0.095492]),
    ("cosine", {"final": 0.1}, [0.085942, 0.225, 0.278115, 0.225, 0.185942]),
    ("exponential", {"factor": 0.5}, [0.425651, 0.244472, 0.140412, 0.080646, 0.108819]),
]


@pytest.mark.parametrize(("shape", "kwargs", "expected"), WORKED, ids=[f"{w[0]}{w[1]}" for w in WORKED])
def test_worked_numbers(shape: str, kwargs: dict[str, Any], expected: list[float]) -> None:
    matrix = Wsm(shape, **kwargs).weights(ckpts([None] * 5))
    assert len(matrix.rows) == 1
    assert list(matrix.rows[0].values) == pytest.approx(expected, abs=1e-6)
    assert matrix.rows[0].residual == 0.0


def _megatron_by_hand(f: Any, n: int) -> list[float]:
    """The §10 rule written out directly: c_0 = 1 - d_1, c_i = d_i - d_{i+1}, c_{n-1} = d_{n-1}."""
    if n == 1:
        return [1.0]
    d = [f(Fraction(i, n)) for i in range(n)]
    return [1 - d[1]] + [d[i] - d[i + 1] for i in range(1, n - 1)] + [d[n - 1]]


MEGATRON_SHAPES = {"linear": lambda x: 1 - float(x), "minus-sqrt": lambda x: 1 - math.sqrt(float(x))}


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 8, 13, 64, 257])
@pytest.mark.parametrize("shape", sorted(MEGATRON_SHAPES))
def test_megatron_coefficients(shape: str, n: int) -> None:
    got = Wsm(shape).weights(ckpts([None] * n)).rows[0].values
    expected = _megatron_by_hand(MEGATRON_SHAPES[shape], n)
    assert len(got) == n
    assert max(abs(a - b) for a, b in zip(got, expected, strict=True)) <= 1e-12


def test_merge_coefficients_edge_cases() -> None:
    assert merge_coefficients([]) == []
    assert merge_coefficients([0.3]) == [1.0]
    assert merge_coefficients([1.0, 0.25]) == [0.75, 0.25]


# ---------------------------------------------------------------- shape formulas, written differently here

SHAPE_CASES: list[tuple[str, dict[str, Any], Any]] = [
    ("linear", {}, lambda x, n: 1 - x),
    ("minus-sqrt", {}, lambda x, n: 1 - x ** 0.5),
    ("cosine", {"final": 0.2}, lambda x, n: 0.2 + 0.8 * math.cos(math.pi * x / 2) ** 2),
    ("exponential", {"factor": 0.7}, lambda x, n: math.exp((n - 1) * x * math.log(0.7))),
    ("step", {"milestones": (0.3, 0.6), "gamma": 0.5}, lambda x, n: 1.0 if x < 0.3 else 0.5 if x < 0.6 else 0.25),
    ("inverse-sqrt", {"timescale": 0.25}, lambda x, n: math.sqrt(25 / (25 + x * 100))),  # warmup 25 steps, window 100
]


@pytest.mark.parametrize(("shape", "kwargs", "formula"), SHAPE_CASES, ids=[c[0] for c in SHAPE_CASES])
def test_shape_formulas(shape: str, kwargs: dict[str, Any], formula: Any) -> None:
    n = 7
    plan = Wsm(shape, **kwargs)
    args = {k: v for k, v in kwargs.items()}
    f = decay_shape(shape, intervals=n - 1, **args)
    for x in [0.0, 0.1, 0.25, 0.3, 0.5, 0.6, 0.75, 0.99, 1.0]:
        assert f(x) == pytest.approx(formula(x, n), abs=1e-14), x
    assert f(0.0) == 1.0
    expected = _megatron_by_hand(lambda x: formula(float(x), n), n)
    assert list(plan.weights(ckpts([None] * n)).rows[0].values) == pytest.approx(expected, abs=1e-12)


def test_exponential_factor_is_per_checkpoint_interval() -> None:
    n = 6
    f = decay_shape("exponential", intervals=n - 1, factor=0.8)
    for k in range(n):
        assert f(k / (n - 1)) == pytest.approx(0.8 ** k, rel=1e-13)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 10, 31])
@pytest.mark.parametrize(("shape", "kwargs", "formula"), SHAPE_CASES, ids=[c[0] for c in SHAPE_CASES])
def test_properties(shape: str, kwargs: dict[str, Any], formula: Any, n: int) -> None:
    """Non-increasing shapes give non-negative coefficients summing to 1; reverse reverses them."""
    values = Wsm(shape, **kwargs).weights(ckpts([None] * n)).rows[0].values
    assert all(v >= 0.0 for v in values), values
    assert math.fsum(values) == pytest.approx(1.0, abs=1e-12)
    assert Wsm(shape, reverse=True, **kwargs).weights(ckpts([None] * n)).rows[0].values == values[::-1]


@pytest.mark.parametrize("n", [1, 2, 3, 7, 50])
def test_linear_is_uniform(n: int) -> None:
    assert list(Wsm("linear").weights(ckpts([None] * n)).rows[0].values) == pytest.approx([1 / n] * n, abs=1e-12)


# ---------------------------------------------------------------- by_step

@pytest.mark.parametrize(("start", "spacing", "n"), [(0, 100, 5), (1000, 7, 9), (3, 1, 2), (0, 250, 40)])
def test_even_steps_give_i_over_n_exactly(start: int, spacing: int, n: int) -> None:
    steps = [start + spacing * i for i in range(n)]
    assert step_fractions(steps) == even_fractions(n) == [i / n for i in range(n)]
    for shape in ("minus-sqrt", "cosine"):
        assert Wsm(shape, by_step=True).weights(ckpts(steps)).rows == Wsm(shape).weights(ckpts(steps)).rows


def test_uneven_steps_use_the_mean_spacing() -> None:
    steps = [100, 200, 400, 1000]
    span, n = steps[-1] - steps[0], len(steps)
    window = Fraction(span) + Fraction(span, n - 1)  # oldest checkpoint to one mean interval past the newest
    expected = [float((s - steps[0]) / window) for s in steps]
    assert step_fractions(steps) == pytest.approx(expected, abs=1e-15)
    matrix = Wsm("minus-sqrt", by_step=True).weights(ckpts(steps))
    d = [1 - math.sqrt(x) for x in expected]
    assert list(matrix.rows[0].values) == pytest.approx([1 - d[1], d[1] - d[2], d[2] - d[3], d[3]], abs=1e-12)
    assert matrix.details["spacing"].startswith("by step")
    assert Wsm("minus-sqrt").weights(ckpts(steps)).details["spacing"].startswith("even")


@pytest.mark.parametrize(("steps", "message"), [([100, None, 300], "unknown for c1"), ([100, 300, 300], "strictly")])
def test_by_step_needs_increasing_steps(steps: list[int | None], message: str) -> None:
    with pytest.raises(PlanError, match=message) as info:
        Wsm("linear", by_step=True).weights(ckpts(steps))
    assert info.value.params == ("by_step",)


def test_by_step_with_one_checkpoint_needs_no_step() -> None:
    assert Wsm("cosine", by_step=True).weights(ckpts([None])).rows[0].values == (1.0,)


# ---------------------------------------------------------------- sweeps

def test_schedule_sweep_rows_equal_single_runs() -> None:
    shapes = ("linear", "minus-sqrt", "cosine", "exponential")
    entries = ckpts([100, 250, 300, 700, 800, 1000])
    for by_step in (False, True):
        matrix = Wsm(shapes, final=0.1, factor=0.6, by_step=by_step).weights(entries)
        assert [r.name for r in matrix.rows] == [f"schedule={s}" for s in shapes]
        assert [dict(r.params) for r in matrix.rows] == [{"schedule": s} for s in shapes]
        for row, shape in zip(matrix.rows, shapes, strict=True):
            kwargs: dict[str, Any] = {"final": 0.1} if shape == "cosine" else {"factor": 0.6} if shape == "exponential" else {}
            single = Wsm(shape, by_step=by_step, **kwargs).weights(entries).rows[0]
            assert row.values == single.values


def test_shape_names_and_params() -> None:
    assert Wsm(("minus_sqrt", "Cosine")).shapes == ("minus-sqrt", "cosine")
    assert Wsm("cosine", final=0.1).params() == {"schedule": "cosine", "final": 0.1, "reverse": False, "by_step": False}
    assert set(SHAPES) == {c[0] for c in SHAPE_CASES}


# ---------------------------------------------------------------- parameter errors

ERRORS: list[tuple[dict[str, Any], str, tuple[str, ...]]] = [
    ({"schedule": "warmup"}, "schedule must be one of", ("schedule",)),
    ({"schedule": ()}, "at least one", ("schedule",)),
    ({"schedule": ("linear", "linear")}, "twice", ("schedule",)),
    ({"schedule": "linear", "final": 0.1}, "final applies to schedule 'cosine' only", ("final", "schedule")),
    ({"schedule": "cosine", "factor": 0.5}, "factor applies", ("factor", "schedule")),
    ({"schedule": "cosine", "final": 1.5}, "final must be a number in \\[0, 1\\], not 1.5", ("final",)),
    ({"schedule": "exponential"}, "needs factor", ("factor", "schedule")),
    ({"schedule": "exponential", "factor": 0.0}, "factor must be a number in \\(0, 1\\]", ("factor",)),
    ({"schedule": "step"}, "needs milestones", ("milestones", "schedule")),
    ({"schedule": "step", "milestones": (0.5, 0.4)}, "strictly increasing", ("milestones",)),
    ({"schedule": "step", "milestones": (0.5, 1.0)}, "in \\(0, 1\\)", ("milestones",)),
    ({"schedule": "step", "milestones": (0.5,), "gamma": -0.1}, "gamma must be", ("gamma",)),
    ({"schedule": "inverse-sqrt", "timescale": 0.0}, "timescale must be", ("timescale",)),
]


@pytest.mark.parametrize(("kwargs", "message", "params"), ERRORS, ids=[e[1][:24] for e in ERRORS])
def test_bad_parameters(kwargs: dict[str, Any], message: str, params: tuple[str, ...]) -> None:
    with pytest.raises(PlanError, match=message) as info:
        Wsm(**kwargs)
    assert info.value.params == params
    assert "--" not in str(info.value)
