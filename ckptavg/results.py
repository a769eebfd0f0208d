"""What the library verbs return: the plan of an average, what an average wrote, its provenance, and the scores
of evaluated output rows (`RowEvaluation`, `score_rows`)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._version import __version__
from .errors import CkptavgWarning, PlanError
from .layout import TensorSpec
from .methods.base import Plan, WeightMatrix, Weights
from .read.checkpoint import Checkpoint
from .select import find_metric
from .write.output import WrittenFile

if TYPE_CHECKING:
    import torch

    from .methods.lora_rows import AdapterAverage


@dataclass
class PlanReport:
    """What an average would do: the checkpoints in order, their weights, and the output layout."""

    plan: Plan
    checkpoints: list[Checkpoint]
    matrix: WeightMatrix
    order: str
    specs: list[TensorSpec] = field(default_factory=list)
    metric: str | None = None
    considered: list[Checkpoint] = field(default_factory=list)  # every checkpoint found, before selection
    warnings: list[CkptavgWarning] = field(default_factory=list)  # what the user should know (also on stderr)
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # inputs found but left out, and why
    lora: AdapterAverage | None = None  # the averaged LoRA layers of adapters, and their errors
    base: Checkpoint | None = None  # the model that lora merge adds the mean update to

    @property
    def sources(self) -> list[Checkpoint]:
        """Every checkpoint the output is read from: the selected ones, and a merge's base."""
        return [*self.checkpoints, *([self.base] if self.base else [])]

    @property
    def weights(self) -> Weights:
        """The weights of the first (usually the only) output row."""
        return self.matrix.rows[0]

    @property
    def nbytes(self) -> int:
        """Bytes of the output tensors."""
        return sum(s.nbytes for s in self.specs)

    def to_json(self, names: Mapping[str, str] | None = None) -> dict[str, Any]:
        """The stable `plan --json` schema (documented in the README); `names` shows parameters as flags.
        Strict JSON: a number that is not finite (a NaN metric, an infinite weight) is null (`strict_json`)."""
        body: dict[str, Any] = strict_json({
            "method": self.plan.method,
            "params": self.plan.params(),
            "order": self.order,
            "checkpoints": [
                {
                    "path": str(c.path), "step": c.meta.step, "epoch": c.meta.epoch, "metric": self.metric_of(c),
                    "metric_source": self.metric_source(c),
                    "weight": w, "step_source": c.meta.step_source, "epoch_source": c.meta.epoch_source,
                    "format": c.format,
                }
                for c, w in zip(self.checkpoints, self.weights.values, strict=True)
            ],
            "residual": self.weights.residual,
            "tensors": len(self.specs),
            "bytes": self.nbytes,
            "warnings": self.warning_texts(names),
            "outputs": [{"name": r.name, "params": dict(r.params), "weights": list(r.values), "residual": r.residual}
                        for r in self.matrix.rows],
            "skipped": [{"path": str(p), "reason": why} for p, why in self.skipped],
        } | self.details() | ({"lora": self.lora.to_json()} if self.lora else {}))
        return body

    def warning_texts(self, names: Mapping[str, str] | None = None) -> list[str]:
        """The warnings of this plan, with parameters shown by `names` (flags) where given."""
        return [w.with_names(names) if names else str(w) for w in self.warnings]

    def metric_of(self, c: Checkpoint) -> float | None:
        """The value of the selection metric for one checkpoint, when a metric was named."""
        found = find_metric(c.meta.metrics, self.metric) if self.metric else None
        return found[1][0] if found else None

    def metric_source(self, c: Checkpoint) -> str | None:
        """Where the selection metric of one checkpoint was read from."""
        found = find_metric(c.meta.metrics, self.metric) if self.metric else None
        return f"{found[0]}: {found[1][1]}" if found else None

    def details(self) -> dict[str, Any]:
        """Method-specific parts of the plan: graft groups, soup scores, the metric name."""
        out: dict[str, Any] = {}
        if self.metric:
            out["metric_name"] = self.metric
        return out | dict(self.matrix.details)


