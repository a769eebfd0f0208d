"""Uniform averaging: stochastic weight averaging (SWA)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from ..read.checkpoint import Checkpoint
from .base import Plan, Weights, register


@register
@dataclass(frozen=True)
class Swa(Plan):
    """Uniform average (stochastic weight averaging, Izmailov et al. 2018, arXiv 1803.05407)."""

    method: ClassVar[str] = "swa"

    def weights(self, ckpts: Sequence[Checkpoint]) -> Weights:
        self.check_count(len(ckpts))
        n = len(ckpts)
        return Weights(tuple(1.0 / n for _ in range(n)))
