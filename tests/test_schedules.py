"""Tests of ckptavg.schedules: docs/ALGORITHMS.md worked examples, invariants, torch/timm references, error handling."""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch.optim.swa_utils import AveragedModel, get_ema_avg_fn, get_ema_multi_avg_fn

from ckptavg.errors import PlanError
from ckptavg.methods import entropy as E
from ckptavg.methods import schedules as S

STEPS = [100, 200, 300, 400]
A = torch.arange(10.0)
B = torch.tensor([0.0] * 5 + [1.0] * 5)
C = torch.tensor([0.0, 0, 0, 1, 2, 3, 4, 5, 6, 9])
D = torch.linspace(-1, 1, 10) ** 3
PROPS = settings(max_examples=50, deadline=None)


# ---------------------------------------------------------------- worked examples (docs/ALGORITHMS.md, 6 decimals)

def _w(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Callable[[], Any]:
    return partial(fn, *args, **kwargs)


WEIGHT_EXAMPLES = [
    # §2.4 / end of §2.7: per-checkpoint EMA, N = 4, beta = 0.9
    ("2.4-first", _w(S.ema_checkpoint_weights, 4, 0.9), [0.729, 0.081, 0.09, 0.1], 0.0),
    ("2.4-bias", _w(S.ema_checkpoint_weights, 4, 0.9, "bias-correct"), [0.211980, 0.235534, 0.261704, 0.290782], 0.0),
    ("2.4-zero", _w(S.ema_checkpoint_weights, 4, 0.9, "zero"), [0.0729, 0.081, 0.09, 0.1], 1 - 0.3439),
    # §6 (Lookahead = per-checkpoint EMA with beta = 1 - alpha)
    ("6-a0.5", _w(S.ema_checkpoint_weights, 4, 0.5), [0.125, 0.125, 0.25, 0.5], 0.0),
    ("6-a0.5-theta0", _w(S.ema_checkpoint_weights, 4, 0.5, "zero"), [0.0625, 0.125, 0.25, 0.5], 0.0625),
    ("6-a0.8", _w(S.ema_checkpoint_weights, 4, 0.2), [0.008, 0.032, 0.16, 0.8], 0.0),
    # §2.7: steps 100..400, beta = 0.999 per step
    ("2.7-raw", _w(S.ema_step_weights, STEPS, 0.999, init="zero"), [0.070521, 0.077942, 0.086143, 0.095208], 0.670186),
    ("2.7-first", _w(S.ema_step_weights, STEPS, 0.999), [0.740707, 0.077942, 0.086143, 0.095208], 0.0),
    ("2.7-bias", _w(S.ema_step_weights, STEPS, 0.999, init="bias-correct"),
     [0.213821, 0.236320, 0.261187, 0.288671], 0.0),
    ("2.7-midpoint", _w(S.ema_step_weights, STEPS, 0.999, hold="midpoint"),
     [0.778703, 0.081940, 0.090562, 0.048794], 0.0),
    ("2.7-forward", _w(S.ema_step_weights, STEPS, 0.999, hold="forward"), [0.817830, 0.086057, 0.095113, 0.001], 0.0),
    ("2.7-timm-warmup", _w(S.ema_step_weights, STEPS, 0.9999, warmup=True),
     [0.000252, 0.009717, 0.120062, 0.869969], 0.0),
    ("2.7-timm-after150", _w(S.ema_step_weights, STEPS, 0.999, update_after_step=150),
     [0.0, 0.818649, 0.086143, 0.095208], 0.0),
    ("2.7-0.9998", _w(S.ema_step_weights, STEPS, 0.9998), [0.941759, 0.019027, 0.019411, 0.019803], 0.0),
    ("2.7-0.9999", _w(S.ema_step_weights, STEPS, 0.9999), [0.970444, 0.009754, 0.009852, 0.009951], 0.0),
    ("2.7-steps1000", _w(S.ema_step_weights, [1000, 2000, 3000, 4000], 0.999),
     [0.049712, 0.085488, 0.232495, 0.632305], 0.0),
    # §4.3: power EMA over raw checkpoints
    ("4.3-s0.10", _w(S.power_weights, STEPS, 0.10), [0.000017, 0.004063, 0.097858, 0.898062], 0.0),
    ("4.3-s0.05", _w(S.power_weights, STEPS, 0.05), [0.0, 0.000004, 0.005679, 0.994317], 0.0),
]


@pytest.mark.parametrize(("fn", "expected", "residual"), [pytest.param(*r[1:], id=r[0]) for r in WEIGHT_EXAMPLES])
def test_weight_examples(fn: Callable[[], tuple[list[float], float]], expected: list[float], residual: float) -> None:
    weights, res = fn()
    assert weights == pytest.approx(expected, abs=5e-7)
    assert res == pytest.approx(residual, abs=5e-7)
    assert math.fsum(weights) + res == pytest.approx(1.0, abs=1e-12)


GRAFT_EXAMPLES = [
    ("H-arange", lambda: E.graft_entropy(A), 2.072326),
    ("H-01", lambda: E.graft_entropy(B), 0.346574),
    ("H-C", lambda: E.graft_entropy(C), 1.742743),
    ("H-D", lambda: E.graft_entropy(D), 1.413159),
    ("alpha-arange-01", lambda: E.graft_alpha(E.graft_entropy(A), E.graft_entropy(B)), 0.70),
    ("alpha-arange-01-raw", lambda: E.graft_alpha(E.graft_entropy(A), E.graft_entropy(B), round_digits=None), 0.699852),
    ("alpha-1.5", lambda: E.graft_alpha(1.500, 1.499), 0.56),
    ("alpha-1.5-raw", lambda: E.graft_alpha(1.500, 1.499, round_digits=None), 0.559033),
    ("pairwise-3", lambda: E.graft_weights([1.500, 1.499, 1.510]), [0.296667, 0.253333, 0.45]),
    ("pairwise-3-raw", lambda: E.graft_weights([1.500, 1.499, 1.510], round_digits=None),
     [0.294722, 0.254622, 0.450656]),
    ("cyclic-3", lambda: E.graft_weights([1.500, 1.499, 1.510], mode="cyclic"), [0.296667, 0.253333, 0.45]),
    ("pairwise-4", lambda: E.graft_weights([1.500, 1.499, 1.510, 1.505]), [0.206667, 0.183333, 0.333333, 0.276667]),
    ("cyclic-4", lambda: E.graft_weights([1.500, 1.499, 1.510, 1.505], mode="cyclic"), [0.2275, 0.19, 0.3325, 0.25]),
    ("sequential", lambda: E.graft_sequential_weights([A, B, C, D]), [0.343, 0.147, 0.21, 0.3]),
    # §4.1
    ("gamma-0.05", lambda: S.sigma_rel_to_gamma(0.05), 16.972199),
    ("gamma-0.10", lambda: S.sigma_rel_to_gamma(0.10), 6.937204),
    ("gamma-0.15", lambda: S.sigma_rel_to_gamma(0.15), 3.557869),
]


@pytest.mark.parametrize(("fn", "expected"), [pytest.param(*r[1:], id=r[0]) for r in GRAFT_EXAMPLES])
def test_scalar_examples(fn: Callable[[], Any], expected: Any) -> None:
    assert fn() == pytest.approx(expected, abs=5e-7)


# ---------------------------------------------------------------- invariants

step_lists = st.lists(st.integers(1, 100_000), min_size=1, max_size=15, unique=True).map(sorted)
holds = st.sampled_from(S.HOLDS)
inits = st.sampled_from(S.INITS)


def _check_weights(weights: list[float], residual: float, init: str, n: int) -> None:
    assert len(weights) == n
    assert all(math.isfinite(w) and w >= -1e-15 for w in weights)
    assert 0.0 <= residual <= 1.0
    assert math.fsum(weights) + residual == pytest.approx(1.0, abs=1e-12)
    if init != "zero":
        assert residual == 0.0


@PROPS
@given(n=st.integers(1, 300), decay=st.floats(0.0, 1.0), init=inits)
def test_checkpoint_ema_invariants(n: int, decay: float, init: str) -> None:
    assume(not (init == "bias-correct" and decay == 1.0))
    weights, residual = S.ema_checkpoint_weights(n, decay, init)
    _check_weights(weights, residual, init, n)
    if init == "zero":
        assert residual == pytest.approx(decay**n, rel=1e-12, abs=1e-300)


@PROPS
@given(steps=step_lists, decay=st.floats(0.0, 1.0), hold=holds, init=inits, warmup=st.booleans(),
       gamma=st.floats(0.1, 10.0), power=st.floats(0.1, 1.5), floor=st.floats(0.0, 1.0), after=st.integers(0, 2000))
def test_step_ema_invariants(steps: list[int], decay: float, hold: str, init: str, warmup: bool, gamma: float,
                             power: float, floor: float, after: int) -> None:
    assume(not (init == "bias-correct" and decay == 1.0 and not warmup and after == 0))
    weights, residual = S.ema_step_weights(steps, decay, hold=hold, init=init, warmup=warmup, warmup_gamma=gamma,
                                           warmup_power=power, min_decay=floor, update_after_step=after)
    _check_weights(weights, residual, init, len(steps))
    if warmup or after:
        assert residual == 0.0  # timm's first update copies


@PROPS
@given(n=st.integers(1, 20), delta=st.integers(1, 500), decay=st.floats(0.0, 1.0), init=inits)
def test_uniform_spacing_equals_checkpoint_ema(n: int, delta: int, decay: float, init: str) -> None:
    """§2.3: steps s0 + k*delta with backward hold = per-checkpoint EMA with beta**delta."""
    assume(not (init == "bias-correct" and decay == 1.0))
    got_w, got_r = S.ema_step_weights([delta * (k + 1) for k in range(n)], decay, init=init)
    ref_w, ref_r = S.ema_checkpoint_weights(n, decay**delta, init)
    assert got_w == pytest.approx(ref_w, rel=1e-9, abs=1e-13)
    assert got_r == pytest.approx(ref_r, rel=1e-9, abs=1e-13)


@PROPS
@given(steps=st.lists(st.integers(0, 100_000), min_size=1, max_size=15, unique=True).map(sorted),
       sigma=st.floats(0.005, 0.2886), hold=holds, init=inits)
def test_power_invariants(steps: list[int], sigma: float, hold: str, init: str) -> None:
    weights, residual = S.power_weights(steps, sigma, hold=hold, init=init)
    _check_weights(weights, residual, init, len(steps))
    if init == "first" and len(steps) > 1:  # §4.3 formula with b_0 = 0 for every hold
        g1 = S.sigma_rel_to_gamma(sigma) + 1.0
        bounds = [0, *S.hold_bounds(steps, hold, s0=-1)[1:]]
        ref = [(b / steps[-1]) ** g1 - (a / steps[-1]) ** g1 for a, b in zip(bounds, bounds[1:], strict=False)]
        assert weights == pytest.approx(ref, abs=1e-14)


@PROPS
@given(sigma=st.floats(1e-4, S.SIGMA_REL_MAX, exclude_max=True))
def test_gamma_inverts_sigma_rel(sigma: float) -> None:
    gamma = S.sigma_rel_to_gamma(sigma)
    assert gamma > 0.0
    back = math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))
    assert back == pytest.approx(sigma, rel=1e-9)


