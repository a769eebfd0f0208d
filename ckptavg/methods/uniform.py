"""Uniform averaging: stochastic weight averaging (SWA)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from ..errors import CkptavgWarning
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


@dataclass(frozen=True)
class Copy(Swa):
    """One checkpoint, taken as it is: what `recalibrate_bn` starts from (not a registered averaging method)."""

    method: ClassVar[str] = "copy"
    summary: ClassVar[str] = "One checkpoint's weights, unchanged but for the output dtype."
    paper: ClassVar[str] = ""

    def notes(self, ckpts: Sequence[Entry], matrix: WeightMatrix) -> list[CkptavgWarning]:
        return []  # one checkpoint is the point here, not a surprise
