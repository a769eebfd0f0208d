"""The weight matrix of a plan with several outputs as text: checkpoints down, one column per output, each cell
a bar (scaled to the largest |weight| of the matrix) and, while the columns fit 80 characters, the weight."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..results import PlanReport

BARS = "▁▂▃▄▅▆▇█"
WIDTH = 80
NUMBER = 9  # "█ -0.8649"
MAX_BARS = 24  # columns of bars alone; more outputs are listed, not drawn


def bar(weight: float, top: float, signed: bool = True) -> str:
    """One block character for |weight| / top (blank for 0), preceded by '-' for a negative weight if `signed`."""
    if top <= 0 or weight == 0:
        return " "
    level = max(0, min(len(BARS) - 1, round(abs(weight) / top * len(BARS)) - 1))
    return ("-" if weight < 0 and signed else "") + BARS[level]


def format_matrix(report: PlanReport) -> list[str]:
    """Lines of the matrix: a legend of the outputs, then one line per checkpoint."""
    rows = report.matrix.rows
    ckpts = report.checkpoints
    top = max((abs(w) for r in rows for w in r.values), default=0.0)
    labels = [c.path.name or str(c.path) for c in ckpts]
    steps = ["-" if c.meta.step is None else str(c.meta.step) for c in ckpts]
    head = max(len(str(len(ckpts))), 1) + 2 + max(len(s) for s in [*labels, "checkpoint"]) + 2 + \
        max(len(s) for s in [*steps, "step"])
    shown = rows[:MAX_BARS]
    numbers = head + len(shown) * (NUMBER + 2) <= WIDTH
    legend = [f"outputs ({len(rows)}, one column each; bars scaled to the largest |weight|, {top:.4g}):"]
    legend += [f"  [{i + 1}] {r.name or '-'}" for i, r in enumerate(rows)]
    if len(rows) > len(shown):
        legend.append(f"  (columns show the first {len(shown)}; plan --json lists every output)")
    width = NUMBER if numbers else max(2, len(str(len(shown))) + 2)
    table = [["#", "checkpoint", "step", *[f"[{i + 1}]".rjust(width) for i in range(len(shown))]]]
    for k, (label, step) in enumerate(zip(labels, steps, strict=True)):
        row = [str(k + 1), label, step]
        for r in shown:
            w = r.values[k]
            row.append((f"{bar(w, top, False)} {w:7.4f}" if numbers else bar(w, top)).rjust(width))
        table.append(row)
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    body = ["  ".join(c.rjust(w) if i != 1 else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths, strict=True))
                      ).rstrip() for line in table]
    sums = [sum(r.values) for r in rows]
    if all(abs(x - sums[0]) < 5e-7 for x in sums):
        total = f"sum of weights: {sums[0]:.6f} in every output"
    else:
        total = "sum of weights: " + "  ".join(f"[{i + 1}] {x:.4f}" for i, x in enumerate(sums[:5])) + \
            (" ..." if len(sums) > 5 else "")
    return [*legend, "", *body, "", total]
