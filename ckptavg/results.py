"""What the library verbs return: the plan of an average, what an average wrote, and its provenance."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._version import __version__
from .errors import CkptavgWarning
from .layout import TensorSpec
from .methods.base import Plan, WeightMatrix, Weights
from .read.checkpoint import Checkpoint
from .select import find_metric
from .write.output import WrittenFile


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

    @property
    def weights(self) -> Weights:
        """The weights of the first (usually the only) output row."""
        return self.matrix.rows[0]

    @property
    def nbytes(self) -> int:
        """Bytes of the output tensors."""
        return sum(s.nbytes for s in self.specs)

    def to_json(self, names: Mapping[str, str] | None = None) -> dict[str, Any]:
        """The stable `plan --json` schema (documented in the README); `names` shows parameters as flags."""
        return {
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
            "skipped": [{"path": str(p), "reason": why} for p, why in self.skipped],
        } | self.details()

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
    bn_batches: int | None = None  # batches the BatchNorm pass ran, when it ran

    @property
    def nbytes(self) -> int:
        return sum(f.nbytes for f in self.files)

    @property
    def sha256(self) -> str | None:
        """The digest of a single-file output (a folder lists one per file in `files`)."""
        return self.files[0].sha256 if len(self.files) == 1 and self.files[0].path == self.output else None

    def to_json(self, names: Mapping[str, str] | None = None) -> dict[str, Any]:
        """The run's `--json` summary (documented in the README); `names` shows parameters as flags."""
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
        if len(self.outputs) > 1:
            out["outputs"] = [str(p) for p in self.outputs]
        if self.scores:
            out["scores"] = self.scores
        return out


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
    } | named | ({"ckptavg_details": json.dumps(details)} if (details := report.details()) else {})
