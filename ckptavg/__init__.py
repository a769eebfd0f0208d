"""ckptavg: post-hoc checkpoint averaging for PyTorch (SWA, EMA, grafting), streamed tensor by tensor.

The public names load on first use (PEP 562), so that `import ckptavg` and `ckptavg --help` do not
import torch; `from ckptavg import average_checkpoints` works as usual.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__

# public name -> the module that defines it
_HOMES = {
    "average": "api", "average_checkpoints": "api", "inspect_checkpoint": "api", "plan_checkpoints": "api",
    "recalibrate_bn": "api", "RowEvaluation": "api", "WriteOptions": "write.options",
    "BatchNormOptions": "bn",
    "BatchNormError": "errors", "CheckpointFormatError": "errors", "CkptavgError": "errors", "CkptavgWarning": "errors",
    "IncompatibleCheckpointsError": "errors", "NonFiniteError": "errors", "OutputError": "errors",
    "PlanError": "errors", "SelectionError": "errors",
    "PLANS": "methods", "Plan": "methods.base", "WeightMatrix": "methods.base", "Weights": "methods.base",
    "Ema": "methods.ema", "Graft": "methods.graft", "GraftGroup": "methods.graft", "Linear": "methods.linear",
    "LoraAverage": "methods.lora",
    "Soup": "methods.soup", "Swa": "methods.uniform",
    "Checkpoint": "read.checkpoint", "LoadOptions": "read.checkpoint", "find_checkpoints": "read.discover",
    "open_checkpoint": "read.layouts",
    "AverageResult": "results", "PlanReport": "results", "Selection": "select",
}
_ALIASES = {"Group": "GraftGroup"}  # its name before graft groups and torchrun groups had names of their own

__all__ = [
    "AverageResult", "BatchNormError", "BatchNormOptions", "Checkpoint", "CheckpointFormatError", "CkptavgError",
    "CkptavgWarning", "Ema", "Graft", "GraftGroup", "Group", "IncompatibleCheckpointsError", "Linear",
    "LoadOptions", "LoraAverage", "NonFiniteError", "OutputError", "PLANS", "Plan", "PlanError", "PlanReport", "RowEvaluation",
    "Selection", "SelectionError", "Soup", "Swa", "WeightMatrix", "Weights", "WriteOptions", "__version__",
    "average", "average_checkpoints", "find_checkpoints", "inspect_checkpoint", "open_checkpoint",
    "plan_checkpoints", "recalibrate_bn",
]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(_ALIASES.get(name, name))
    if home is None:
        raise AttributeError(f"module 'ckptavg' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{home}", __name__), _ALIASES.get(name, name))
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return list(__all__)


if TYPE_CHECKING:  # what a type checker and an IDE see: the same names, imported eagerly
    from .api import RowEvaluation, average, average_checkpoints, inspect_checkpoint, plan_checkpoints, recalibrate_bn
    from .bn import BatchNormOptions
    from .errors import (
        BatchNormError,
        CheckpointFormatError,
        CkptavgError,
        CkptavgWarning,
        IncompatibleCheckpointsError,
        NonFiniteError,
        OutputError,
        PlanError,
        SelectionError,
    )
    from .methods import PLANS
    from .methods.base import Plan, WeightMatrix, Weights
    from .methods.ema import Ema
    from .methods.graft import Graft, GraftGroup
    from .methods.graft import GraftGroup as Group
    from .methods.linear import Linear
    from .methods.lora import LoraAverage
    from .methods.soup import Soup
    from .methods.uniform import Swa
    from .read.checkpoint import Checkpoint, LoadOptions
    from .read.discover import find_checkpoints
    from .read.layouts import open_checkpoint
    from .results import AverageResult, PlanReport
    from .select import Selection
    from .write.options import WriteOptions
