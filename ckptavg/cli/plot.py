"""`ckptavg plan ... --plot FILE`: every output's weights against step (or checkpoint index) as a picture.

matplotlib is an optional extra (`pip install 'ckptavg[plot]'`), imported only here and only when --plot is given.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..results import PlanReport

FORMATS = (".png", ".svg")
MAX_LEGEND = 12  # more outputs than this: no legend, the lines alone show the family
MAX_TICKS = 24


def check_plot(path: str) -> None:
    """Refuse a plot that cannot be drawn (no matplotlib, a format other than png or svg), before any work.

    The messages name the flag itself: a plot exists only on the command line, and a path holding the word
    would be rewritten by the parameter -> flag table."""
    from ..errors import PlanError

    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise PlanError(f"--plot draws .png or .svg files, not {path!r}.")
    if importlib.util.find_spec("matplotlib") is None:
        raise PlanError("--plot needs matplotlib, which is not installed: pip install 'ckptavg[plot]' "
                        "(or pip install matplotlib).")
    if not Path(path).resolve().parent.is_dir():
        raise PlanError(f"--plot {path}: the folder {Path(path).parent} does not exist.")


def plot_weights(report: PlanReport, path: str) -> None:
    """Draw the weight of each checkpoint against its step (its index when a step is unknown), one line per output."""
    import matplotlib

    from .text import describe

    matplotlib.use("Agg")  # a file, never a window
    import matplotlib.pyplot as plt

    steps = [c.meta.step for c in report.checkpoints]
    by_step = all(s is not None for s in steps) and len(set(steps)) == len(steps)
    xs = [float(s) for s in steps if s is not None] if by_step else [float(i) for i in range(len(steps))]
    rows = report.matrix.rows
    fig, ax = plt.subplots(figsize=(8, 4.5))
    try:
        for i, row in enumerate(rows):
            label = row.name or report.plan.method
            ax.plot(xs, row.values, marker="o", markersize=3, linewidth=1.2, label=label if i < MAX_LEGEND else None)
        ax.axhline(0.0, color="grey", linewidth=0.6)
        ax.set_xlabel("step" if by_step else "checkpoint (oldest first)")
        if not by_step and len(xs) <= MAX_TICKS:  # steps unknown or shared (one per EMA profile): name each
            ax.set_xticks(xs, [c.path.name for c in report.checkpoints], rotation=45, ha="right", fontsize="small")
        ax.set_ylabel("weight")
        n = len(rows)
        ax.set_title(f"{describe(report.plan)[0]}: {n} output{'s' if n != 1 else ''}, {len(xs)} checkpoints")
        if n > 1 or rows[0].name:
            ax.legend(fontsize="small", title=None if n <= MAX_LEGEND else f"first {MAX_LEGEND} of {n}")
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)
