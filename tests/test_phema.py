"""EDM2 post-hoc EMA from stored snapshots (ckptavg.methods.phema): docs/ALGORITHMS.md §4.2's worked example,
an independent brute-force least squares over numerically integrated profiles, profiles from file names and
metadata, sweeps, and errors."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from ckptavg.errors import PlanError
from ckptavg.methods.phema import PROFILE_PLACES, Phema, gamma_to_sigma_rel, phema_coefficients, profile_inner
from ckptavg.read.layouts import open_checkpoint
from ckptavg.read.metadata import Meta, meta_from_name

# §4.2: snapshots at t = 100..400 of the sigma_rel 0.05 and 0.10 EMAs, target (t = 400, sigma_rel = 0.15)
WORKED_05 = [-0.000562, -0.013148, -0.077958, -0.264062]
WORKED_10 = [0.001944, 0.038020, 0.200409, 1.115358]


@dataclass(frozen=True)
class Ckpt:
    name: str
    path: Path
    meta: Meta


def named(*names: str) -> list[Ckpt]:
    return [Ckpt(n, Path(n), meta_from_name(n)) for n in names]


def edm2_worked() -> list[Ckpt]:
    return named(*(f"network-snapshot-{t:07d}-{s:.3f}.pkl" for t in (100, 200, 300, 400) for s in (0.05, 0.10)))


def gamma_of(sigma_rel: float) -> float:
    """EDM2 Eq. 126, solved here with numpy's polynomial roots (independently of ckptavg's bisection)."""
    inv = sigma_rel ** -2
    return float(max(r.real for r in np.roots([1, 7, 16 - inv, 12 - inv]) if abs(r.imag) < 1e-9))


def test_worked_example_from_edm2_names() -> None:
    matrix = Phema(0.15).weights(edm2_worked())
    values = matrix.rows[0].values
    assert list(values[0::2]) == pytest.approx(WORKED_05, abs=1e-6)
    assert list(values[1::2]) == pytest.approx(WORKED_10, abs=1e-6)
    assert math.fsum(values) == pytest.approx(1.0, abs=1e-12)
    assert matrix.details["sum_abs"][0] == pytest.approx(1.71, abs=5e-3)
    assert matrix.details["snapshots"][1]["source"] == "file name (EDM2 std)"
    assert matrix.details["snapshots"][1]["sigma_rel"] == pytest.approx(0.10, abs=1e-12)


def test_worked_example_from_posthoc_names() -> None:
    """ema-pytorch's {index}.{step}.pt with the profiles given in PostHocEMA's order."""
    ckpts = named(*(f"{i}.{t}.pt" for t in (100, 200, 300, 400) for i in (1, 0)))
    values = Phema(0.15, snapshot_sigma_rel=(0.10, 0.05)).weights(ckpts).rows[0].values
    assert list(values[0::2]) == pytest.approx(WORKED_05, abs=1e-6)  # index 1 is sigma_rel 0.05
    assert list(values[1::2]) == pytest.approx(WORKED_10, abs=1e-6)
    gammas = (gamma_of(0.10), gamma_of(0.05))
    by_gamma = Phema(0.15, snapshot_gamma=gammas).weights(ckpts).rows[0].values
    assert by_gamma == pytest.approx(values, abs=1e-9)


# ---------------------------------------------------------------- brute force: integrate the profiles numerically

def brute_force(times: list[float], sigmas: list[float], target: float, end: float, normalize: bool) -> list[float]:
    """min || sum_i x_i p_i - p_target ||_2 over samples of the profiles (Gauss-Legendre on each piece)."""
    used = [i for i, t in enumerate(times) if t <= end]
    knots = sorted({0.0, *(times[i] for i in used), end})
    nodes, quad = np.polynomial.legendre.leggauss(80)
    taus, dw = [], []
    for a, b in zip(knots, knots[1:], strict=False):
        for lo, hi in zip(np.linspace(a, b, 5)[:-1], np.linspace(a, b, 5)[1:], strict=True):
            taus.append((hi - lo) / 2 * nodes + (hi + lo) / 2)
            dw.append((hi - lo) / 2 * quad)
    tau, w = np.concatenate(taus), np.concatenate(dw)

    def profile(t: float, g: float) -> Any:
        return np.where(tau <= t, (g + 1) * tau ** g / t ** (g + 1), 0.0)

    design = np.stack([profile(times[i], gamma_of(sigmas[i])) for i in used], axis=1) * np.sqrt(w)[:, None]
    goal = profile(end, gamma_of(target)) * np.sqrt(w)
    x = np.linalg.lstsq(design, goal, rcond=None)[0]
    x = x / x.sum() if normalize else x
    out = [0.0] * len(times)
    for i, v in zip(used, x, strict=True):
        out[i] = float(v)
    return out


CASES = [
    ([100, 200, 300, 400] * 2, [0.05] * 4 + [0.10] * 4, 0.15, None),
    ([100, 200, 300, 400] * 2, [0.05] * 4 + [0.10] * 4, 0.08, 300),
    ([64, 128, 192, 256, 320] * 2, [0.05] * 5 + [0.28] * 5, 0.2, None),
    ([10, 25, 40, 70, 100, 130], [0.1, 0.2, 0.1, 0.2, 0.1, 0.2], 0.12, None),
]


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize(("times", "sigmas", "target", "at"), CASES)
def test_against_brute_force(times: list[int], sigmas: list[float], target: float, at: int | None,
                             normalize: bool) -> None:
    ckpts = [Ckpt(f"s{i}", Path(f"s{i}"), Meta(step=t, sigma_rel=s, profile_source="test"))
             for i, (t, s) in enumerate(zip(times, sigmas, strict=True))]
    got = Phema(target, at_step=at, normalize=normalize).weights(ckpts).rows[0].values
    expected = brute_force([float(t) for t in times], sigmas, target, float(at or max(times)), normalize)
    assert list(got) == pytest.approx(expected, abs=1e-7)
    if at is not None:
        assert all(v == 0.0 for v, t in zip(got, times, strict=True) if t > at)


@pytest.mark.parametrize("seed", range(5))
def test_inner_product_is_the_integral(seed: int) -> None:
    rng = random.Random(seed)
    ta, tb = rng.uniform(1, 50), rng.uniform(1, 50)
    ga, gb = rng.uniform(0, 20), rng.uniform(0, 20)
    lo = min(ta, tb)
    nodes, quad = np.polynomial.legendre.leggauss(200)
    tau = lo / 2 * (nodes + 1)
    integrand = (ga + 1) * tau ** ga / ta ** (ga + 1) * (gb + 1) * tau ** gb / tb ** (gb + 1)
    assert profile_inner(ta, ga, tb, gb) == pytest.approx(float(lo / 2 * (quad @ integrand)), rel=1e-10)
    assert profile_inner(ta, ga, tb, gb) == profile_inner(tb, gb, ta, ga)


def test_a_stored_profile_is_reproduced_by_itself() -> None:
    times = [100.0, 200.0, 300.0, 400.0] * 2
    gammas = [gamma_of(0.05)] * 4 + [gamma_of(0.10)] * 4
    x = phema_coefficients(times, gammas, gammas[-1], 400.0)
    assert x == pytest.approx([0.0] * 7 + [1.0], abs=1e-9)


def test_sigma_rel_round_trip() -> None:
    for s in (0.01, 0.05, 0.1, 0.15, 0.25):
        assert gamma_to_sigma_rel(gamma_of(s)) == pytest.approx(s, rel=1e-9)


# ---------------------------------------------------------------- sweeps and options

def test_target_sweep_rows_equal_single_runs() -> None:
    targets = (0.05, 0.10, 0.15)
    matrix = Phema(targets).weights(edm2_worked())
    assert [r.name for r in matrix.rows] == ["sigma_rel=0.05", "sigma_rel=0.1", "sigma_rel=0.15"]
    assert [dict(r.params) for r in matrix.rows] == [{"sigma_rel": t} for t in targets]
    for row, target in zip(matrix.rows, targets, strict=True):
        assert row.values == Phema(target).weights(edm2_worked()).rows[0].values


def test_snapshot_files_on_disk(tmp_path: Path) -> None:
    """A PostHocEMA-style folder (step stored as float16 in the file: the name's exact step wins) and a
    safetensors snapshot that records its profile in the metadata."""
    for index in (0, 1):
        for step in (1000, 2049):
            state = {"ema_model.w": torch.ones(3, dtype=torch.float16), "step": torch.tensor(step, dtype=torch.float16),
                     "initted": torch.tensor(True)}
            torch.save(state, tmp_path / f"{index}.{step}.pt")
    meta = open_checkpoint(tmp_path / "1.2049.pt").meta
    assert (meta.ema_index, meta.step) == (1, 2049)
    path = tmp_path / "ema.safetensors"
    save_file({"w": torch.ones(3)}, path, metadata={"step": "500", "sigma_rel": "0.1"})
    meta = open_checkpoint(path).meta
    assert (meta.step, meta.sigma_rel, meta.profile_source) == (500, 0.1, "safetensors metadata 'sigma_rel'")


# ---------------------------------------------------------------- errors

ERRORS: list[tuple[dict[str, Any], str, tuple[str, ...]]] = [
    ({}, "needs sigma_rel", ("sigma_rel",)),
    ({"sigma_rel": 0.3}, "sigma_rel must be in \\(0, 0.288675\\)", ("sigma_rel",)),
    ({"sigma_rel": (0.1, 0.1)}, "twice", ("sigma_rel",)),
    ({"sigma_rel": 0.1, "snapshot_sigma_rel": (0.05, 0.0)}, "snapshot_sigma_rel must be", ("snapshot_sigma_rel",)),
    ({"sigma_rel": 0.1, "snapshot_sigma_rel": (0.05,), "snapshot_gamma": (5.0,)}, "not both",
     ("snapshot_sigma_rel", "snapshot_gamma")),
    ({"sigma_rel": 0.1, "snapshot_gamma": (-1.0,)}, "snapshot_gamma must be", ("snapshot_gamma",)),
    ({"sigma_rel": 0.1, "at_step": 0}, "at_step must be an integer > 0", ("at_step",)),
]


@pytest.mark.parametrize(("kwargs", "message", "params"), ERRORS, ids=[e[1][:20] for e in ERRORS])
def test_bad_parameters(kwargs: dict[str, Any], message: str, params: tuple[str, ...]) -> None:
    with pytest.raises(PlanError, match=message) as info:
        Phema(**kwargs)
    assert info.value.params == params


def test_unknown_profile_names_where_ckptavg_looked() -> None:
    with pytest.raises(PlanError) as info:
        Phema(0.1).weights([Ckpt("raw.pt", Path("raw.pt"), Meta(step=10))])
    assert all(place in str(info.value) for place in PROFILE_PLACES)


@pytest.mark.parametrize(("plan", "names", "message"), [
    (Phema(0.1), ["0.100.pt", "1.100.pt"], "give snapshot_sigma_rel"),
    (Phema(0.1, snapshot_sigma_rel=(0.05,)), ["0.100.pt", "1.100.pt"], "lists only 1 profiles"),
    (Phema(0.1, at_step=500), ["network-snapshot-0000400-0.050.pkl"], "after the newest"),
    (Phema(0.1), ["network-snapshot-0000400-0.050.pkl", "network-snapshot-0000400-0.050.safetensors"],
     "same profile at the same step"),
])
def test_bad_snapshots(plan: Phema, names: list[str], message: str) -> None:
    with pytest.raises(PlanError, match=message):
        plan.weights(named(*names))