entropies = st.lists(st.floats(0.0, 5.0), min_size=1, max_size=12)


@PROPS
@given(h=entropies, a=st.floats(0.0, 1.0), c=st.floats(0.0, 1e4), mode=st.sampled_from(E.GRAFT_MODES),
       digits=st.sampled_from([None, 2, 3]))
def test_graft_weight_invariants(h: list[float], a: float, c: float, mode: str, digits: int | None) -> None:
    weights = E.graft_weights(h, mode=mode, a=a, c=c, round_digits=digits)
    n = len(h)
    assert math.fsum(weights) == pytest.approx(1.0, abs=1e-12)
    slack = 0.0 if digits is None else 10.0**-digits  # rounding may push alpha past (0.5 -+ a/2)
    assert all((1 - a) / n - slack - 1e-12 <= w <= (1 + a) / n + slack + 1e-12 for w in weights)
    if n <= 3 and digits is None:
        assert weights == pytest.approx(E.graft_weights(h, mode="pairwise" if mode == "cyclic" else "cyclic",
                                                        a=a, c=c, round_digits=None), abs=1e-12)
    if digits is None:  # pairwise is permutation invariant
        perm = list(reversed(range(n)))
        back = E.graft_weights([h[i] for i in perm], a=a, c=c, round_digits=None)
        assert [back[perm.index(i)] for i in range(n)] == pytest.approx(E.graft_weights(h, a=a, c=c,
                                                                                        round_digits=None), abs=1e-12)


