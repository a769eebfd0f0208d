"""Checkpoint weights for EMA and power-function EMA (docs/ALGORITHMS.md §2, §4).

Pure maths on metadata, in float64; no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Integral, Real

import torch

from ..errors import PlanError

WeightsAndResidual = tuple[list[float], float]
"""One weight per checkpoint, in order, and the residual mass left on the initial value."""

INITS = ("first", "bias-correct", "zero")
HOLDS = ("backward", "midpoint", "forward")
SIGMA_REL_MAX = 1.0 / math.sqrt(12.0)  # sigma_rel of gamma = 0 (uniform average): 0.288675
# steps whose decays are evaluated one by one (a warmup that has not reached its decay yet), and how many at
# a time: beyond the cap a schedule is refused rather than taking minutes and gigabytes
DENSE_STEPS_MAX = 5 * 10**7
DENSE_CHUNK = 2**20
_Sched = tuple[float, bool, float, float, float, int]  # decay, warmup, gamma, power, min_decay, update_after_step


def check_choice(name: str, value: str, options: tuple[str, ...]) -> str:
    key = value.replace("_", "-") if isinstance(value, str) else value
    if key not in options:
        raise PlanError(f"{name} must be one of {', '.join(options)}; got {value!r}")
    return key


def check_integer(name: str, value: int, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral) or (minimum is not None and value < minimum):
        raise PlanError(f"{name} must be an integer{'' if minimum is None else f' >= {minimum}'}, got {value!r}")
    return int(value)


def check_number(name: str, value: float, lo: float, hi: float = math.inf, *, open_lo: bool = False) -> float:
    ok = isinstance(value, Real) and not isinstance(value, bool) and lo <= value <= hi and math.isfinite(value)
    if not ok or (open_lo and value == lo):
        interval = f"{'(' if open_lo else '['}{lo}, {hi}{']' if math.isfinite(hi) else ')'}"
        raise PlanError(f"{name} must be a finite number in {interval}, got {value!r}")
    return float(value)


def _times_log(count: int, log_value: float) -> float:
    """``count * log_value`` with ``0 * -inf = 0``: an empty product is 1 even when a factor is 0."""
    return 0.0 if count == 0 else count * log_value


def _log(value: float) -> float:
    return -math.inf if value == 0.0 else math.log(value)


def _weights_from_logs(logs: Sequence[float], init: str, context: str) -> WeightsAndResidual:
    """Block weights ``P(b_k) - P(b_{k-1})`` from ``logs[k] = log P(b_k)``; ``logs[0]`` is ``log R``."""
    surv = [math.exp(v) for v in logs]
    # + 0.0: a weight of exactly nothing is 0.0, not -0.0 (-expm1(0) is -0.0), so no table shows -0.000000
    w = [0.0 if surv[k] == 0.0 else surv[k] * -math.expm1(logs[k - 1] - logs[k]) + 0.0 for k in range(1, len(logs))]
    if init == "first":
        w[0] = surv[1]
        return w, 0.0
    if init == "zero":
        return w, surv[0]
    if logs[0] == 0.0:
        raise PlanError(f"init='bias-correct' is undefined when all mass stays on the initial value ({context})")
    return [x / -math.expm1(logs[0]) for x in w], 0.0


def ema_checkpoint_weights(n: int, decay: float, init: str = "first") -> WeightsAndResidual:
    """EMA updated once per checkpoint, steps ignored (docs/ALGORITHMS.md §2.4).

    Args:
        n: Number of checkpoints (>= 1).
        decay: beta in [0, 1].
        init: ``"first"`` (start at checkpoint 1, like torch ``AveragedModel``), ``"bias-correct"`` (zero start
            divided by ``1 - beta**n``; error for beta = 1) or ``"zero"`` (zero start, residual ``beta**n``).

    Returns:
        ``(w, residual)``.
    """
    n = check_integer("n", n, 1)
    log_beta = _log(check_number("decay", decay, 0.0, 1.0))
    logs = [_times_log(n - k, log_beta) for k in range(n + 1)]
    return _weights_from_logs(logs, check_choice("init", init, INITS), f"decay={decay!r}")


def _timm_unchecked(step: int, decay: float, warmup: bool, gamma: float, power: float, floor: float,
                    after: int) -> float:
    k = max(0, step - after - 1)
    if k <= 0:
        return 0.0
    if not warmup:
        return decay
    return max(min(1.0 - float((1.0 + k / gamma) ** -power), decay), floor)


def _check_timm(decay: float, gamma: float, power: float, min_decay: float, after: int) -> None:
    check_number("decay", decay, 0.0, 1.0)
    check_number("warmup_gamma", gamma, 0.0, open_lo=True)
    check_number("warmup_power", power, 0.0, open_lo=True)
    check_number("min_decay", min_decay, 0.0, 1.0)
    check_integer("update_after_step", after, 0)


def timm_decay(step: int, decay: float, *, warmup: bool = False, warmup_gamma: float = 1.0,
               warmup_power: float = 2 / 3, min_decay: float = 0.0, update_after_step: int = 0) -> float:
    """The decay of timm ``ModelEmaV3.get_decay(step)`` (docs/ALGORITHMS.md §2.1).

    Args:
        step: Optimizer steps completed (>= 0), counted from 1 like timm ``train.py``.
        decay: Target decay in [0, 1].
        warmup, warmup_gamma, warmup_power, min_decay, update_after_step: timm's ``use_warmup`` and the others of
            the same name (gamma and power > 0; min_decay in [0, 1], acting with warmup only; after-step >= 0).

    Returns:
        0.0 (copy) if ``k = max(0, step - update_after_step - 1)`` is 0, else ``decay``, or with warmup
        ``max(min(1 - (1 + k/warmup_gamma) ** -warmup_power, decay), min_decay)``.
    """
    _check_timm(decay, warmup_gamma, warmup_power, min_decay, update_after_step)
    step = check_integer("step", step, 0)
    return _timm_unchecked(step, decay, warmup, warmup_gamma, warmup_power, min_decay, update_after_step)


def _check_steps(steps: Sequence[int], s0: int, *, allow_equal: bool = False) -> list[int]:
    out = [check_integer(f"steps[{i}]", s) for i, s in enumerate(steps)]
    if not out:
        raise PlanError("steps is empty: at least one checkpoint step is needed")
    for i in range(1, len(out)):
        if out[i] <= out[i - 1]:
            raise PlanError(f"steps must be strictly increasing: steps[{i - 1}] = {out[i - 1]}, steps[{i}] = {out[i]}")
    if out[0] < s0 or (out[0] == s0 and not allow_equal):
        raise PlanError(f"steps[0] = {out[0]} must be {'>=' if allow_equal else '>'} the start step s0 = {s0}")
    return out


def hold_bounds(steps: Sequence[int], hold: str, s0: int = 0) -> list[int]:
    """Boundaries ``[b_0, ..., b_N]``: checkpoint k stands for steps ``b_{k-1} < t <= b_k`` (docs/ALGORITHMS.md §2.3).

    Args:
        steps: Checkpoint steps, strictly increasing integers, ``steps[0] > s0``.
        hold: ``"backward"`` (``b_k = s_k``), ``"midpoint"`` (``(s_k + s_{k+1}) // 2``) or ``"forward"``
            (``s_{k+1} - 1``), for k < N.
        s0: Step at which the EMA starts.

    Returns:
        N + 1 non-decreasing boundaries, ``b_0 = s0`` and ``b_N = steps[-1]``.
    """
    hold = check_choice("hold", hold, HOLDS)
    s = _check_steps(steps, check_integer("s0", s0))
    pairs = list(zip(s[:-1], s[1:], strict=True))
    inner = {"backward": s[:-1], "midpoint": [(a + b) // 2 for a, b in pairs], "forward": [b - 1 for _, b in pairs]}
    return [int(s0), *inner[hold], s[-1]]


def _timm_log_survival(bounds: Sequence[int], total: int, sched: _Sched) -> list[float]:
    """``log P(b) = sum_{b < r <= total} log d_r`` for timm decays ``d_r``, for each b in ``bounds``."""
    decay, warmup, gamma, power, floor, after = sched
    final = max(decay, floor) if warmup else decay
    lo, hi = 1, total + 1  # first step from which d_r stays at `final` (d_r never decreases once k >= 1)
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if _timm_unchecked(mid, *sched) == final else (mid + 1, hi)
    dense = lo - 1  # steps 1..dense get their own log d_r, summed by a float64 reverse cumulative sum
    if dense > DENSE_STEPS_MAX:
        raise PlanError(f"this EMA schedule (warmup or update_after_step) changes its decay at every step up to "
                        f"step {dense}, past the {DENSE_STEPS_MAX} steps ckptavg evaluates one by one; use a decay "
                        "the warmup reaches sooner, or a smaller update_after_step.",
                        params=("warmup", "update_after_step"))
    suffix_at = {min(b, dense) for b in bounds}  # the suffix sums wanted: sum of log d_r for b < r <= dense
    found = {dense: 0.0}
    carry = torch.zeros(1, dtype=torch.float64)
    # chunks of steps start+1..stop from the last, each reverse-summed on from the sum after it
    for start in range((dense - 1) // DENSE_CHUNK * DENSE_CHUNK, -1, -DENSE_CHUNK):
        stop = min(start + DENSE_CHUNK, dense)
        log_d = _timm_log_decays(start + 1, stop, sched)
        # the carry leads the chunk's cumulative sum, so the additions are those of one sum over all steps
        sums = torch.cat([carry, log_d.flip(0)]).cumsum(0).flip(0)  # sums[i] = sum over steps > start + i
        found.update({b: sums[b - start].item() for b in suffix_at if start <= b < stop})
        carry = sums[:1]
    return [_times_log(total - max(b, dense), _log(final)) + found[min(b, dense)] for b in bounds]


def _timm_log_decays(first: int, last: int, sched: _Sched) -> torch.Tensor:
    """``log d_r`` for steps ``r = first..last`` of a timm schedule, in float64."""
    decay, warmup, gamma, power, floor, after = sched
    k = (torch.arange(first, last + 1, dtype=torch.float64) - after - 1).clamp(min=0)
    if warmup:
        x = (1.0 + k / gamma) ** -power
        d = (1.0 - x).clamp(max=decay).clamp(min=floor)
        log_d = torch.where(d == 1.0 - x, torch.log1p(-x), torch.log(d))
    else:
        log_d = torch.full_like(k, _log(decay))
    return torch.where(k > 0, log_d, -math.inf)


def ema_step_weights(steps: Sequence[int], decay: float, *, hold: str = "backward", init: str = "first",
                     warmup: bool = False, warmup_gamma: float = 1.0, warmup_power: float = 2 / 3,
                     min_decay: float = 0.0, update_after_step: int = 0) -> WeightsAndResidual:
    """Per-step EMA over sparse checkpoints: ``W_k = P(b_k) - P(b_{k-1})`` (docs/ALGORITHMS.md §2.2, §2.3).

    The EMA starts at s0 = 0 and updates at steps ``r = 1..T = steps[-1]``; ``P(s) = prod_{r > s} d_r`` and
    ``R = P(0)`` stays on the initial value. Without warmup or update_after_step, ``d_r = decay`` for every r
    (closed form with expm1/log1p); otherwise ``d_r = timm_decay(r, ...)``, whose first update copies (R = 0).

    Args:
        steps: Checkpoint steps, strictly increasing integers > 0.
        decay: Decay in [0, 1].
        hold: Block boundaries, see `hold_bounds`.
        init: ``"first"`` (``W_1 += R``), ``"bias-correct"`` (``W / (1 - R)``, error if R = 1) or ``"zero"``.
        warmup, warmup_gamma, warmup_power, min_decay, update_after_step: As in `timm_decay`.

    Returns:
        ``(W, residual)`` with ``sum(W) + residual = 1``; the residual is R for ``"zero"``, else 0.0.
    """
    _check_timm(decay, warmup_gamma, warmup_power, min_decay, update_after_step)
    init = check_choice("init", init, INITS)
    bounds = hold_bounds(steps, hold, 0)
    total = bounds[-1]
    if warmup or update_after_step:
        sched = (decay, warmup, warmup_gamma, warmup_power, min_decay, update_after_step)
        logs = _timm_log_survival(bounds, total, sched)
    else:
        logs = [_times_log(total - b, _log(decay)) for b in bounds]
    return _weights_from_logs(logs, init, f"decay={decay!r}")


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """EDM2 power-EMA exponent: largest real root of ``g^3 + 7g^2 + (16 - s^-2) g + 12 - s^-2`` (docs/ALGORITHMS.md §4.1).

    Args:
        sigma_rel: Relative width s, ``0 < s < 1/sqrt(12) = 0.288675`` (gamma > 0).

    Returns:
        gamma, bisected to the last bit on ``[0, 1/s]``, where the cubic changes sign once.
    """
    if not isinstance(sigma_rel, Real) or isinstance(sigma_rel, bool) or not 0.0 < sigma_rel < SIGMA_REL_MAX:
        raise PlanError(f"sigma_rel must be in (0, {SIGMA_REL_MAX:.6f}) (gamma > 0), got {sigma_rel!r}")
    sigma = float(sigma_rel)  # the cubic's sign is that of ((g+2) s)^2 (g+3) - (g+1), which cannot overflow
    lo, hi = 0.0, 1.0 / sigma
    while True:
        mid = 0.5 * (lo + hi)
        if mid <= lo or mid >= hi:
            return mid
        lo, hi = (mid, hi) if ((mid + 2.0) * sigma) ** 2 * (mid + 3.0) < mid + 1.0 else (lo, mid)


def power_weights(steps: Sequence[int], sigma_rel: float, *, hold: str = "backward", init: str = "first") -> WeightsAndResidual:
    """Power-function EMA over raw checkpoints, ``P(s) = (s/T)^(gamma+1)``, ``T = steps[-1]`` (docs/ALGORITHMS.md §4.3).

    The EMA starts at the first checkpoint, so its initial mass is ``R = P(steps[0])`` (the profile's mass on
    training before it). ``"first"`` gives R to checkpoint 1: exactly ``W_k = (b_k/T)^(g+1) - (b_{k-1}/T)^(g+1)``
    with ``b_0 = 0`` for every hold. ``"bias-correct"``: ``W_1 = P(b_1) - R``, all divided by ``1 - R``.
    ``"zero"``: ``W_1 = P(b_1) - R`` and R is returned as the residual.

    Args:
        steps: Strictly increasing integers >= 0 (step 0 has an empty backward block: weight 0).
        sigma_rel: Relative width, see `sigma_rel_to_gamma`.
        hold, init: See `hold_bounds` and above.

    Returns:
        ``(W, residual)``; one checkpoint gets ``([1.0], 0.0)``.
    """
    gamma = sigma_rel_to_gamma(sigma_rel)
    hold, init = check_choice("hold", hold, HOLDS), check_choice("init", init, INITS)
    s = _check_steps(steps, 0, allow_equal=True)
    if len(s) == 1:
        return [1.0], 0.0
    bounds = hold_bounds(s, hold, s0=-1)[1:]
    logs = [(gamma + 1.0) * _log(b / s[-1]) for b in [s[0], *bounds]]
    return _weights_from_logs(logs, init, f"sigma_rel={sigma_rel!r}")
