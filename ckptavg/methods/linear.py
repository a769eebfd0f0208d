"""Averages with weights the user gives, one per checkpoint."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from ..errors import CkptavgWarning, PlanError
from .base import Entry, Plan, TensorAccess, WeightMatrix, register


@register
@dataclass(frozen=True)
class Linear(Plan):
    """User-given weights, one per selected checkpoint in order; `normalize` divides them by their sum."""

    method: ClassVar[str] = "linear"
    summary: ClassVar[str] = "Average with your own weights, one per selected checkpoint."
    values: tuple[float, ...] = ()
    normalize: bool = False

    def __post_init__(self) -> None:
        if not self.values:
            raise PlanError("linear needs values: one weight per checkpoint, e.g. 0.2,0.3,0.5.", params=("values",))
        if any(w != w or w in (float("inf"), float("-inf")) for w in self.values):
            raise PlanError(f"values must be finite numbers, not {list(self.values)}.", params=("values",))
        if self.normalize and sum(self.values) == 0:
            raise PlanError("normalize needs weights whose sum is not 0.", params=("normalize",))
        if self.normalize and not math.isfinite(sum(self.values)):  # each weight / inf would give all zeros
            raise PlanError(f"values {list(self.values)[:4]}{'...' if len(self.values) > 4 else ''} sum past the "
                            "largest float, so normalize cannot divide by the sum; scale them down (only their "
                            "ratios matter with normalize).", params=("values", "normalize"))

    def params(self) -> dict[str, Any]:
        return {"weights": list(self.values), "normalize": self.normalize}

    def weights(self, ckpts: Sequence[Entry], data: TensorAccess | None = None) -> WeightMatrix:
        if len(self.values) != len(ckpts):
            raise PlanError(f"values holds {len(self.values)} weights but {len(ckpts)} checkpoints were "
                            "selected; give one weight per checkpoint (see `ckptavg plan linear`).", params=("values",))
        values = self.values
        if self.normalize:
            total = sum(values)
            values = tuple(w / total for w in values)
        else:
            if any(w < 0 for w in values):
                warnings.warn(CkptavgWarning(f"negative weights {list(values)}; pass normalize to silence this if "
                                             "intended.", params=("normalize",)), stacklevel=2)
            if abs(sum(values) - 1) > 1e-9:
                warnings.warn(CkptavgWarning(f"weights sum to {sum(values):.6g}, not 1, so the result is scaled; "
                                             "pass normalize to divide by their sum.", params=("normalize",)), stacklevel=2)
        return WeightMatrix.single(values)


def parse_weights(text: str) -> tuple[float, ...]:
    """Parse ``--weights 0.2,0.3,0.5``."""
    try:
        return tuple(float(part) for part in text.replace(" ", "").split(",") if part)
    except ValueError:
        raise PlanError(f"values must be comma-separated numbers, not {text!r}.", params=("values",)) from None