@PROPS
@given(x=st.floats(0.0, 5.0), y=st.floats(0.0, 5.0), digits=st.sampled_from([None, 2]))
def test_graft_alpha_is_antisymmetric(x: float, y: float, digits: int | None) -> None:
    total = E.graft_alpha(x, y, round_digits=digits) + E.graft_alpha(y, x, round_digits=digits)
    assert total == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("h", [[1.0, 1.0, 1.0], [0.3, 0.9, 1.7, 2.0]])
@pytest.mark.parametrize("kw", [{"a": 0.0}, {"c": 0.0}])
def test_graft_degenerate_is_uniform(h: list[float], kw: dict[str, float]) -> None:
    assert E.graft_weights(h, **kw) == pytest.approx([1 / len(h)] * len(h), abs=1e-15)
    assert E.graft_weights(h, mode="cyclic", **kw) == pytest.approx([1 / len(h)] * len(h), abs=1e-15)


def test_single_checkpoint() -> None:
    assert E.graft_weights([1.3]) == [1.0]
    assert E.graft_sequential_weights([A]) == [1.0]
    assert S.power_weights([0], 0.1) == ([1.0], 0.0)
    assert S.power_weights([500], 0.1, init="bias-correct") == ([1.0], 0.0)
    assert S.ema_step_weights([7], 0.9, init="bias-correct") == ([pytest.approx(1.0, abs=1e-15)], 0.0)
    assert S.ema_checkpoint_weights(1, 1.0) == ([1.0], 0.0)


