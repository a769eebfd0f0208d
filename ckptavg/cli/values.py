"""From parsed options to the library's values, and the two calls every method command ends in.

The library is imported inside the functions: `ckptavg --help` must not import torch.
"""

from __future__ import annotations

import gc
import json
import os
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .options import PARAM_FLAGS, AccumDtype, Format, MetricMode, Order, OutDtype, Shards
from .progress import ProgressBar
from .text import format_plan, format_summary

if TYPE_CHECKING:
    from ..bn import BatchNormOptions
    from ..methods.base import Plan
    from ..read.checkpoint import LoadOptions
    from ..results import AverageResult, RowEvaluation
    from ..select import Selection


@dataclass(frozen=True)
class Destination:
    """The output options of an averaging command."""

    output: str
    max_shard_size: str | None = None
    shards: Shards | None = None
    dtype: OutDtype | None = None
    accum_dtype: AccumDtype = AccumDtype.FLOAT64
    device: str = "cpu"
    allow_nonfinite: bool = False
    verify: bool = False
    force: bool = False
    json_out: bool = False
    quiet: bool = False
    fmt: Format | None = None
    container: bool = False
    keep_training_state: bool = False


def selection(last: int | None, best: int | None, metric: str | None, metric_mode: MetricMode | None,
              start: str | None, every: int | None, upto: int | None, order: Order) -> Selection:
    """The `Selection` of the selection options."""
    from ..select import Selection, parse_start

    return Selection(order=order.value, upto=upto, start=parse_start(start) if start is not None else None,
                     every=every, best=best, metric=metric, mode=metric_mode.value if metric_mode else None, last=last)


def loading(key: str | None, keep_prefix: bool, trust_pickle: bool, component: str | None = None,
            strip_prefix: str | None = None, add_prefix: str | None = None) -> LoadOptions:
    """The `LoadOptions` of the loading options."""
    from ..read.checkpoint import LoadOptions

    return LoadOptions(key=key, keep_prefix=keep_prefix, trust_pickle=trust_pickle, component=component,
                       strip_prefix=strip_prefix, add_prefix=add_prefix)


def batchnorm(model: str | None, data: str | None, batches: int | None, batch_size: int,
              forward: str | None) -> BatchNormOptions | None:
    """The `BatchNormOptions` of the --bn-* options; None when neither --bn-model nor --bn-data is given."""
    from ..bn import BatchNormOptions
    from ..errors import BatchNormError

    if model is None and data is None:
        return None
    if model is None or data is None:
        raise BatchNormError("BatchNorm recalibration needs both --bn-model and --bn-data.")
    return BatchNormOptions(model, data, batches, batch_size, forward)


def lead() -> bool:
    """False on the ranks other than 0 of a torchrun job, which print nothing."""
    return os.environ.get("RANK", "0") == "0"


def average(inputs: list[str], plan: Plan, select: Selection, load: LoadOptions, dest: Destination,
            bn: BatchNormOptions | None, evaluation: RowEvaluation | None = None) -> None:
    """Run one average (under torchrun, this rank's share of it) and print the summary."""
    from .. import api, dist  # noqa: F401 - api: imported before the freeze below, as dist imports it late
    from ..write.options import WriteOptions

    if gc.get_freeze_count():
        # main() froze what it had imported before torch; freeze torch's ~500k objects too, so that no
        # full collection walks them mid-run (0.08 s each, bench/RESULTS.md). In-process callers (the
        # tests) never froze anything and are left alone.
        gc.freeze()
    bar = ProgressBar(sys.stderr) if not dest.quiet and sys.stderr.isatty() and lead() else None
    try:
        write = WriteOptions(dest.dtype.value if dest.dtype else None, dest.accum_dtype.value, dest.allow_nonfinite,
                             dest.force, dest.device, dest.max_shard_size, dest.shards is not None, dest.verify,
                             dest.fmt.value if dest.fmt else None, dest.container, dest.keep_training_state)
        result: AverageResult = dist.average(inputs, dest.output, plan, select=select, load=load, write=write, bn=bn,
                                             progress=bar, evaluation=evaluation)
    finally:
        if bar:
            bar.close()
    if not dest.quiet and lead():
        print(json.dumps(result.to_json(PARAM_FLAGS), allow_nan=False) if dest.json_out else format_summary(result))


def show_plan(inputs: list[str], plan: Plan, select: Selection, load: LoadOptions, dtype: OutDtype | None,
              json_out: bool, plot: str | None = None) -> None:
    """Print the checkpoints, order and weights that `plan` gives, as a table or as JSON; with `plot`, draw the
    weights of every output into that file too."""
    from ..api import plan_checkpoints
    from .plot import check_plot, plot_weights

    if plot is not None:
        check_plot(plot)  # before any work: a missing matplotlib or a bad suffix
    report = plan_checkpoints(inputs, plan, select=select, load=load, dtype=dtype.value if dtype else None)
    if plot is not None:
        plot_weights(report, plot)
    print(json.dumps(report.to_json(PARAM_FLAGS), indent=2, allow_nan=False) if json_out else format_plan(report))
