"""Uniform averaging: stochastic weight averaging (SWA)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from .base import Entry, Plan, TensorAccess, WeightMatrix, register


@register
@dataclass(frozen=True)
class Swa(Plan):
    """Uniform average (stochastic weight averaging, Izmailov et al. 2018, arXiv 1803.05407)."""

    method: ClassVar[str] = "swa"
    summary: ClassVar[str] = "Uniform average of the selected checkpoints (stochastic weight averaging)."
    paper: ClassVar[str] = "arXiv:1803.05407"

    def weights(self, ckpts: Sequence[Entry], data: TensorAccess | None = None) -> WeightMatrix:
        self.check_count(len(ckpts))
        n = len(ckpts)
        return WeightMatrix.single([1.0 / n] * n)