def test_edge_decays() -> None:
    assert S.ema_checkpoint_weights(3, 0.0) == ([0.0, 0.0, 1.0], 0.0)
    assert S.ema_checkpoint_weights(3, 1.0) == ([1.0, 0.0, 0.0], 0.0)
    assert S.ema_step_weights([5, 9, 12], 0.0, hold="midpoint") == ([0.0, 0.0, 1.0], 0.0)
    assert S.ema_step_weights([5, 9, 12], 1.0, init="zero") == ([0.0, 0.0, 0.0], 1.0)
    # step 0 has an empty backward block (§4.3); the midpoint hold gives it steps 1..50
    assert S.power_weights([0, 100], 0.1)[0][0] == 0.0
    assert S.power_weights([0, 100], 0.1, hold="midpoint")[0][0] == pytest.approx(0.5 ** 7.937204, abs=1e-6)


@pytest.mark.parametrize(("hold", "expected"), [
    ("backward", [0, 3, 10, 11, 25, 40, 60]),
    ("midpoint", [0, 6, 10, 18, 32, 50, 60]),
    ("forward", [0, 9, 10, 24, 39, 59, 60]),
])
def test_hold_bounds(hold: str, expected: list[int]) -> None:
    assert S.hold_bounds([3, 10, 11, 25, 40, 60], hold) == expected
    assert S.hold_bounds([13, 20], hold, s0=10)[0] == 10


def test_uniform_running_mean_special_case() -> None:
    """§2.1: warmup with gamma = power = 1 and decay 1 is the uniform mean of steps after update_after_step."""
    weights, _ = S.ema_step_weights(list(range(1, 31)), 1.0, warmup=True, warmup_gamma=1.0, warmup_power=1.0,
                                    update_after_step=10)
    assert weights == pytest.approx([0.0] * 10 + [1 / 20] * 20, abs=1e-15)


def _brute_force(steps: list[int], hold: str, decays: list[float]) -> list[float]:
    """W_k = P(b_k) - P(b_{k-1}) + [k = 1] P(0), with P a plain product over decays[r - 1], r = 1..T."""
    total = steps[-1]
    surv = [1.0] * (total + 1)
    for s in range(total - 1, -1, -1):
        surv[s] = surv[s + 1] * decays[s]  # decays[s] is d_{s+1}
    bounds = S.hold_bounds(steps, hold)
    weights = [surv[b] - surv[a] for a, b in zip(bounds, bounds[1:], strict=False)]
    weights[0] += surv[0]
    return weights


SCHEDULES = [  # (decay, kwargs): the tail of constant decay starts inside, at, or beyond T
    (0.99, {"warmup": True}),
    (0.999, {"warmup": True, "warmup_gamma": 3.0, "warmup_power": 0.75, "min_decay": 0.3, "update_after_step": 7}),
    (0.6, {"warmup": True, "min_decay": 0.8}),
    (1.0, {"warmup": True}),
    (0.0, {"warmup": True}),
    (0.995, {"update_after_step": 500}),
    (0.995, {"update_after_step": 5000}),
    (0.995, {}),
]


@pytest.mark.parametrize(("decay", "kw"), SCHEDULES)
@pytest.mark.parametrize("hold", S.HOLDS)
def test_step_weights_match_brute_force(decay: float, kw: dict[str, Any], hold: str) -> None:
    steps = [1, 37, 400, 999, 1000, 1001, 1500, 2400, 3000]
    decays = [S.timm_decay(r, decay, **kw) if kw else decay for r in range(1, steps[-1] + 1)]
    weights, _ = S.ema_step_weights(steps, decay, hold=hold, **kw)
    assert weights == pytest.approx(_brute_force(steps, hold, decays), abs=1e-13)


