"""Entropy-weighted filter grafting (Meng et al., CVPR 2020, arXiv 2001.05868), generalised to N checkpoints.

Each group of tensors gets its own weights from the histogram entropies of its leading tensor in
every checkpoint: the higher a checkpoint's entropy (the more information its layer carries), the
more weight it gets. The weights need tensor data, so this plan reads the leading tensors once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..errors import PlanError
from ..read.checkpoint import Checkpoint
from . import entropy
from .base import GraftGroup, Plan, Weights, register

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
    min_checkpoints: ClassVar[int] = 1
    a: float = 0.4
    c: float = 500.0
    bins: int = 10
    mode: str = "pairwise"
    groups: str = "auto"
    round_digits: int | None = 2

    def __post_init__(self) -> None:
        if not 0.0 <= self.a <= 1.0:
            raise PlanError(f"--a must be between 0 and 1 (a > 1 would allow negative weights), not {self.a}.")
        if self.c < 0:
            raise PlanError(f"--c must be >= 0, not {self.c}.")
        if self.bins < 1:
            raise PlanError(f"--bins must be >= 1, not {self.bins}.")
        if self.mode not in MODES:
            raise PlanError(f"--mode must be one of {', '.join(MODES)}, not {self.mode!r}.")
        if self.groups not in GROUPINGS:
            raise PlanError(f"--groups must be one of {', '.join(GROUPINGS)}, not {self.groups!r}.")
        if self.round_digits is not None and self.round_digits < 0:
            raise PlanError(f"--round-digits must be >= 0 or none, not {self.round_digits}.")

    def params(self) -> dict[str, Any]:
        return {"a": self.a, "c": self.c, "bins": self.bins, "mode": self.mode, "groups": self.groups,
                "round_digits": self.round_digits}

    def weights(self, ckpts: Sequence[Checkpoint]) -> Weights:
        self.check_count(len(ckpts))
        n = len(ckpts)
        uniform = tuple(1.0 / n for _ in range(n))
        groups = [self._group(ckpts, lead, members) for lead, members in self._partition(ckpts[0])]
        sizes = [sum(ckpts[0].tensors[m].numel for m in g.members) for g in groups]
        total = sum(sizes)
        if total == 0:
            return Weights(uniform, groups=tuple(groups))
        mean = [sum(g.weights[i] * size for g, size in zip(groups, sizes, strict=True)) / total for i in range(n)]
        return Weights(tuple(mean), groups=tuple(groups))

    def _partition(self, ref: Checkpoint) -> list[tuple[str | None, list[str]]]:
        """Split the floating tensors, in state-dict order, into (leader, members) groups."""
        parts: list[tuple[str | None, list[str]]] = [(None, [])]
        for name, t in ref.tensors.items():
            if not (t.dtype.is_floating_point or t.dtype.is_complex):
                continue  # integer and bool tensors are copied, never grafted
            leads = len(t.shape) >= 2 if self.groups == "auto" else "conv" in name
            if leads:
                parts.append((name, [name]))
            else:
                parts[-1][1].append(name)
        return [p for p in parts if p[1]]

    def _group(self, ckpts: Sequence[Checkpoint], lead: str | None, members: list[str]) -> GraftGroup:
        if lead is None or len(ckpts) == 1:
            return GraftGroup(lead, tuple(members), (), tuple(1.0 / len(ckpts) for _ in ckpts))
        if self.mode == "sequential":
            tensors = [c.tensors[lead].load() for c in ckpts]
            entropies = [self._entropy(c, lead, t) for c, t in zip(ckpts, tensors, strict=True)]
            w = entropy.graft_sequential_weights(
                tensors, a=self.a, c=self.c, bins=self.bins, round_digits=self.round_digits
            )
        else:  # one tensor in memory at a time
            entropies = [self._entropy(c, lead, c.tensors[lead].load()) for c in ckpts]
            w = entropy.graft_weights(entropies, mode=self.mode, a=self.a, c=self.c, round_digits=self.round_digits)
        return GraftGroup(lead, tuple(members), tuple(entropies), tuple(w))

    def _entropy(self, ckpt: Checkpoint, name: str, tensor: torch.Tensor) -> float:
        try:
            return entropy.graft_entropy(tensor, self.bins)
        except PlanError as e:
            raise PlanError(f"{ckpt.path}: '{name}': {e}") from None
