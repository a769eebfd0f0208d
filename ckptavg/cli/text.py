"""Human-readable text for the CLI: the plan table, the one-line summary, the inspect view."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..results import AverageResult, PlanReport


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover - the loop returns at GiB


def _value(value: Any, source: str | None) -> str:
    return "-" if value is None else f"{value} ({source})"


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def format_plan(report: PlanReport) -> str:
    """The `ckptavg plan` table."""
    params = ", ".join(f"{k}={v}" for k, v in report.plan.params().items()) or "none"
    metric = [report.metric] if report.metric else []
    rows = [["#", "checkpoint", "step", "epoch", *metric, "weight"]]
    for i, (c, w) in enumerate(zip(report.checkpoints, report.weights.values, strict=True), 1):
        value = [f"{report.metric_of(c):.6g}"] if report.metric else []
        rows.append([str(i), str(c.path), _value(c.meta.step, c.meta.step_source),
                     _value(c.meta.epoch, c.meta.epoch_source), *value, f"{w:.6f}"])
    lines = [
        f"method: {report.plan.method} (params: {params})",
        f"order: {report.order}; {len(report.checkpoints)} checkpoints selected",
        "",
        _table(rows),
        "",
        f"sum of weights: {sum(report.weights.values):.6f}; residual: {report.weights.residual:.6f}",
        f"output: {len(report.specs)} tensors, {human_bytes(report.nbytes)}",
    ]
    return "\n".join(lines + _skipped(report) + _groups(report) + _scores(report))


def _skipped(report: PlanReport) -> list[str]:
    if not report.skipped:
        return []
    return ["", f"skipped {len(report.skipped)}:"] + [f"  {p}: {why}" for p, why in report.skipped]


def _groups(report: PlanReport) -> list[str]:
    groups = report.matrix.details.get("groups")
    if not groups:
        return []
    rows = [["group", "tensors", "entropies", "weights"]]
    for g in groups:
        rows.append([g["tensor"] or "(before the first group: uniform)", str(len(g["members"])),
                     " ".join(f"{h:.4f}" for h in g["entropies"]) or "-", " ".join(f"{w:.4f}" for w in g["weights"])])
    return ["", "per-tensor weights (weight column above: mean weighted by parameter count):", _table(rows)]


def _scores(report: PlanReport) -> list[str]:
    scores = report.matrix.details.get("scores")
    if not scores:
        return []
    rows = [["evaluated", "score", "kept"]]
    for s in scores:
        names = " + ".join(p.rsplit("/", 1)[-1] for p in s["members"])
        rows.append([f"{s['kind']}: {names}", f"{s['score']:.6g}", "yes" if s["accepted"] else "no"])
    return ["", _table(rows)]


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "es" if noun.endswith("ch") else "s")


def _what(result: AverageResult) -> str:
    """What was done, in words: the method and its inputs, who a soup kept, the BatchNorm pass."""
    r = result.report
    n = len(r.checkpoints)
    if result.bn_batches is not None and r.plan.method == "copy":
        return f"recomputed BatchNorm statistics of {r.checkpoints[0].name} over {_count(result.bn_batches, 'batch')}"
    text = f"{r.plan.method} of {_count(n, 'checkpoint')}"
    kept = [c.name for c, w in zip(r.checkpoints, r.weights.values, strict=True) if w != 0]
    if r.plan.method == "soup" and len(kept) < n:
        accepted = [s for s in r.matrix.details.get("scores", []) if s.get("accepted")]
        score = f", score {accepted[-1]['score']:.4g}" if accepted else ""
        text += f": kept {len(kept)} ({', '.join(kept[:3])}{' ...' if len(kept) > 3 else ''}{score})"
    if result.bn_batches is not None:
        text += f", BatchNorm statistics recomputed over {_count(result.bn_batches, 'batch')}"
    return text


def format_summary(result: AverageResult) -> str:
    """The one-line success message."""
    r = result.report
    return (
        f"wrote {result.output}: {_what(result)}, "
        f"{_count(len(r.specs), 'tensor')}, "
        f"{human_bytes(result.nbytes)}, "
        + (f"sha256 {result.sha256}" if result.sha256 else _count(len(result.files), "weight file"))
        + f", {result.seconds:.2f} s"
    )


def format_inspect(info: dict[str, Any]) -> str:
    """The `ckptavg inspect` view."""
    lines = [
        f"path: {info['path']}",
        f"format: {info['format']}",
        f"weights: {info['location']}" + (f" (stripped prefix '{info['stripped_prefix']}')" if info["stripped_prefix"] else ""),
        f"step: {_value(info['step'], info['step_source'])}",
        f"epoch: {_value(info['epoch'], info['epoch_source'])}",
    ]
    if info["metrics"]:
        lines.append("metrics: " + ", ".join(f"{m['name']}={m['value']:.6g} ({m['source']})" for m in info["metrics"]))
    if info["other_entries"]:
        lines.append("other entries: " + ", ".join(info["other_entries"]))
    provenance = info.get("ckptavg")
    if provenance:
        lines.append(f"made by ckptavg {provenance.get('version')}: {provenance.get('method')} "
                     f"{json.dumps(provenance.get('params'))}, order {provenance.get('order')}")
        lines += [f"  {i['weight']:.6f}  {i['path']}" for i in provenance.get("inputs", [])]
    elif info["file_metadata"]:
        lines.append("metadata: " + ", ".join(f"{k}={v}" for k, v in info["file_metadata"].items()))
    lines.append(f"tensors: {len(info['tensors'])}, {human_bytes(info['bytes'])}")
    rows = [["name", "dtype", "shape", "size"]]
    rows += [[t["name"], t["dtype"], "x".join(map(str, t["shape"])) or "scalar", human_bytes(t["bytes"])]
             for t in info["tensors"]]
    return "\n".join(lines) + "\n\n" + _table(rows)