def test_long_run_is_fast_and_normalised() -> None:
    steps = list(range(5_000, 1_000_001, 5_000))
    weights, residual = S.ema_step_weights(steps, 0.99999, warmup=True, hold="midpoint")
    assert math.fsum(weights) + residual == pytest.approx(1.0, abs=1e-12)
    assert all(w >= 0.0 for w in weights)


# ---------------------------------------------------------------- torch AveragedModel

class _Holder(torch.nn.Module):
    def __init__(self, value: torch.Tensor) -> None:
        super().__init__()
        self.p = torch.nn.Parameter(value.clone())


def _thetas(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def _combine(weights: list[float], thetas: torch.Tensor) -> torch.Tensor:
    return sum((w * t for w, t in zip(weights, thetas, strict=True)), torch.zeros_like(thetas[0]))


@pytest.mark.parametrize("n", [1, 2, 30])
@pytest.mark.parametrize("decay", [0.0, 0.5, 0.9, 0.999, 1.0])
@pytest.mark.parametrize("kind", ["multi_avg_fn", "avg_fn"])
def test_matches_torch_averaged_model(n: int, decay: float, kind: str) -> None:
    thetas = _thetas(n, seed=n)
    model = _Holder(thetas[0])
    fn = get_ema_multi_avg_fn(decay) if kind == "multi_avg_fn" else get_ema_avg_fn(decay)
    averaged = AveragedModel(model, **{kind: fn})
    for theta in thetas:
        with torch.no_grad():
            model.p.copy_(theta)
        averaged.update_parameters(model)
    weights, residual = S.ema_checkpoint_weights(n, decay)
    assert residual == 0.0
    torch.testing.assert_close(averaged.module.p.detach(), _combine(weights, thetas), rtol=0.0, atol=2e-15)


# ---------------------------------------------------------------- timm ModelEmaV3

@pytest.fixture(scope="module")
def timm_ema() -> ModuleType:
    """timm/utils/model_ema.py loaded by path: importing the timm package itself needs torchvision."""
    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("timm is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / "utils" / "model_ema.py"
    file_spec = importlib.util.spec_from_file_location("_timm_model_ema", path)
    assert file_spec is not None and file_spec.loader is not None
    module = importlib.util.module_from_spec(file_spec)
    file_spec.loader.exec_module(module)
    return module


TIMM_CASES = [  # (our kwargs, timm kwargs)
    (dict(decay=0.9), dict(decay=0.9)),
    (dict(decay=0.99, warmup=True), dict(decay=0.99, use_warmup=True)),
    (dict(decay=0.95, warmup=True, warmup_gamma=3.0, warmup_power=0.75, min_decay=0.3, update_after_step=7),
     dict(decay=0.95, use_warmup=True, warmup_gamma=3.0, warmup_power=0.75, min_decay=0.3, update_after_step=7)),
    (dict(decay=0.9, update_after_step=10), dict(decay=0.9, update_after_step=10)),
]


def _run_timm(timm_ema: ModuleType, trajectory: torch.Tensor, initial: torch.Tensor, use_step: bool,
              **kwargs: Any) -> torch.Tensor:
    model = _Holder(initial)
    ema = timm_ema.ModelEmaV3(model, **kwargs)
    for step, theta in enumerate(trajectory, start=1):
        with torch.no_grad():
            model.p.copy_(theta)
        ema.update(model, step=step if use_step else None)
    return ema.module.p.detach()


@pytest.mark.parametrize(("ours", "theirs"), TIMM_CASES)
def test_timm_decay_matches_get_decay(timm_ema: ModuleType, ours: dict[str, Any], theirs: dict[str, Any]) -> None:
    ema = timm_ema.ModelEmaV3(_Holder(torch.zeros(1, dtype=torch.float64)), **theirs)
    for step in [0, 1, 2, 7, 8, 9, 10, 11, 12, 100, 10_000, 10**7]:
        assert S.timm_decay(step, **ours) == ema.get_decay(step)


@pytest.mark.parametrize(("ours", "theirs"), TIMM_CASES)
def test_matches_timm_dense(timm_ema: ModuleType, ours: dict[str, Any], theirs: dict[str, Any]) -> None:
    total = 60
    thetas = _thetas(total + 1, seed=7)  # thetas[0]: the model when the EMA is created
    got = _run_timm(timm_ema, thetas[1:], thetas[0], use_step=True, **theirs)
    ours = dict(ours)
    decay = ours.pop("decay")
    weights, residual = S.ema_step_weights(list(range(1, total + 1)), decay, **ours)
    assert residual == 0.0
    torch.testing.assert_close(got, _combine(weights, thetas[1:]), rtol=0.0, atol=1e-12)
    if ours:  # timm schedule: the first update copies, so R = 0 whatever init says
        assert S.ema_step_weights(list(range(1, total + 1)), decay, init="zero", **ours) == (weights, 0.0)


def test_matches_timm_without_step(timm_ema: ModuleType) -> None:
    """update(model) without step: constant decay from the creation-time copy (`keep` = zero init + residual)."""
    thetas = _thetas(61, seed=3)
    got = _run_timm(timm_ema, thetas[1:], thetas[0], use_step=False, decay=0.9)
    weights, residual = S.ema_step_weights(list(range(1, 61)), 0.9, init="zero")
    assert residual == pytest.approx(0.9**60, rel=1e-13)
    torch.testing.assert_close(got, _combine([residual, *weights], thetas), rtol=0.0, atol=1e-12)


def _held(steps: list[int], hold: str, t: int) -> int:
    """Index of the checkpoint that stands for optimizer step t, by the hold's plain-words definition."""
    if hold == "backward":
        return min(k for k, s in enumerate(steps) if s >= t)
    if hold == "forward":
        return max([0] + [k for k, s in enumerate(steps) if s <= t])
    return min(range(len(steps)), key=lambda k: (abs(t - steps[k]), k))  # nearest, ties to the earlier


@pytest.mark.parametrize("hold", S.HOLDS)
@pytest.mark.parametrize(("ours", "theirs"), [TIMM_CASES[0], (
    dict(decay=0.95, warmup=True, update_after_step=2), dict(decay=0.95, use_warmup=True, update_after_step=2))])
def test_matches_timm_over_held_trajectory(timm_ema: ModuleType, hold: str, ours: dict[str, Any],
                                           theirs: dict[str, Any]) -> None:
    steps = [3, 10, 11, 25, 40, 60]
    thetas = _thetas(len(steps) + 1, seed=11)
    trajectory = torch.stack([thetas[1 + _held(steps, hold, t)] for t in range(1, steps[-1] + 1)])
    got = _run_timm(timm_ema, trajectory, thetas[0], use_step=True, **theirs)
    ours = dict(ours)
    weights, _ = S.ema_step_weights(steps, ours.pop("decay"), hold=hold, **ours)
    torch.testing.assert_close(got, _combine(weights, thetas[1:]), rtol=0.0, atol=1e-12)


@pytest.mark.parametrize("hold", S.HOLDS)
@pytest.mark.parametrize("steps", [list(range(1, 41)), [3, 10, 11, 25, 40, 60]])
def test_power_matches_per_step_recursion(hold: str, steps: list[int]) -> None:
    """§4.1: d_t = (1 - 1/t)^(gamma+1) applied at every step over the held trajectory gives power_weights."""
    g1 = S.sigma_rel_to_gamma(0.12) + 1.0
    thetas = _thetas(len(steps), seed=5)
    ema = torch.zeros_like(thetas[0])
    for t in range(1, steps[-1] + 1):
        beta = (1.0 - 1.0 / t) ** g1
        ema = beta * ema + (1.0 - beta) * thetas[_held(steps, hold, t)]
    weights, _ = S.power_weights(steps, 0.12, hold=hold)
    torch.testing.assert_close(_combine(weights, thetas), ema, rtol=0.0, atol=1e-13)


# ---------------------------------------------------------------- grafting entropy vs a plain loop

def _entropy_loop(t: torch.Tensor, bins: int = 10) -> float:
    """docs/ALGORITHMS.md §3.1 written as plainly as possible: float32 scalars, one bin at a time, one value at a time."""
    x = t.detach().reshape(-1).float()
    if x.numel() == 0:
        return 0.0
    lo, hi = x.min(), x.max()
    scale = (hi - lo) / bins  # float32 0-dim tensors, as in the reference
    values = x.tolist()
    h = torch.zeros((), dtype=torch.float32)
    for i in range(bins):
        left, right = (lo + i * scale).item(), (lo + (i + 1) * scale).item()
        count = sum(1 for v in values if left <= v < right)
        if count:
            p = torch.tensor(float(count)) / len(values)  # float32, as the reference's float32 count sum
            h = h - p * torch.log(p)
    return float(h)


DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


@PROPS
@given(values=st.lists(st.floats(-1.0, 1.0, width=32), min_size=0, max_size=300),
       scale=st.sampled_from([1e-30, 1e-6, 1.0, 7.25, 1e3, 1e30]), offset=st.sampled_from([0.0, 1.0, -3e3, 1e6]),
       levels=st.sampled_from([None, 0, 1, 3, 16]), dtype=st.sampled_from(DTYPES), bins=st.sampled_from([1, 2, 7, 10]))
def test_entropy_matches_loop(values: list[float], scale: float, offset: float, levels: int | None,
                              dtype: torch.dtype, bins: int) -> None:
    x = torch.tensor(values, dtype=torch.float64)
    if levels == 0:  # constant tensor
        x = torch.full_like(x, values[0] if values else 0.0)
    elif levels is not None:  # many repeated values
        x = torch.round(x * levels) / levels
    t = (x * scale + offset).to(dtype)
    assume(bool(torch.isfinite(t).all()))
    assert E.graft_entropy(t, bins) == _entropy_loop(t, bins)


@pytest.mark.parametrize("t", [
    torch.full((7, 3), 0.25), torch.zeros(0), torch.tensor([3.0]), torch.tensor([-3e38, 3e38, 0.0, 1.0]),
    torch.tensor([1e8, 1e8 + 8, 1e8 + 16]), torch.arange(-5, 5, dtype=torch.int64), torch.randn(4, 8, 3, 3),
    torch.arange(100.0).to(torch.bfloat16), torch.linspace(-2, 2, 101).to(torch.float16), torch.rand(1000) ** 9,
], ids=lambda t: f"{t.dtype}{tuple(t.shape)}")
def test_entropy_special_tensors(t: torch.Tensor) -> None:
    assert E.graft_entropy(t) == _entropy_loop(t)


def test_entropy_constant_and_low_precision() -> None:
    assert E.graft_entropy(torch.full((5,), 2.5)) == 0.0
    half = torch.randn(64, generator=torch.Generator().manual_seed(1)).half()
    assert E.graft_entropy(half) == E.graft_entropy(half.float())
    assert E.graft_entropy(half.bfloat16()) == E.graft_entropy(half.bfloat16().float())


def test_sequential_weights_reproduce_the_fold() -> None:
    gen = torch.Generator().manual_seed(2)
    tensors = [torch.randn(6, 4, generator=gen) * (1 + k) ** 2 for k in range(5)]
    weights = E.graft_sequential_weights(tensors, c=50.0)
    merged = tensors[0].double()
    for t in tensors[1:]:
        alpha = E.graft_alpha(E.graft_entropy(t), E.graft_entropy(merged.float()), c=50.0)
        merged = alpha * t.double() + (1 - alpha) * merged
    torch.testing.assert_close(_combine(weights, torch.stack(tensors).double()), merged, rtol=0.0, atol=1e-14)
    assert math.fsum(weights) == pytest.approx(1.0, abs=1e-14)
    # N = 2 is the paper's two-network graft with checkpoint 2 receiving
    alpha = E.graft_alpha(E.graft_entropy(B), E.graft_entropy(A))
    assert E.graft_sequential_weights([A, B]) == pytest.approx([1 - alpha, alpha], abs=1e-15)


# ---------------------------------------------------------------- bad parameters

NAN = float("nan")
BAD_CALLS = [
    ("decay<0", _w(S.ema_checkpoint_weights, 4, -0.1), "-0.1"),
    ("decay>1", _w(S.ema_checkpoint_weights, 4, 1.1), "1.1"),
    ("decay-nan", _w(S.ema_checkpoint_weights, 4, NAN), "nan"),
    ("n=0", _w(S.ema_checkpoint_weights, 0, 0.9), "n must"),
    ("n-float", _w(S.ema_checkpoint_weights, 2.5, 0.9), "2.5"),
    ("init-name", _w(S.ema_checkpoint_weights, 4, 0.9, "keep"), "'keep'"),
    ("bias-decay1", _w(S.ema_checkpoint_weights, 4, 1.0, "bias-correct"), "decay=1.0"),
    ("step-decay>1", _w(S.ema_step_weights, STEPS, 1.5), "1.5"),
    ("step-bias-decay1", _w(S.ema_step_weights, STEPS, 1.0, init="bias-correct"), "decay=1.0"),
    ("steps-equal", _w(S.ema_step_weights, [100, 100], 0.9), "strictly increasing"),
    ("steps-decreasing", _w(S.ema_step_weights, [200, 100], 0.9), "steps\\[1\\] = 100"),
    ("steps-zero", _w(S.ema_step_weights, [0, 100], 0.9), "steps\\[0\\] = 0"),
    ("steps-empty", _w(S.ema_step_weights, [], 0.9), "empty"),
    ("steps-float", _w(S.ema_step_weights, [1.5, 3], 0.9), "1.5"),
    ("hold-name", _w(S.ema_step_weights, STEPS, 0.9, hold="sideways"), "'sideways'"),
    ("init-name-step", _w(S.ema_step_weights, STEPS, 0.9, init="one"), "'one'"),
    ("warmup-gamma", _w(S.ema_step_weights, STEPS, 0.9, warmup=True, warmup_gamma=0.0), "warmup_gamma"),
    ("warmup-power", _w(S.ema_step_weights, STEPS, 0.9, warmup=True, warmup_power=-1.0), "-1.0"),
    ("min-decay", _w(S.ema_step_weights, STEPS, 0.9, warmup=True, min_decay=2.0), "2.0"),
    ("after<0", _w(S.ema_step_weights, STEPS, 0.9, update_after_step=-1), "-1"),
    ("s0", _w(S.hold_bounds, [5, 10], "backward", s0=5), "s0 = 5"),
    ("hold-bounds-name", _w(S.hold_bounds, [5, 10], "middle"), "'middle'"),
    ("timm-step", _w(S.timm_decay, -1, 0.9), "-1"),
    ("timm-decay", _w(S.timm_decay, 3, -0.5), "-0.5"),
    ("sigma-0", _w(S.sigma_rel_to_gamma, 0.0), "0.0"),
    ("sigma-neg", _w(S.sigma_rel_to_gamma, -0.1), "-0.1"),
    ("sigma-0.2887", _w(S.sigma_rel_to_gamma, 0.2887), "0.2887"),
    ("sigma-0.3", _w(S.sigma_rel_to_gamma, 0.3), "0.3"),
    ("sigma-nan", _w(S.sigma_rel_to_gamma, NAN), "nan"),
    ("power-sigma", _w(S.power_weights, STEPS, 0.5), "0.5"),
    ("power-steps", _w(S.power_weights, [100, 100], 0.1), "strictly increasing"),
    ("power-negative", _w(S.power_weights, [-1, 100], 0.1), "-1"),
    ("power-hold", _w(S.power_weights, STEPS, 0.1, hold="x"), "'x'"),
    ("power-init", _w(S.power_weights, STEPS, 0.1, init="x"), "'x'"),
    ("a>1", _w(E.graft_alpha, 1.0, 1.1, a=1.1), "1.1"),
    ("a<0", _w(E.graft_weights, [1.0, 2.0], a=-0.1), "-0.1"),
    ("c<0", _w(E.graft_weights, [1.0, 2.0], c=-1.0), "-1.0"),
    ("c-inf", _w(E.graft_alpha, 1.0, 1.1, c=math.inf), "inf"),
    ("digits", _w(E.graft_alpha, 1.0, 1.1, round_digits=-1), "-1"),
    ("h-nan", _w(E.graft_weights, [1.0, NAN]), "nan"),
    ("graft-empty", _w(E.graft_weights, []), "empty"),
    ("mode-sequential", _w(E.graft_weights, [1.0, 2.0], mode="sequential"), "'sequential'"),
    ("mode-name", _w(E.graft_weights, [1.0, 2.0], mode="ring"), "'ring'"),
    ("seq-empty", _w(E.graft_sequential_weights, []), "one or more"),
    ("seq-shapes", _w(E.graft_sequential_weights, [A, torch.zeros(3)]), "\\(3,\\)"),
    ("seq-c", _w(E.graft_sequential_weights, [A, B], c=-2.0), "-2.0"),
    ("seq-bins", _w(E.graft_sequential_weights, [A, B], bins=0), "bins"),
    ("entropy-nan", _w(E.graft_entropy, torch.tensor([1.0, NAN])), "NaN"),
    ("entropy-inf", _w(E.graft_entropy, torch.tensor([1.0, math.inf])), "NaN/Inf"),
    ("entropy-overflow", _w(E.graft_entropy, torch.tensor([1e39], dtype=torch.float64)), "float32"),
    ("entropy-complex", _w(E.graft_entropy, torch.ones(3, dtype=torch.complex64)), "complex"),
    ("entropy-bins", _w(E.graft_entropy, A, 0), "bins"),
]


@pytest.mark.parametrize(("call", "match"), [pytest.param(*r[1:], id=r[0]) for r in BAD_CALLS])
def test_bad_parameters_raise_plan_error(call: Callable[[], Any], match: str) -> None:
    with pytest.raises(PlanError, match=match):
        call()
