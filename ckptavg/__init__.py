"""ckptavg: post-hoc checkpoint averaging for PyTorch (SWA, EMA, grafting), streamed tensor by tensor."""

from ._version import __version__
from .api import average_checkpoints, inspect_checkpoint, plan_checkpoints
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
from .methods.base import PLANS, Plan, WeightMatrix, Weights
from .methods.ema import Ema
from .methods.graft import Graft, GraftGroup
from .methods.linear import Linear
from .methods.soup import Soup
from .methods.uniform import Swa
from .read.checkpoint import Checkpoint, LoadOptions
from .read.discover import find_checkpoints
from .read.layouts import open_checkpoint
from .results import AverageResult, PlanReport
from .select import Selection

Group = GraftGroup  # its name before graft groups and torchrun groups had names of their own

__all__ = [
    "PLANS", "AverageResult", "BatchNormError", "BatchNormOptions", "CheckpointFormatError", "Checkpoint",
    "CkptavgError", "CkptavgWarning", "Ema", "Graft", "GraftGroup", "Group", "IncompatibleCheckpointsError", "Linear",
    "LoadOptions", "NonFiniteError", "OutputError", "Plan", "PlanError", "PlanReport", "Selection",
    "SelectionError", "Soup", "Swa", "WeightMatrix", "Weights", "__version__", "average_checkpoints", "find_checkpoints",
    "inspect_checkpoint", "open_checkpoint", "plan_checkpoints",
]


def __dir__() -> list[str]:
    return list(__all__)
