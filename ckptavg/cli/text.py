"""Human-readable text for the CLI: the plan table, the one-line summary, the inspect view."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .matrix import bar, format_matrix

if TYPE_CHECKING:
    from ..methods.base import Plan
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
    """The `ckptavg plan` table: one weight column (with a bar) per output, and what each method adds."""
    method, params, notes = describe(report.plan)
    rows = report.matrix.rows
    lines = [
        f"method: {method} (params: {', '.join(f'{k}={v}' for k, v in params.items()) or 'none'})",
        *notes,
        f"order: {report.order}; {len(report.checkpoints)} checkpoints selected",
        "",
    ]
    if len(rows) == 1:
        lines += [_table(_single(report)), "",
                  f"sum of weights: {sum(report.weights.values):.6f}; residual: {report.weights.residual:.6f}"]
    else:
        lines += format_matrix(report)
        extra = _per_checkpoint(report)
        if extra:
            table = [["#", "checkpoint", *extra]] + [[str(i + 1), str(c.path), *[col[i] for col in extra.values()]]
                                                      for i, c in enumerate(report.checkpoints)]
            lines += ["", _table(table), ""]
    lines.append(f"output: {len(report.specs)} tensors, {human_bytes(report.nbytes)}"
                 + (f" each, {len(rows)} outputs" if len(rows) > 1 else ""))
    return "\n".join(lines + _method_lines(report) + _lora(report, table=True) + _skipped(report) + _groups(report)
                     + _scores(report))


def describe(plan: Plan) -> tuple[str, dict[str, Any], list[str]]:
    """The method inside sweeps and windows, its parameters (without the swept one), and a line per wrapper."""
    from ..methods.windows import Sweep, Windows

    if isinstance(plan, Windows):
        method, params, notes = describe(plan.plan)
        return method, params, [*notes, f"windows: {plan.window} checkpoints each, stride {plan.stride}"]
    if isinstance(plan, Sweep):
        method, params, notes = describe(plan.plans[0])
        params.pop(plan.field, None)
        return method, params, [f"sweep over {plan.field}: {', '.join(str(v) for v in plan.values)}", *notes]
    return plan.method, plan.params(), []


def _single(report: PlanReport) -> list[list[str]]:
    """The one-output table: each checkpoint with its step, epoch, metric, what the method read, and its weight."""
    metric = [report.metric] if report.metric else []
    extra = _per_checkpoint(report)
    top = max((abs(w) for w in report.weights.values), default=0.0)
    rows = [["#", "checkpoint", "step", "epoch", *metric, *extra, "weight", ""]]
    for i, (c, w) in enumerate(zip(report.checkpoints, report.weights.values, strict=True)):
        value = [f"{report.metric_of(c):.6g} ({report.metric_source(c)})"] if report.metric else []
        rows.append([str(i + 1), str(c.path), _value(c.meta.step, c.meta.step_source),
                     _value(c.meta.epoch, c.meta.epoch_source), *value, *[col[i] for col in extra.values()],
                     f"{w:.6f}", bar(w, top)])
    return rows


def _inner(report: PlanReport) -> Mapping[str, Any]:
    """The details that hold for every output: the plan's own, or those of the first plan of a sweep."""
    details = report.matrix.details
    if "sweep" in details and details.get("details"):
        return details["details"][0]  # type: ignore[no-any-return]
    return details


def _per_checkpoint(report: PlanReport) -> dict[str, list[str]]:
    """Columns of what a method read per checkpoint: WSM's positions, learning rates, snapshot profiles."""
    d = _inner(report)
    cols: dict[str, list[str]] = {}
    if "positions" in d:
        cols["x"] = [f"{x:.4f}" for x in d["positions"]]
    if "lr_source" in d:
        cols["lr (source)"] = [_value(None if lr is None else f"{lr:.6g}", src) for lr, src in zip(d["lr"], d["lr_source"],
                                                                                                   strict=True)]
    if "snapshots" in d:
        cols["profile (source)"] = [f"sigma_rel {s['sigma_rel']:.4g} ({s['source']})" for s in d["snapshots"]]
    return cols


