"""Model soups (Wortsman et al. 2022, arXiv 2203.05482): uniform, or greedy with a user evaluation function.

Greedy: rank the checkpoints by their own score, start the soup with the best, and add each next
one only if the uniform average of the soup with it scores at least as well (`strict`: better).
Every candidate is built in memory and passed to the function as a state dict.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ..errors import PlanError
from .base import Entry, Plan, TensorAccess, WeightMatrix, register

Evaluate = Callable[[dict[str, torch.Tensor]], float]


@register
@dataclass(frozen=True)
class Soup(Plan):
    """Greedy (default) or uniform soup.

    Attributes:
        evaluate: ``fn(state_dict) -> float``, higher is better with ``mode="max"``; required unless uniform.
        mode: ``max`` or ``min`` (for losses).
        uniform: average every selected checkpoint (the score is reported when `evaluate` is given).
        strict: add a checkpoint only if it improves the score (the official code); default also on ties (the paper).
        name: how `evaluate` is recorded in the output metadata (e.g. ``evals.py:accuracy``).
    """

    method: ClassVar[str] = "soup"
    summary: ClassVar[str] = "Model soup: greedy (keep a checkpoint only if the average scores no worse) or uniform."
    paper: ClassVar[str] = "arXiv:2203.05482"
    evaluate: Evaluate | None = field(default=None, compare=False, repr=False)
    mode: str = "max"
    uniform: bool = False
    strict: bool = False
    name: str | None = None

    def __post_init__(self) -> None:
        if self.mode not in ("max", "min"):
            raise PlanError(f"mode must be max or min, not {self.mode!r}.", params=("mode",))
        if self.evaluate is None and not self.uniform:
            raise PlanError("a greedy soup needs evaluate, a function scoring a state dict (or pass uniform).",
                            params=("evaluate", "uniform"))

    def params(self) -> dict[str, Any]:
        fn = self.name or getattr(self.evaluate, "__qualname__", None)
        return {"eval": fn, "mode": self.mode, "uniform": self.uniform, "strict": self.strict}

    def weights(self, ckpts: Sequence[Entry], data: TensorAccess | None = None) -> WeightMatrix:
        self.check_count(len(ckpts))
        if self.evaluate is not None:
            assert data is not None, "an evaluated soup reads tensors: pass a TensorAccess"
        n = len(ckpts)
        if self.uniform:
            scores: list[dict[str, Any]] = []
            if self.evaluate is not None:
                scores.append(self._record(ckpts, data, range(n), "uniform", accepted=True, done=(1, 1)))
            return WeightMatrix.single([1.0 / n] * n, details={"scores": scores} if scores else None)
        singles = [self._record(ckpts, data, [i], "single", accepted=False, done=(i + 1, 2 * n - 1)) for i in range(n)]
        sign = 1.0 if self.mode == "max" else -1.0
        ranked = sorted(range(n), key=lambda i: -sign * singles[i]["score"])  # stable: ties keep checkpoint order
        soup = [ranked[0]]
        singles[ranked[0]]["accepted"] = True
        best = singles[ranked[0]]["score"]
        trials: list[dict[str, Any]] = []
        for j, i in enumerate(ranked[1:]):
            trial = self._record(ckpts, data, sorted(soup + [i]), "candidate", accepted=False, done=(n + j + 1, 2 * n - 1))
            gain = sign * (trial["score"] - best)
            if gain > 0 or (gain == 0 and not self.strict):
                soup.append(i)
                best = trial["score"]
                trial["accepted"] = True
            trials.append(trial)
        weights = tuple(1.0 / len(soup) if i in soup else 0.0 for i in range(n))
        return WeightMatrix.single(weights, details={"scores": singles + trials})

    def _record(self, ckpts: Sequence[Entry], data: TensorAccess | None, members: Sequence[int], kind: str,
                accepted: bool, done: tuple[int, int]) -> dict[str, Any]:
        """Evaluate the uniform average of `members`; `done` is (evaluations so far, of how many) for progress."""
        assert data is not None
        record = {"kind": kind, "members": [str(ckpts[i].path) for i in members],
                  "score": self._score(data.average(members), " + ".join(ckpts[i].name for i in members)),
                  "accepted": accepted}
        data.progress("evaluations", *done)
        return record

    def _score(self, state: dict[str, torch.Tensor], label: str) -> float:
        assert self.evaluate is not None
        try:
            value = self.evaluate(state)
        except Exception as e:  # noqa: BLE001 - the user's function failed: report it as one line
            raise PlanError(f"evaluate failed on {label}: {type(e).__name__}: {e}", params=("evaluate",)) from e
        try:
            score = float(value)
        except (TypeError, ValueError):
            raise PlanError(f"evaluate must return a number, but returned {value!r} for {label}.", params=("evaluate",)) from None
        if not math.isfinite(score):
            raise PlanError(f"evaluate returned {score} for {label}; scores must be finite.", params=("evaluate",))
        return score