@dataclass
class AverageResult:
    """What `average_checkpoints` wrote: one file, or the files of an output folder (or of several outputs,
    one per row of the plan's matrix, with `outputs` naming them; `scores` when rows were evaluated)."""

    output: Path
    report: PlanReport
    files: list[WrittenFile]
    seconds: float
    outputs: list[Path] = field(default_factory=list)
    scores: list[dict[str, Any]] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)  # the matrix row of each of `outputs`
    bn_batches: int | None = None  # batches the BatchNorm pass ran, when it ran

    def written(self) -> list[tuple[Path, Weights]]:
        """Each output written, with its row of the plan's matrix."""
        rows = self.report.matrix.rows
        if not self.outputs:  # a torchrun job: one output, the plan's only row
            return [(self.output, rows[0])]
        return [(p, rows[r]) for p, r in zip(self.outputs, self.rows or range(len(self.outputs)), strict=True)]

    @property
    def nbytes(self) -> int:
        return sum(f.nbytes for f in self.files)

    @property
    def sha256(self) -> str | None:
        """The digest of a single-file output (a folder lists one per file in `files`)."""
        return self.files[0].sha256 if len(self.files) == 1 and self.files[0].path == self.output else None

    def to_json(self, names: Mapping[str, str] | None = None) -> dict[str, Any]:
        """The run's `--json` summary (documented in the README); `names` shows parameters as flags.
        Strict JSON, as `PlanReport.to_json`."""
        r = self.report
        out = {
            "output": str(self.output), "method": r.plan.method,
            "checkpoints": len(r.checkpoints), "tensors": len(r.specs),
            "bytes": self.nbytes, "sha256": self.sha256, "seconds": round(self.seconds, 3),
            "inputs": [{"path": str(c.path), "step": c.meta.step, "epoch": c.meta.epoch, "weight": w}
                       for c, w in zip(r.checkpoints, r.weights.values, strict=True)],
            "warnings": r.warning_texts(names),
        }
        if self.sha256 is None:
            out["files"] = [{"path": str(f.path), "bytes": f.nbytes, "sha256": f.sha256} for f in self.files]
        if len(self.report.matrix.rows) > 1 or self.scores:
            out["outputs"] = [{"path": str(p), "name": w.name, "params": dict(w.params)} for p, w in self.written()]
        if self.scores:
            out["scores"] = self.scores
        if r.lora is not None:
            out["lora"] = r.lora.to_json()
        strict: dict[str, Any] = strict_json(out)
        return strict


def strict_json(value: Any) -> Any:
    """`value` with every float that is not finite (NaN, Infinity) replaced by None, so that `json.dumps`
    writes strict JSON (null) that every parser reads, where Python's default would write bare NaN or
    Infinity. Dicts, lists and tuples are copied; everything else is kept."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def provenance(report: PlanReport, row: int = 0) -> dict[str, str]:
    """An output's __metadata__: which files, in which order, with which weights (those of output `row` of the
    plan's matrix), by which version."""
    weights = report.matrix.rows[row]
    inputs = [
        {"path": str(c.path), "weight": w, "step": c.meta.step, "epoch": c.meta.epoch}
        for c, w in zip(report.checkpoints, weights.values, strict=True)
    ]
    named = {"ckptavg_row": json.dumps({"name": weights.name, "params": dict(weights.params)}, sort_keys=True)
             } if len(report.matrix.rows) > 1 else {}
    return {
        "format": "pt",
        "ckptavg_version": __version__,
        "ckptavg_method": report.plan.method,
        "ckptavg_params": json.dumps(report.plan.params(), sort_keys=True),
        "ckptavg_order": report.order,
        "ckptavg_residual": repr(weights.residual),
        "ckptavg_inputs": json.dumps(inputs),
    } | named | ({"ckptavg_details": json.dumps(details)} if (details := report.details()) else {}) | (
        {"ckptavg_lora": json.dumps(strict_json(report.lora.summary(row)), sort_keys=True)} if report.lora else {})


@dataclass(frozen=True)
class RowEvaluation:
    """Score every output row of a plan with a function of its state dict, and keep the best (or all).

    Attributes:
        evaluate: ``fn(state_dict) -> float``, as for soups.
        mode: ``max`` if a higher score is better, ``min`` for losses.
        keep: ``best`` (write the best row to the output) or ``all`` (write every row, scores in each).
        name: how `evaluate` is recorded in the output metadata (``evals.py:score``).
    """

    evaluate: Callable[[dict[str, torch.Tensor]], float]
    mode: str = "max"
    keep: str = "best"
    name: str | None = None

    def __post_init__(self) -> None:
        if self.mode not in ("max", "min"):
            raise PlanError(f"mode must be max or min, not {self.mode!r}.", params=("mode",))
        if self.keep not in ("best", "all"):
            raise PlanError(f"keep must be best or all, not {self.keep!r}.", params=("keep",))


def score_rows(evaluation: RowEvaluation, rows: Sequence[Weights], states: Sequence[dict[str, torch.Tensor]]
              ) -> tuple[list[dict[str, Any]], list[int]]:
    """Score each row's state dict; the rows to write: the best one (`keep="best"`) or all of them."""
    scores: list[dict[str, Any]] = []
    values: list[float] = []
    for i, (row, state) in enumerate(zip(rows, states, strict=True)):
        label = row.name or f"output {i}"
        try:
            value = float(evaluation.evaluate(state))
        except Exception as e:  # noqa: BLE001 - the user's function failed: report it as one line
            raise PlanError(f"evaluate failed on {label}: {type(e).__name__}: {e}", params=("evaluate",)) from e
        if not math.isfinite(value):
            raise PlanError(f"evaluate returned {value} for {label}; scores must be finite.", params=("evaluate",))
        values.append(value)
        scores.append({"row": i, "name": row.name, "params": dict(row.params), "score": value})
    sign = 1.0 if evaluation.mode == "max" else -1.0
    best = max(range(len(rows)), key=lambda i: (sign * values[i], -i))  # ties: the earlier row
    for s in scores:
        s["kept"] = evaluation.keep == "all" or s["row"] == best
    return scores, [best] if evaluation.keep == "best" else list(range(len(rows)))
