"""Learning-rate-weighted averages (docs/ALGORITHMS.md §11): ``w_k ∝ sum_{t in block k} eta_t ** p``.

Owns the integration of a learning-rate record over the hold blocks of docs/ALGORITHMS.md §2.3 (a per-step
record such as trainer_state.json's log, or each checkpoint's saved rate held over its block) and the
`LrWeighted` plan. The rates themselves are read with the checkpoints (`ckptavg.read.metadata`).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from ..errors import PlanError, listing
from ..read.lr_records import LR_PLACES
from . import schedules
from .base import Entry, Plan, TensorAccess, WeightMatrix, register


def lr_bounds(steps: Sequence[int], hold: str = "backward") -> list[int]:
    """Hold-block boundaries from step 0: checkpoint k stands for optimizer steps ``b_{k-1} < t <= b_k``.

    As `schedules.hold_bounds` with s0 = 0, except that a first checkpoint at step 0 (before any optimizer step)
    is allowed and gets an empty block.

    Args:
        steps: Strictly increasing integers >= 0.
        hold: ``backward``, ``midpoint`` or ``forward`` (docs/ALGORITHMS.md §2.3).

    Returns:
        N + 1 boundaries, ``b_0 = 0``.
    """
    bounds = schedules.hold_bounds(steps, hold, s0=-1)
    return [0, *bounds[1:]]


def held_block_sums(bounds: Sequence[int], lrs: Sequence[float], power: float) -> list[float]:
    """``(b_k - b_{k-1}) * lr_k ** power``: each checkpoint's saved rate held over its own block."""
    return [(b - a) * lr ** power for a, b, lr in zip(bounds[:-1], bounds[1:], lrs, strict=True)]


def history_block_sums(bounds: Sequence[int], history: Sequence[tuple[int, float]], power: float) -> list[float]:
    """``sum_{b_{k-1} < t <= b_k} eta_t ** power`` for a logged record, summed piece by piece.

    The record is piecewise constant: ``eta_t`` is the rate of the last entry logged at a step <= t; steps
    before the first entry take its rate.

    Args:
        bounds: Non-decreasing block boundaries.
        history: ``(step, lr)`` pairs, strictly increasing steps, at least one.
        power: The exponent p > 0.

    Returns:
        One sum per block.
    """
    starts = [s for s, _ in history]
    rates = [lr ** power for _, lr in history]
    sums = []
    for a, b in zip(bounds, bounds[1:], strict=False):
        total, t = 0.0, a + 1
        j = max(bisect.bisect_right(starts, t) - 1, 0)
        while t <= b:
            end = b if j + 1 >= len(starts) else min(b, starts[j + 1] - 1)
            total += (end - t + 1) * rates[j]
            t, j = end + 1, j + 1
        sums.append(total)
    return sums


def lr_weights(steps: Sequence[int], lrs: Sequence[float] | None = None,
               history: Sequence[tuple[int, float]] = (), *, power: float = 1.0, hold: str = "backward") -> list[float]:
    """Normalised learning-rate weights over hold blocks (docs/ALGORITHMS.md §11).

    Args:
        steps: Checkpoint steps, strictly increasing integers >= 0.
        lrs: Each checkpoint's saved rate, held over its block; used when `history` is empty.
        history: A per-step or per-logging-step record ``(step, lr)``, integrated step by step.
        power: p > 0 (1: step-size weighting; 2: schedule-free's warmup weighting).
        hold: Block boundaries, see `lr_bounds`.

    Returns:
        ``w_k = S_k / sum_j S_j`` with ``S_k = sum_{t in block k} eta_t ** p``.
    """
    if not (isinstance(power, int | float) and not isinstance(power, bool) and math.isfinite(power) and power > 0):
        raise PlanError(f"lr_power must be a finite number > 0, not {power!r}.", params=("lr_power",))
    bounds = lr_bounds(steps, hold)
    if history:
        sums = history_block_sums(bounds, sorted(history), power)
    elif lrs is not None:
        sums = held_block_sums(bounds, lrs, power)
    else:
        raise PlanError("lr_weights needs the saved rates (lrs) or a logged history.")
    total = math.fsum(sums)
    if not total > 0:
        raise PlanError(f"every block has learning rate 0 (or no steps): nothing to weight; steps {list(steps)}.")
    return [s / total for s in sums]


