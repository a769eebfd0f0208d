"""Exponential moving averages in closed form: per checkpoint, per optimizer step (timm), or EDM2's power EMA."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from ..errors import CkptavgWarning, PlanError, listing
from . import schedules
from .base import Entry, Plan, TensorAccess, WeightMatrix, register


@register
@dataclass(frozen=True)
class Ema(Plan):
    """EMA weights computed in closed form: per checkpoint (`decay`), per optimizer step (`step_decay`,
    optionally with timm's warmup), or EDM2's power-function profile (`sigma_rel`). Exactly one of the three.

    Options left as None take their documented defaults; the step and power modes read step metadata.
    """

    method: ClassVar[str] = "ema"
    summary: ClassVar[str] = "Exponential moving average weights over checkpoints, computed in closed form."
    paper: ClassVar[str] = "arXiv:2312.02696 (power-function EMA); timm ModelEmaV3 (per-step EMA)"
    decay: float | None = None
    step_decay: float | None = None
    sigma_rel: float | None = None
    warmup: bool = False
    warmup_gamma: float = 1.0
    warmup_power: float = 2 / 3
    min_decay: float = 0.0
    update_after_step: int = 0
    hold: str = "backward"
    init: str = "first"

    def __post_init__(self) -> None:
        given = [n for n in ("decay", "step_decay", "sigma_rel") if getattr(self, n) is not None]
        if len(given) != 1:
            raise PlanError("ema needs exactly one of decay, step_decay or sigma_rel"
                            + (f" (got {', '.join(given)})." if given else "."), params=("decay", "step_decay", "sigma_rel"))
        for name in ("decay", "step_decay", "min_decay"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value <= 1.0:
                raise PlanError(f"{name} must be between 0 and 1, not {value}.", params=(name,))
        if self.sigma_rel is not None:
            schedules.sigma_rel_to_gamma(self.sigma_rel)  # validates the range
        timm_options = self.warmup or self.update_after_step != 0 or self.min_decay != 0.0
        if timm_options and self.step_decay is None:
            raise PlanError("warmup, min_decay and update_after_step apply to per-step EMA only "
                            "(step_decay B).", params=("warmup", "min_decay", "update_after_step", "step_decay"))
        if self.warmup_gamma <= 0 or self.warmup_power <= 0 or self.update_after_step < 0:
            raise PlanError("warmup_gamma and warmup_power must be > 0 and update_after_step >= 0.",
                            params=("warmup_gamma", "warmup_power", "update_after_step"))
        if self.hold not in schedules.HOLDS:
            raise PlanError(f"hold must be one of {', '.join(schedules.HOLDS)}, not {self.hold!r}.", params=("hold",))
        if self.init not in schedules.INITS:
            raise PlanError(f"init must be one of {', '.join(schedules.INITS)}, not {self.init!r}.", params=("init",))

    def params(self) -> dict[str, Any]:
        if self.decay is not None:
            return {"decay": self.decay, "per": "checkpoint", "init": self.init}
        if self.sigma_rel is not None:
            return {"sigma_rel": self.sigma_rel, "gamma": schedules.sigma_rel_to_gamma(self.sigma_rel),
                    "hold": self.hold, "init": self.init}
        return {"step_decay": self.step_decay, "per": "step", "warmup": self.warmup,
                "warmup_gamma": self.warmup_gamma, "warmup_power": self.warmup_power, "min_decay": self.min_decay,
                "update_after_step": self.update_after_step, "hold": self.hold, "init": self.init}

    def weights(self, ckpts: Sequence[Entry], data: TensorAccess | None = None) -> WeightMatrix:
        self.check_count(len(ckpts))
        if self.decay is not None:
            values, residual = schedules.ema_checkpoint_weights(len(ckpts), self.decay, self.init)
            return WeightMatrix.single(values, residual)
        steps = _steps(ckpts, "per-step EMA (step_decay)" if self.step_decay is not None else "sigma_rel")
        if self.sigma_rel is not None:
            values, residual = schedules.power_weights(steps, self.sigma_rel, hold=self.hold, init=self.init)
        else:
            assert self.step_decay is not None
            values, residual = schedules.ema_step_weights(
                steps, self.step_decay, hold=self.hold, init=self.init, warmup=self.warmup,
                warmup_gamma=self.warmup_gamma, warmup_power=self.warmup_power, min_decay=self.min_decay,
                update_after_step=self.update_after_step,
            )
        return WeightMatrix.single(values, residual)


    def notes(self, ckpts: Sequence[Entry], matrix: WeightMatrix) -> list[CkptavgWarning]:
        out = super().notes(ckpts, matrix)
        mode = next(n for n in ("decay", "step_decay", "sigma_rel") if getattr(self, n) is not None)
        for row in matrix.rows:
            w = row.values
            old = max(range(len(w) - 1), key=lambda i: (w[i], -i), default=None)
            if old is not None and w[old] > w[-1] + 1e-12:
                out.append(CkptavgWarning(
                    f"ema gives {ckpts[old].name} a weight of {w[old]:.3f}, more than the newest checkpoint "
                    f"({ckpts[-1].name}, {w[-1]:.3f}): with {mode} {getattr(self, mode)} the average still leans on "
                    f"the first checkpoints. Shift it to the newer checkpoints with init bias-correct, a smaller {mode}, or "
                    "fewer, later checkpoints (start, last).", params=("init", mode, "start", "last")))
        return out


def _steps(ckpts: Sequence[Entry], why: str) -> list[int]:
    missing = [c.name for c in ckpts if c.meta.step is None]
    if missing:
        raise PlanError(f"{why} needs the optimizer step of every checkpoint, but it is unknown for "
                        f"{listing(missing, 5)}; use decay B for one update per checkpoint instead.",
                        params=("step_decay", "sigma_rel", "decay"))
    steps = [c.meta.step for c in ckpts]
    for a, b, ca, cb in zip(steps, steps[1:], ckpts, ckpts[1:], strict=False):
        if b is not None and a is not None and b <= a:
            raise PlanError(f"{why} needs strictly increasing steps, but {ca.name} and {cb.name} are at "
                            f"steps {a} and {b}.")
    return [int(s) for s in steps if s is not None]
