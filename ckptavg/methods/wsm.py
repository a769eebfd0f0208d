"""WSM: merge weights that emulate a learning-rate decay over the merged checkpoints (docs/ALGORITHMS.md §10).

Owns the decay shapes f on [0, 1], Megatron-LM's discretisation of a shape into merge coefficients, the
positions at which a shape is evaluated (evenly spaced, or the checkpoints' step fractions), and the `Wsm` plan.
Pure float64 maths on metadata; no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from ..errors import PlanError, listing
from .base import Entry, Plan, TensorAccess, WeightMatrix, Weights, register

SHAPES = ("linear", "minus-sqrt", "cosine", "exponential", "step", "inverse-sqrt")
DEFAULT_GAMMA = 0.1  # multi-step drop factor, torch MultiStepLR's default
DEFAULT_TIMESCALE = 1.0

# Which optional parameter each shape reads (a parameter no chosen shape reads is an error).
_USES = {"final": "cosine", "factor": "exponential", "milestones": "step", "gamma": "step", "timescale": "inverse-sqrt"}

Shape = Callable[[float], float]


def canonical_shape(name: str) -> str:
    """The shape's name as in `SHAPES` (``minus_sqrt`` is accepted for ``minus-sqrt``).

    Raises:
        PlanError: for a name that is not a shape.
    """
    key = name.strip().lower().replace("_", "-") if isinstance(name, str) else name
    if key not in SHAPES:
        raise PlanError(f"schedule must be one of {', '.join(SHAPES)}; got {name!r}.", params=("schedule",))
    return str(key)


def decay_shape(name: str, *, intervals: int = 1, final: float = 0.0, factor: float = 0.5,
                milestones: Sequence[float] = (), gamma: float = DEFAULT_GAMMA,
                timescale: float = DEFAULT_TIMESCALE) -> Shape:
    """A decay shape f on [0, 1] with f(0) = 1, non-increasing and >= 0 for valid parameters (docs/ALGORITHMS.md §10).

    * ``linear``: ``f(x) = 1 - x``; ``minus-sqrt``: ``f(x) = 1 - sqrt(x)`` (Megatron-LM's two shapes).
    * ``cosine``: ``f(x) = F + (1 - F) (1 + cos(pi x)) / 2``, F = `final`, the fraction left at x = 1.
    * ``exponential``: ``f(x) = factor ** (x * K)`` with K = `intervals`, the number of intervals between the
      merged checkpoints (n - 1): the rate shrinks by `factor` per checkpoint interval, like ExponentialLR
      stepped once per save. For n = 5 this is §10's ``0.5 ** (4x)``.
    * ``step``: ``f(x) = gamma ** #{m in milestones : m <= x}`` (MultiStepLR with milestones as fractions).
    * ``inverse-sqrt``: ``f(x) = 1 / sqrt(1 + x / timescale)``: an inverse-square-root schedule
      ``eta(t) = eta_0 sqrt(w / t)`` whose decay starts after w warmup steps, with x the position in a window
      of L steps and ``timescale = w / L``.

    Args:
        name: One of `SHAPES`.
        intervals: K of ``exponential`` (>= 0).
        final, factor, milestones, gamma, timescale: The parameters above (not checked here: see `Wsm`).

    Returns:
        f as a function of x.
    """
    shape = canonical_shape(name)
    if shape == "linear":
        return lambda x: 1.0 - x
    if shape == "minus-sqrt":
        return lambda x: 1.0 - math.sqrt(x)
    if shape == "cosine":
        return lambda x: final + (1.0 - final) * (1.0 + math.cos(math.pi * x)) / 2.0
    if shape == "exponential":
        return lambda x: float(factor ** (x * intervals))
    if shape == "step":
        return lambda x: float(gamma ** sum(1 for m in milestones if m <= x))
    return lambda x: 1.0 / math.sqrt(1.0 + x / timescale)


def merge_coefficients(decays: Sequence[float]) -> list[float]:
    """Megatron-LM's discretisation: decay factors ``d_0 .. d_{n-1}`` to merge coefficients (docs/ALGORITHMS.md §10).

    ``c_{n-1} = d_{n-1}``, ``c_i = d_i - d_{i+1}`` for 1 <= i <= n-2 and ``c_0 = 1 - sum_{i>=1} c_i``
    (= ``1 - d_1``: the oldest checkpoint carries the first drop). ``d_0`` is not used; n = 1 gives ``[1.0]``.

    Args:
        decays: The shape evaluated at each checkpoint's position, oldest first.

    Returns:
        n coefficients summing to 1, non-negative when the decays do not increase and lie in [0, 1].
    """
    n = len(decays)
    if n <= 1:
        return [1.0] * n
    coefficients = [0.0] * n
    coefficients[-1] = float(decays[-1])
    for i in range(1, n - 1):
        coefficients[i] = decays[i] - decays[i + 1]
    coefficients[0] = 1.0 - sum(coefficients)  # coefficients[0] is still 0.0: the sum runs over i >= 1, in order
    return coefficients


def even_fractions(n: int) -> list[float]:
    """Megatron-LM's positions ``x_i = i / n``, i = 0 .. n-1, for evenly spaced checkpoints."""
    return [i / n for i in range(n)]


def step_fractions(steps: Sequence[int]) -> list[float]:
    """Positions from the checkpoints' steps: ``x_i = (s_i - s_0) / (s_{n-1} - s_0 + D)`` with D the mean spacing
    ``(s_{n-1} - s_0) / (n - 1)``, i.e. ``x_i = (s_i - s_0)(n - 1) / ((s_{n-1} - s_0) n)``.

    The window runs from the oldest checkpoint to one mean interval past the newest, as Megatron's i/n grid
    does for even spacing; computed as one division of exact integers, so evenly spaced steps give i/n bit
    for bit.

    Args:
        steps: Strictly increasing integers.

    Returns:
        n positions in [0, 1); ``[0.0]`` for one checkpoint.
    """
    s = [int(v) for v in steps]
    for i in range(1, len(s)):
        if s[i] <= s[i - 1]:
            raise PlanError(f"by_step needs strictly increasing steps, got {s[i - 1]} then {s[i]}.", params=("by_step",))
    n = len(s)
    if n <= 1:
        return [0.0] * n
    span = s[-1] - s[0]
    return [(v - s[0]) * (n - 1) / (span * n) for v in s]


@register
@dataclass(frozen=True)
class Wsm(Plan):
    """Weights that emulate a learning-rate decay of shape `schedule` over the selected window (WSM, §10).

    Each shape is evaluated at the checkpoints' positions (i/n, or their step fractions with `by_step`) and
    turned into coefficients exactly as Megatron-LM's ``schedule_to_merge_coefficients``; `reverse` reverses
    them (Megatron's ``__reverse`` ablation). Several shapes give one output row per shape.

    Attributes:
        schedule: One shape of `SHAPES` or a tuple of them (a sweep). Default ``minus-sqrt``, the cooldown
            shape Megatron-LM and WSM use.
        final: ``cosine``'s final fraction F in [0, 1] (default 0).
        factor: ``exponential``'s factor per checkpoint interval, in (0, 1]; required for that shape.
        milestones: ``step``'s drop positions, strictly increasing fractions in (0, 1); required for that shape.
        gamma: ``step``'s factor per milestone, in [0, 1] (default 0.1).
        timescale: ``inverse-sqrt``'s warmup length relative to the window, > 0 (default 1).
        reverse: Reverse the coefficients (newest checkpoint gets the oldest's).
        by_step: Evaluate the shape at step fractions (see `step_fractions`) instead of i/n; needs steps.
    """

    method: ClassVar[str] = "wsm"
    summary: ClassVar[str] = "Merge weights that emulate a learning-rate decay over the checkpoints (WSM)."
    paper: ClassVar[str] = "arXiv:2507.17634 (WSM); Megatron-LM tools/checkpoint/weighted_merge.py"
    schedule: str | tuple[str, ...] = "minus-sqrt"
    final: float | None = None
    factor: float | None = None
    milestones: tuple[float, ...] = ()
    gamma: float | None = None
    timescale: float | None = None
    reverse: bool = False
    by_step: bool = False

    def __post_init__(self) -> None:
        shapes = self.shapes
        if not shapes:
            raise PlanError("schedule needs at least one shape.", params=("schedule",))
        if len(set(shapes)) != len(shapes):
            raise PlanError(f"schedule names a shape twice: {', '.join(shapes)}; give each once.", params=("schedule",))
        for param, shape in _USES.items():
            if getattr(self, param) not in (None, ()) and shape not in shapes:
                raise PlanError(f"{param} applies to schedule {shape!r} only, which is not among {', '.join(shapes)}; "
                                f"drop {param} or add {shape} to schedule.", params=(param, "schedule"))
        _check_range("final", self.final, 0.0, 1.0)
        _check_range("gamma", self.gamma, 0.0, 1.0)
        _check_range("factor", self.factor, 0.0, 1.0, open_lo=True)
        _check_range("timescale", self.timescale, 0.0, math.inf, open_lo=True)
        if "exponential" in shapes and self.factor is None:
            raise PlanError("schedule 'exponential' needs factor, the decay per checkpoint interval in (0, 1], "
                            "e.g. 0.5.", params=("factor", "schedule"))
        if "step" in shapes and not self.milestones:
            raise PlanError("schedule 'step' needs milestones, fractions of the window in (0, 1), e.g. 0.5,0.75.",
                            params=("milestones", "schedule"))
        ms = list(self.milestones)
        if any(not isinstance(m, int | float) or isinstance(m, bool) or not 0.0 < m < 1.0 for m in ms) or \
                any(b <= a for a, b in zip(ms, ms[1:], strict=False)):
            raise PlanError(f"milestones must be strictly increasing fractions in (0, 1), not {ms}.", params=("milestones",))

    @property
    def shapes(self) -> tuple[str, ...]:
        """The shapes of `schedule`, by their names in `SHAPES`, in the order given."""
        names = (self.schedule,) if isinstance(self.schedule, str) else tuple(self.schedule)
        return tuple(canonical_shape(n) for n in names)

    def params(self) -> dict[str, Any]:
        shapes = self.shapes
        out: dict[str, Any] = {"schedule": shapes[0] if len(shapes) == 1 else list(shapes)}
        out.update({p: v for p, v in self._shape_args().items() if _USES.get(p) in shapes})
        return {**out, "reverse": self.reverse, "by_step": self.by_step}

    def _shape_args(self) -> dict[str, Any]:
        return {"final": 0.0 if self.final is None else self.final, "factor": self.factor,
                "milestones": list(self.milestones), "gamma": DEFAULT_GAMMA if self.gamma is None else self.gamma,
                "timescale": DEFAULT_TIMESCALE if self.timescale is None else self.timescale}

    def coefficients(self, shape: str, fractions: Sequence[float]) -> list[float]:
        """The merge coefficients of one shape at the given positions (oldest first), reversed if asked."""
        args = self._shape_args()
        f = decay_shape(shape, intervals=max(len(fractions) - 1, 0), final=args["final"],
                        factor=1.0 if args["factor"] is None else args["factor"], milestones=self.milestones,
                        gamma=args["gamma"], timescale=args["timescale"])
        c = merge_coefficients([f(x) for x in fractions])
        return c[::-1] if self.reverse else c

    def weights(self, ckpts: Sequence[Entry], data: TensorAccess | None = None) -> WeightMatrix:
        self.check_count(len(ckpts))
        n = len(ckpts)
        if self.by_step and n > 1:
            missing = [c.name for c in ckpts if c.meta.step is None]
            if missing:
                raise PlanError(f"by_step needs the step of every checkpoint, but it is unknown for {listing(missing, 5)}; "
                                "drop by_step to assume evenly spaced checkpoints.", params=("by_step",))
            fractions = step_fractions([int(c.meta.step) for c in ckpts if c.meta.step is not None])
            spacing = "by step: x_i = (s_i - s_0)(n - 1) / ((s_{n-1} - s_0) n)"
        else:
            fractions, spacing = even_fractions(n), "even: x_i = i / n"
        details = {"spacing": spacing, "positions": fractions}
        shapes = self.shapes
        if len(shapes) == 1:
            return WeightMatrix.single(self.coefficients(shapes[0], fractions), details=details)
        rows = tuple(Weights(tuple(self.coefficients(s, fractions)), name=f"schedule={s}", params={"schedule": s})
                     for s in shapes)
        return WeightMatrix(rows, details)


def _check_range(name: str, value: float | None, lo: float, hi: float, *, open_lo: bool = False) -> None:
    if value is None:
        return
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and lo <= value <= hi
    if not ok or (open_lo and value == lo):
        interval = f"{'(' if open_lo else '['}{lo:g}, {hi:g}{']' if math.isfinite(hi) else ')'}"
        raise PlanError(f"{name} must be a number in {interval}, not {value!r}.", params=(name,))
