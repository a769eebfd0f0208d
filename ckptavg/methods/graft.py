"""Entropy-weighted filter grafting (Meng et al., CVPR 2020, arXiv 2001.05868), generalised to N checkpoints.

Each group of tensors gets its own weights from the histogram entropies of its leading tensor in
every checkpoint: the higher a checkpoint's entropy (the more information its layer carries), the
more weight it gets. The weights need tensor data, so this plan reads the leading tensors once.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..errors import PlanError
from ..layout import TensorSpec
from . import entropy
from .base import Entry, Plan, TensorAccess, WeightMatrix, Weights, register

MODES = ("pairwise", "cyclic", "sequential")
GROUPINGS = ("auto", "conv")


@register
@dataclass(frozen=True)
class Graft(Plan):
    """Per-tensor entropy weights.

    Attributes:
        a, c: the coefficient ``round((a/pi) * atan(c * (H_own - H_donor)) + 0.5, round_digits)``.
        bins: histogram bins of the entropy.
        mode: ``pairwise`` (mean of all two-checkpoint grafts), ``cyclic`` (one round of the paper's ring),
            ``sequential`` (fold in checkpoint order).
        groups: ``auto`` (each floating tensor of 2+ dimensions leads; 0-/1-D tensors follow the one before
            them) or ``conv`` (the reference rule: keys containing "conv" lead, every other key follows).
        round_digits: rounding of each coefficient, as the reference code does; None for no rounding.
    """

    method: ClassVar[str] = "graft"
    summary: ClassVar[str] = "Entropy-weighted filter grafting: each layer weighted by the information its weights carry."
    paper: ClassVar[str] = "arXiv:2001.05868"
    min_checkpoints: ClassVar[int] = 1
    a: float = 0.4
    c: float = 500.0
    bins: int = 10
    mode: str = "pairwise"
    groups: str = "auto"
    round_digits: int | None = 2

    def __post_init__(self) -> None:
        if not 0.0 <= self.a <= 1.0:
            raise PlanError(f"a must be between 0 and 1 (a > 1 would allow negative weights), not {self.a}.", params=("a",))
        if self.c < 0:
            raise PlanError(f"c must be >= 0, not {self.c}.", params=("c",))
        if self.bins < 1:
            raise PlanError(f"bins must be >= 1, not {self.bins}.", params=("bins",))
        if self.mode not in MODES:
            raise PlanError(f"mode must be one of {', '.join(MODES)}, not {self.mode!r}.", params=("mode",))
        if self.groups not in GROUPINGS:
            raise PlanError(f"groups must be one of {', '.join(GROUPINGS)}, not {self.groups!r}.", params=("groups",))
        if self.round_digits is not None and self.round_digits < 0:
            raise PlanError(f"round_digits must be >= 0 or none, not {self.round_digits}.", params=("round_digits",))

    def params(self) -> dict[str, Any]:
        return {"a": self.a, "c": self.c, "bins": self.bins, "mode": self.mode, "groups": self.groups,
                "round_digits": self.round_digits}

    def weights(self, ckpts: Sequence[Entry], data: TensorAccess | None = None) -> WeightMatrix:
        self.check_count(len(ckpts))
        assert data is not None, "graft reads tensors: pass a TensorAccess"
        n = len(ckpts)
        parts = self._partition(data.specs)
        leading = sum(1 for lead, _ in parts if lead is not None)
        groups = []
        for lead, members in parts:
            groups.append(self._group(ckpts, data, lead, members))
            data.progress("entropies", sum(1 for g in groups if g.tensor is not None), leading)
        sizes = {s.name: math.prod(s.shape) for s in data.specs}
        group_sizes = [sum(sizes[m] for m in g.members) for g in groups]
        total = sum(group_sizes)
        mean = [1.0 / n] * n if total == 0 else [
            sum(g.weights[i] * size for g, size in zip(groups, group_sizes, strict=True)) / total for i in range(n)]
        by_tensor = {m: g.weights for g in groups for m in g.members}
        details = {"groups": [dataclasses.asdict(g) | {"members": list(g.members), "entropies": list(g.entropies),
                                                       "weights": list(g.weights)} for g in groups]}
        return WeightMatrix((Weights(tuple(mean), by_tensor=by_tensor),), details)

    def _partition(self, specs: Sequence[TensorSpec]) -> list[tuple[str | None, list[str]]]:
        """Split the floating tensors, in state-dict order, into (leader, members) groups."""
        parts: list[tuple[str | None, list[str]]] = [(None, [])]
        for spec in specs:
            if not spec.averaged:
                continue  # integer and bool tensors are copied, never grafted
            leads = len(spec.shape) >= 2 if self.groups == "auto" else "conv" in spec.name
            if leads:
                parts.append((spec.name, [spec.name]))
            else:
                parts[-1][1].append(spec.name)
        return [p for p in parts if p[1]]

    def _group(self, ckpts: Sequence[Entry], data: TensorAccess, lead: str | None, members: list[str]) -> GraftGroup:
        if lead is None or len(ckpts) == 1:
            return GraftGroup(lead, tuple(members), (), tuple(1.0 / len(ckpts) for _ in ckpts))
        if self.mode == "sequential":
            tensors = [data.load(i, lead) for i in range(len(ckpts))]
            entropies = [self._entropy(c, lead, t) for c, t in zip(ckpts, tensors, strict=True)]
            w = entropy.graft_sequential_weights(
                tensors, a=self.a, c=self.c, bins=self.bins, round_digits=self.round_digits
            )
        else:  # one tensor in memory at a time
            entropies = [self._entropy(c, lead, data.load(i, lead)) for i, c in enumerate(ckpts)]
            w = entropy.graft_weights(entropies, mode=self.mode, a=self.a, c=self.c, round_digits=self.round_digits)
        return GraftGroup(lead, tuple(members), tuple(entropies), tuple(w))

    def _entropy(self, ckpt: Entry, name: str, tensor: torch.Tensor) -> float:
        try:
            return entropy.graft_entropy(tensor, self.bins)
        except PlanError as e:
            raise PlanError(f"{ckpt.name}: '{name}': {e}") from None


@dataclass(frozen=True)
class GraftGroup:
    """Tensors that share one weight vector: the tensor whose entropies set it, and its followers."""

    tensor: str | None
    members: tuple[str, ...]
    entropies: tuple[float, ...]
    weights: tuple[float, ...]