@register
@dataclass(frozen=True)
class LrWeighted(Plan):
    """Average in which each checkpoint counts as the sum of ``lr ** lr_power`` over its block of steps (§11).

    The rates come from the checkpoints: when every checkpoint carries a logged record (trainer_state.json's
    log_history) the merged record is integrated step by step (a newer checkpoint's entry wins at the same
    step); otherwise each checkpoint's saved rate (optimizer or scheduler state; the rate the optimizer held
    when it was saved) is held constant over its block.

    Attributes:
        lr_power: The exponent p > 0: 1 is step-size-weighted (Polyak-Ruppert) averaging, 2 schedule-free's.
        hold: Block boundaries (docs/ALGORITHMS.md §2.3), ``backward`` by default.
    """

    method: ClassVar[str] = "lr"
    summary: ClassVar[str] = "Average weighted by each checkpoint's learning rate, summed over its block of steps."
    paper: ClassVar[str] = "Nemirovski et al. 2009 (step-size-weighted averaging); arXiv:2405.15682 (schedule-free, lr^2)"
    command: ClassVar[str] = "linear"  # `ckptavg linear --weights lr`
    lr_power: float = 1.0
    hold: str = "backward"

    def __post_init__(self) -> None:
        p = self.lr_power
        if not (isinstance(p, int | float) and not isinstance(p, bool) and math.isfinite(p) and p > 0):
            raise PlanError(f"lr_power must be a finite number > 0, not {p!r}.", params=("lr_power",))
        if not isinstance(self.hold, str) or self.hold.replace("_", "-") not in schedules.HOLDS:
            raise PlanError(f"hold must be one of {', '.join(schedules.HOLDS)}, not {self.hold!r}.", params=("hold",))

    def weights(self, ckpts: Sequence[Entry], data: TensorAccess | None = None) -> WeightMatrix:
        self.check_count(len(ckpts))
        steps = _steps(ckpts)
        logged = all(c.meta.lr_history for c in ckpts)
        no_lr = [] if logged else [c.name for c in ckpts if c.meta.lr is None]
        if no_lr:
            raise PlanError(f"learning-rate weights need the learning rate of every checkpoint, but none was found "
                            f"for {listing(no_lr, 5)}; ckptavg looked in: {'; '.join(LR_PLACES)}.")
        details: dict[str, Any] = {
            "lr": [c.meta.lr for c in ckpts], "lr_source": [c.meta.lr_source for c in ckpts], "lr_power": self.lr_power,
        }
        if logged:
            merged: dict[int, float] = {}
            for c in ckpts:
                merged.update(c.meta.lr_history)
            history = sorted(merged.items())
            details["integration"] = f"per step, from the logged record ({len(history)} entries), piecewise constant"
            values = lr_weights(steps, history=history, power=self.lr_power, hold=self.hold)
        else:
            details["integration"] = "each checkpoint's rate held over its block of steps"
            lrs = [float(c.meta.lr) for c in ckpts if c.meta.lr is not None]
            values = lr_weights(steps, lrs, power=self.lr_power, hold=self.hold)
        return WeightMatrix.single(values, details=details)


def _steps(ckpts: Sequence[Entry]) -> list[int]:
    missing = [c.name for c in ckpts if c.meta.step is None]
    if missing:
        raise PlanError(f"learning-rate weights need the optimizer step of every checkpoint (each stands for its block "
                        f"of steps), but it is unknown for {listing(missing, 5)}.")
    steps = [int(c.meta.step) for c in ckpts if c.meta.step is not None]
    for a, b, ca, cb in zip(steps, steps[1:], ckpts, ckpts[1:], strict=False):
        if b <= a:
            raise PlanError(f"learning-rate weights need strictly increasing steps, but {ca.name} and {cb.name} are "
                            f"at steps {a} and {b}.")
    if steps[0] < 0:
        raise PlanError(f"{ckpts[0].name} is at step {steps[0]}; steps must be >= 0.")
    return steps
