"""Weighting plans: each averaging method is a small frozen value, validated when it is built.

A plan turns the ordered, selected checkpoints into one weight per checkpoint (plus any residual
mass the method leaves on an initial value) before a single tensor is read.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any, ClassVar

from . import schedules
from .errors import CkptavgWarning, PlanError, listing
from .sources import Checkpoint


@dataclass(frozen=True)
class Group:
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
    groups: tuple[Group, ...] = ()
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


@register
@dataclass(frozen=True)
class Swa(Plan):
    """Uniform average (stochastic weight averaging, Izmailov et al. 2018, arXiv 1803.05407)."""

    method: ClassVar[str] = "swa"

    def weights(self, ckpts: Sequence[Checkpoint]) -> Weights:
        self.check_count(len(ckpts))
        n = len(ckpts)
        return Weights(tuple(1.0 / n for _ in range(n)))


HOLDS, INITS = schedules.HOLDS, schedules.INITS


@register
@dataclass(frozen=True)
class Ema(Plan):
    """EMA weights computed in closed form: per checkpoint (`decay`), per optimizer step (`step_decay`,
    optionally with timm's warmup), or EDM2's power-function profile (`sigma_rel`). Exactly one of the three.

    Options left as None take their documented defaults; the step and power modes read step metadata.
    """

    method: ClassVar[str] = "ema"
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
            raise PlanError("ema needs exactly one of --decay, --step-decay or --sigma-rel"
                            + (f" (got {', '.join('--' + g.replace('_', '-') for g in given)})." if given else "."))
        for name in ("decay", "step_decay", "min_decay"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value <= 1.0:
                raise PlanError(f"--{name.replace('_', '-')} must be between 0 and 1, not {value}.")
        if self.sigma_rel is not None:
            schedules.sigma_rel_to_gamma(self.sigma_rel)  # validates the range
        timm_options = self.warmup or self.update_after_step != 0 or self.min_decay != 0.0
        if timm_options and self.step_decay is None:
            raise PlanError("--warmup, --min-decay and --update-after-step apply to per-step EMA only "
                            "(--step-decay B, or --decay B --per step).")
        if self.warmup_gamma <= 0 or self.warmup_power <= 0 or self.update_after_step < 0:
            raise PlanError("--warmup-gamma and --warmup-power must be > 0 and --update-after-step >= 0.")
        if self.hold not in HOLDS:
            raise PlanError(f"--hold must be one of {', '.join(HOLDS)}, not {self.hold!r}.")
        if self.init not in INITS:
            raise PlanError(f"--init must be one of {', '.join(INITS)}, not {self.init!r}.")

    def params(self) -> dict[str, Any]:
        if self.decay is not None:
            return {"decay": self.decay, "per": "checkpoint", "init": self.init}
        if self.sigma_rel is not None:
            return {"sigma_rel": self.sigma_rel, "gamma": schedules.sigma_rel_to_gamma(self.sigma_rel),
                    "hold": self.hold, "init": self.init}
        return {"step_decay": self.step_decay, "per": "step", "warmup": self.warmup,
                "warmup_gamma": self.warmup_gamma, "warmup_power": self.warmup_power, "min_decay": self.min_decay,
                "update_after_step": self.update_after_step, "hold": self.hold, "init": self.init}

    def weights(self, ckpts: Sequence[Checkpoint]) -> Weights:
        self.check_count(len(ckpts))
        if self.decay is not None:
            values, residual = schedules.ema_checkpoint_weights(len(ckpts), self.decay, self.init)
            return Weights(tuple(values), residual)
        steps = _steps(ckpts, "per-step EMA (--step-decay)" if self.step_decay is not None else "--sigma-rel")
        if self.sigma_rel is not None:
            values, residual = schedules.power_weights(steps, self.sigma_rel, hold=self.hold, init=self.init)
        else:
            assert self.step_decay is not None
            values, residual = schedules.ema_step_weights(
                steps, self.step_decay, hold=self.hold, init=self.init, warmup=self.warmup,
                warmup_gamma=self.warmup_gamma, warmup_power=self.warmup_power, min_decay=self.min_decay,
                update_after_step=self.update_after_step,
            )
        return Weights(tuple(values), residual)


def _steps(ckpts: Sequence[Checkpoint], why: str) -> list[int]:
    missing = [c.name for c in ckpts if c.meta.step is None]
    if missing:
        raise PlanError(f"{why} needs the optimizer step of every checkpoint, but it is unknown for "
                        f"{listing(missing, 5)}; use --decay B (--per checkpoint, the "
                        "default) for one update per checkpoint instead.")
    steps = [c.meta.step for c in ckpts]
    for a, b, ca, cb in zip(steps, steps[1:], ckpts, ckpts[1:], strict=False):
        if b is not None and a is not None and b <= a:
            raise PlanError(f"{why} needs strictly increasing steps, but {ca.name} and {cb.name} are at "
                            f"steps {a} and {b}.")
    return [int(s) for s in steps if s is not None]


@register
@dataclass(frozen=True)
class Linear(Plan):
    """User-given weights, one per selected checkpoint in order; `normalize` divides them by their sum."""

    method: ClassVar[str] = "linear"
    values: tuple[float, ...] = ()
    normalize: bool = False

    def __post_init__(self) -> None:
        if not self.values:
            raise PlanError("linear needs --weights, e.g. --weights 0.2,0.3,0.5.")
        if any(w != w or w in (float("inf"), float("-inf")) for w in self.values):
            raise PlanError(f"--weights must be finite numbers, not {list(self.values)}.")
        if self.normalize and sum(self.values) == 0:
            raise PlanError("--normalize needs weights whose sum is not 0.")

    def params(self) -> dict[str, Any]:
        return {"weights": list(self.values), "normalize": self.normalize}

    def weights(self, ckpts: Sequence[Checkpoint]) -> Weights:
        if len(self.values) != len(ckpts):
            raise PlanError(f"--weights has {len(self.values)} values but {len(ckpts)} checkpoints were "
                            "selected; give one weight per checkpoint (see `ckptavg plan linear`).")
        values = self.values
        if self.normalize:
            total = sum(values)
            values = tuple(w / total for w in values)
        else:
            if any(w < 0 for w in values):
                warnings.warn(f"negative weights {list(values)}; pass --normalize to silence this if intended.",
                              CkptavgWarning, stacklevel=2)
            if abs(sum(values) - 1) > 1e-9:
                warnings.warn(f"weights sum to {sum(values):.6g}, not 1, so the result is scaled; "
                              "pass --normalize to divide by their sum.", CkptavgWarning, stacklevel=2)
        return Weights(tuple(values))


def parse_weights(text: str) -> tuple[float, ...]:
    """Parse ``--weights 0.2,0.3,0.5``."""
    try:
        return tuple(float(part) for part in text.replace(" ", "").split(",") if part)
    except ValueError:
        raise PlanError(f"--weights must be comma-separated numbers, not {text!r}.") from None
