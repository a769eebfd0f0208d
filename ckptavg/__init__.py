"""ckptavg: post-hoc checkpoint averaging for PyTorch (SWA, EMA, grafting), streamed tensor by tensor."""

__version__ = "0.1.0"

from .api import AverageResult, PlanReport, average_checkpoints, plan_checkpoints  # noqa: E402
from .errors import (  # noqa: E402
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
from .graft import Graft  # noqa: E402
from .plans import PLANS, Ema, Group, Linear, Plan, Swa, Weights  # noqa: E402
from .report import inspect_checkpoint  # noqa: E402
from .select import Selection  # noqa: E402
from .soup import Soup  # noqa: E402
from .sources import Checkpoint, LoadOptions, find_checkpoints, open_checkpoint  # noqa: E402

__all__ = [
    "PLANS", "AverageResult", "BatchNormError", "CheckpointFormatError", "Checkpoint", "CkptavgError",
    "CkptavgWarning", "Ema", "Graft", "Group", "IncompatibleCheckpointsError", "Linear", "LoadOptions",
    "NonFiniteError", "OutputError", "Plan", "PlanError", "PlanReport", "Selection", "SelectionError", "Soup",
    "Swa", "Weights", "__version__", "average_checkpoints", "find_checkpoints", "inspect_checkpoint",
    "open_checkpoint", "plan_checkpoints",
]