def _method_lines(report: PlanReport) -> list[str]:
    """What a method says about its weights as a whole (WSM's spacing, lr integration, the phema target step)."""
    d = _inner(report)
    lines = []
    if "spacing" in d:
        lines.append(f"positions: {d['spacing']}")
    if "integration" in d:
        lines.append(f"learning rate: {d['integration']}, power {d['lr_power']}")
    if "at_step" in d:
        sums = ", ".join(f"{v:.4g}" for v in d["sum_abs"])
        lines.append(f"synthesised at step {d['at_step']:g}; sum of |weights|: {sums}")
    if "copied" in d:
        lines.append(f"copied from the newest snapshot used, not combined: {', '.join(d['copied']['entries'])}")
    return [""] + lines if lines else []


def _lora(report: PlanReport, table: bool = False) -> list[str]:
    """How LoRA adapters are averaged, and the relative error of each layer's update (the worst over outputs)."""
    if report.lora is None:
        return []
    first = report.lora.summary(0)
    if first["mode"] == "merge":
        return ["", f"LoRA: merged into {first['base']}: the exact mean update of {_count(first['layers'], 'layer')}"]
    worst = {layer: max(e[layer] for e in report.lora.errors if layer in e) for layer in report.lora.layers
             if any(layer in e for e in report.lora.errors)}
    alpha = f", lora_alpha {first['lora_alpha']:g}" if first["lora_alpha"] is not None else ""
    head = f"LoRA: {first['mode']}" + (f", r {first['r']}" if first["r"] is not None else "") + alpha
    if not worst:  # graft weighed every A and B apart: there is no one mean update
        return ["", head + "; A and B weighed apart, so no error of the mean update"]
    lines = [head + f"; relative error of the mean update: max {max(worst.values()):.3g} "
             f"({max(worst, key=worst.__getitem__)}), mean {sum(worst.values()) / len(worst):.3g} over "
             f"{_count(len(worst), 'layer')}"]
    if table:
        lines += [_table([["layer", "error"]] + [[layer, f"{e:.4g}"] for layer, e in worst.items()])]
    return [""] + lines


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
    text = f"{describe(r.plan)[0]} of {_count(n, 'checkpoint')}"
    kept = [c.name for c, w in zip(r.checkpoints, r.weights.values, strict=True) if w != 0]
    if r.plan.method == "soup" and len(kept) < n:
        accepted = [s for s in r.matrix.details.get("scores", []) if s.get("accepted")]
        score = f", score {accepted[-1]['score']:.4g}" if accepted else ""
        text += f": kept {len(kept)} ({', '.join(kept[:3])}{' ...' if len(kept) > 3 else ''}{score})"
    if result.bn_batches is not None:
        text += f", BatchNorm statistics recomputed over {_count(result.bn_batches, 'batch')}"
    return text


def _file_noun(result: AverageResult) -> str:
    """What the files of a folder output are: a DCP folder's data files (beside .metadata), or weight files."""
    return "DCP data file" if result.files and all(f.path.suffix == ".distcp" for f in result.files) else "weight file"


def format_summary(result: AverageResult) -> str:
    """The success message: one line, then for several outputs or scores one line per output or score."""
    r = result.report
    what = f"{_what(result)}, {_count(len(r.specs), 'tensor')}"
    written = result.written()
    if len(written) == 1:
        head = (f"wrote {result.outputs[0] if result.outputs else result.output}: {what}, {human_bytes(result.nbytes)}, "
                + (f"sha256 {result.sha256}" if result.sha256 else _count(len(result.files), _file_noun(result)))
                + f", {result.seconds:.2f} s")
    else:
        head = f"wrote {len(written)} outputs: {what} each, {human_bytes(result.nbytes)} in all, {result.seconds:.2f} s"
    scores = {s["row"]: s["score"] for s in result.scores}
    rows = [[str(path), w.name or "-", f"score {scores[i]:.6g}" if i in scores else ""]
            for (path, w), i in zip(written, result.rows or range(len(written)), strict=False)] if len(written) > 1 else []
    lines = [head] + (["  " + line for line in _table(rows).splitlines()] if rows else []) + _lora(r)[1:]
    if result.scores and (len(written) == 1 or len(written) < len(r.matrix.rows)):  # --keep best: every row's
        lines.append("scores:")
        table = [[s["name"] or f"output {s['row']}", f"{s['score']:.6g}", "kept" if s["kept"] else ""] for s in result.scores]
        lines += ["  " + line for line in _table(table).splitlines()]
    return "\n".join(lines)


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
