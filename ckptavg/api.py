"""The library verbs: `plan_checkpoints` (weights only), `average` (the work), `inspect_checkpoint` and
`recalibrate_bn`; and the two phases of an average, `prepare` and `produce`, which `dist` also runs on every
rank of a torchrun job around its own agreement steps.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import groupby
from pathlib import Path
from typing import Any

import torch

from .bn import BatchNormOptions, recalibrate
from .errors import BatchNormError, CkptavgWarning
from .layout import ACCUM_DTYPES, OUT_DTYPES, TensorSpec, check_layout
from .methods.base import Plan
from .methods.lora import LoraAverage
from .methods.lora_rows import average_adapters, refuse_scored_soup, sharded_note
from .methods.uniform import Copy, Swa
from .read.checkpoint import LoadOptions, PathLike, check_unchanged, files_of
from .read.dcp import extra_state_note
from .read.dedupe import dedupe, fill_path_meta, skipped_note
from .read.describe import inspect_checkpoint as inspect_checkpoint  # a verb of the public face, read-only
from .read.discover import Found, discover, find_checkpoints
from .read.layouts import open_checkpoint
from .read.peft import CONFIG, adapter_config, open_base
from .reduce.stream import resolve_device, stream_rows
from .reduce.tensor import CheckpointData, check_finite, work_bytes
from .results import AverageResult, PlanReport, provenance, score_rows
from .results import RowEvaluation as RowEvaluation  # the argument of `average`, importable from here too
from .select import Selection, order_checkpoints, refuse_twice, select_checkpoints
from .write.container import refuse_container
from .write.dcp_folder import plan_dcp_output, wants_dcp
from .write.options import WriteOptions, output_format, row_suffix
from .write.output import OpenOutput, Output, announce, is_folder_output, plan_output
from .write.safetensors import check_output
from .write.templates import row_targets
from .write.training import training_output

Progress = Callable[[int, int], None]  # (bytes read so far, total bytes to read)
"""Called as the reduction reads. An object that also has ``step(phase, done, total)`` is told of the other
long passes too: graft's entropies, soup's and --eval's evaluations, BatchNorm batches (total 0: unknown)."""


def _steps_of(progress: Progress | None) -> Callable[[str, int, int], None] | None:
    step: Callable[[str, int, int], None] | None = getattr(progress, "step", None)
    return step


def plan_checkpoints(
    inputs: Sequence[PathLike] | PathLike,
    plan: Plan | None = None,
    *,
    select: Selection = Selection(),
    load: LoadOptions = LoadOptions(),
    dtype: str | None = None,
    lora: LoraAverage | None = None,
) -> PlanReport:
    """Find, order and select checkpoints and compute the plan's weights; read no tensor data (but for the
    plans that need it: graft and soup).

    Args:
        inputs: files, directories or glob patterns.
        plan: the weighting method (default: uniform `Swa()`).
        select: which checkpoints to use.
        load: how to read them.
        dtype: output dtype for floating tensors (``float32``, ``float16``, ``bfloat16``); None keeps each
            tensor's input dtype.
        lora: how to average LoRA adapters (`LoraAverage`: svd, concat, factors, or merge into a base model);
            None: svd at the adapters' rank when the inputs are LoRA adapters. Their factors are read to report
            each layer's error.

    Raises:
        CkptavgError: with a message naming the file, the key and the fix.
    """
    WriteOptions(dtype=dtype)
    return _plan(discover(inputs), plan or Swa(), select, load, dtype, lora=lora)


def _plan(found: Found, plan: Plan, select: Selection, load: LoadOptions, dtype: str | None,
          progress: Progress | None = None, lora: LoraAverage | None = None) -> PlanReport:
    with warnings.catch_warnings(record=True) as caught:  # kept in the report (for --json), and passed on
        warnings.simplefilter("always")
        opened = [open_checkpoint(c.path, load) for c in found.candidates]
        fill_path_meta(opened)
        once = dedupe(opened, [c.explicit for c in found.candidates])
        skipped = found.skipped + once.skipped
        if skipped:
            warnings.warn(skipped_note(skipped), stacklevel=1)
        ordered, used = order_checkpoints(once.kept, select.order, once.identity, plan.combines_profiles)
        chosen = select_checkpoints(ordered, select)
        refuse_twice(chosen, once.identity)
        if (extra := extra_state_note(chosen)) is not None:  # once per run, not once per checkpoint
            warnings.warn(extra, stacklevel=1)
        specs = check_layout(chosen, OUT_DTYPES[dtype] if dtype else None)  # before the weights: graft reads tensors
        data = CheckpointData(chosen, specs, _steps_of(progress))
        refuse_scored_soup(plan, lora, specs)
        matrix = plan.weights(chosen, data)
        base = open_base(lora.base, load) if lora and lora.base is not None else None  # lora merge
        base_data = CheckpointData([base], check_layout([base], OUT_DTYPES[dtype] if dtype else None)) if base else None
        adapters = average_adapters(lora, specs, matrix.rows, lambda: [adapter_config(c) for c in chosen], data,
                                    base_data)
        for note in [*plan.notes(chosen, matrix), *(adapters.notes if adapters else ())]:
            warnings.warn(note, stacklevel=1)
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    notes = [w.message for w in caught if isinstance(w.message, CkptavgWarning)]
    specs = adapters.resized(specs) if adapters else specs  # concat and svd at another rank change shapes
    return PlanReport(plan, chosen, matrix, used, specs, select.metric, ordered, notes, skipped, adapters, base)


@dataclass(frozen=True)
class Job:
    """A prepared average: its plan, where each output row goes, and how."""

    report: PlanReport
    outputs: tuple[Output, ...]  # one per row, or one plain file for the row an evaluation keeps
    metadata: tuple[dict[str, str], ...]
    write: WriteOptions
    bn: BatchNormOptions | None
    evaluation: RowEvaluation | None = None
    bn_batches: list[int] = field(default_factory=list)  # batches each BatchNorm pass ran, filled by `produce`

    @property
    def output(self) -> Output:
        """The output of a one-row plan."""
        return self.outputs[0]


def prepare(inputs: Sequence[PathLike] | PathLike, output: PathLike, plan: Plan, *, select: Selection,
            load: LoadOptions, write: WriteOptions, bn: BatchNormOptions | None, parts: int = 1,
            evaluation: RowEvaluation | None = None, progress: Progress | None = None,
            lora: LoraAverage | None = None) -> Job:
    """Plan the average and its output files (`parts` balanced files for a torchrun job), and check that they
    can be written, before any tensor data is read (but for the plans that need it: graft and soup)."""
    resolve_device(write.device)
    found = discover(inputs)
    if write.container:
        refuse_container(output)
    single = not is_folder_output(output) and "{" not in os.fspath(output)
    if single and not (write.max_bytes is not None or write.shards_like_input or parts > 1):
        # fail fast, before a graft or soup plan reads tensors; a file of an input folder is an input too
        inside = [f for p in found.paths if p.is_dir() for f in p.iterdir() if f.is_file()]
        check_output(Path(output), [*found.paths, *inside], write.force)
        output_format(Path(output), "torch" if write.container else write.format)
    if bn is not None:
        bn.check()
    report = _plan(found, plan, select, load, write.dtype, progress, lora)
    config = report.lora.config_text() if report.lora else None  # written, not copied: r and lora_alpha may change
    layout_from = [report.base] if report.base else report.checkpoints  # a merged model is laid out as its base
    rows = report.matrix.rows
    copy = training_output(output, report.specs, report.checkpoints, len(rows), load, write, parts,
                           named=bn or evaluation or getattr(plan, "evaluate", None))
    if copy is not None:  # copies of the newest input's training checkpoints around the average
        copy.check(files_of(report.considered), write.force)
        return Job(report, (copy,), (row_metadata(report, 0, bn),), write, bn, evaluation)
    best_only = evaluation is not None and evaluation.keep == "best"
    # keeping the best row: a plain -o is its file; a template or folder is planned for every row, as the
    # name of the one written comes from the row that wins
    # a row in a folder is a folder where its layout needs one: an adapter's config holds r and alpha; DCP
    suffix = os.sep if config or wants_dcp(report.checkpoints, write.format, parts == 1) else row_suffix(write.format)
    targets = ([os.fspath(output)] if single and (len(rows) == 1 or best_only)
               else row_targets(output, rows, write.format, suffix))
    sharded = write.max_bytes is not None or write.shards_like_input or parts > 1
    outs = []
    for target in targets:
        # one output: an existing directory means a folder; a row's output is a folder only when asked (DIR/)
        to_folder = sharded or (is_folder_output(target) if targets == [os.fspath(output)] else target.endswith(os.sep))
        # DCP inputs give a DCP folder, written by one process: a torchrun job writes safetensors shards
        dcp = wants_dcp(report.checkpoints, write.format, to_folder and parts == 1)
        out = (plan_dcp_output if dcp else plan_output)(target, report.specs, layout_from, to_folder=to_folder,
            max_bytes=write.max_bytes, like_input=write.shards_like_input, parts=parts,
            make_parent=target != os.fspath(output), fmt=write.format, texts={CONFIG: config} if config else None)
        out.check(files_of([*report.considered, *report.sources]), write.force)  # unselected inputs are still inputs
        outs.append(out)
    announce(outs, report.warnings)  # what the outputs leave out, once all of them passed their checks
    if report.lora and report.base is None and any(o.indexed for o in outs):
        warnings.warn(sharded_note(parts), stacklevel=1)
    metadata = tuple(row_metadata(report, r, bn) for r in range(len(outs)))
    return Job(report, tuple(outs), metadata, write, bn, evaluation)


def row_metadata(report: PlanReport, row: int, bn: BatchNormOptions | None,
                 scores: Sequence[dict[str, Any]] = ()) -> dict[str, str]:
    """The __metadata__ of row `row`'s output: its provenance, the BatchNorm options, and the rows' scores."""
    extra = {"ckptavg_bn": json.dumps(bn.params(), sort_keys=True)} if bn else {}
    return provenance(report, row) | extra | ({"ckptavg_scores": json.dumps(list(scores), sort_keys=True)} if scores else {})


def produce(job: Job, into: Sequence[OpenOutput], progress: Progress | None = None) -> None:
    """Compute the average of every output row and hand each to its open output, tensor by tensor in its order,
    reading each block once for all rows (one block per row in memory at a time). BatchNorm recalibration
    builds the averages in memory first, since it runs the model. (`average` scores a job's evaluation itself.)"""
    order = into[0].order
    if any(o.order != order for o in into):  # the same tensors everywhere, so one write order
        raise AssertionError("outputs of one plan disagree on their tensors")
    if job.bn is None:
        _reduce(job, order, [o.sink for o in into], progress)
        return
    _write_states(into, _states(job, progress), range(len(into)))


def _reduce(job: Job, specs: Sequence[TensorSpec], sinks: Sequence[Callable[[TensorSpec, int, torch.Tensor], None]],
            progress: Progress | None) -> None:
    """Stream every row of the plan into its sink, in the order of `specs`, reading each block once."""
    report, write = job.report, job.write
    ckpts, rows = report.checkpoints, report.matrix.rows
    fixed = report.lora.tensors if report.lora else ()  # LoRA factors averaged by the plan, one dict per row
    computed = {name for row in fixed[:1] for name in row}  # (or a whole merged model)
    total = sum(s.nbytes * len(rows) if s.name in computed else work_bytes(s, ckpts, [r.for_tensor(s.name) for r in rows])
                for s in specs)  # a computed tensor (LoRA, a merged model's) counts as the bytes it writes
    done = 0

    def on_read(n: int) -> None:
        nonlocal done
        done += n
        if progress:
            progress(done, total)

    def checked(sink: Callable[[TensorSpec, int, torch.Tensor], None]) -> Callable[[TensorSpec, int, torch.Tensor], None]:
        def check_then_write(spec: TensorSpec, start: int, block: torch.Tensor) -> None:
            if spec.averaged and not write.allow_nonfinite:
                check_finite(spec, block, report.sources)  # a merge's base holds most of its tensors
            sink(spec, start, block)
        return check_then_write

    for done_by_plan, run in groupby(specs, lambda s: s.name in computed):  # in order, as the writers take them
        if done_by_plan:
            for s in run:
                for sink, tensors in zip(sinks, fixed, strict=True):
                    checked(sink)(s, 0, tensors[s.name].reshape(-1))
                    on_read(s.nbytes)
            continue
        stream_rows(list(run), ckpts, lambda s: [r.for_tensor(s.name) for r in rows], [checked(s) for s in sinks],
                    accum_dtype=ACCUM_DTYPES[write.accum_dtype], device=write.device, on_read=on_read)


def _states(job: Job, progress: Progress | None) -> list[dict[str, torch.Tensor]]:
    """Every row's average as a state dict in memory, BatchNorm statistics recomputed if asked."""
    specs = job.report.specs
    states = [{s.name: torch.empty(s.shape, dtype=s.out_dtype) for s in specs} for _ in job.report.matrix.rows]

    def keeper(state: dict[str, torch.Tensor]) -> Callable[[TensorSpec, int, torch.Tensor], None]:
        def keep(spec: TensorSpec, start: int, block: torch.Tensor) -> None:
            state[spec.name].view(-1)[start : start + block.numel()] = block
        return keep

    _reduce(job, specs, [keeper(state) for state in states], progress)
    if job.bn is not None:
        for state in states:
            replaced, batches = recalibrate(state, job.bn, resolve_device(job.write.device), _steps_of(progress))
            state.update(replaced)
            job.bn_batches.append(batches)
    return states


def _write_states(into: Sequence[OpenOutput], states: Sequence[dict[str, torch.Tensor]], rows: Sequence[int]) -> None:
    """Hand row `rows[i]`'s state dict to output `into[i]`, tensor by tensor in its order."""
    for target, r in zip(into, rows, strict=True):
        for spec in target.order:
            target.sink(spec, 0, states[r][spec.name].reshape(-1))


def average(
    inputs: Sequence[PathLike] | PathLike,
    output: PathLike,
    plan: Plan | None = None,
    *,
    select: Selection = Selection(),
    load: LoadOptions = LoadOptions(),
    write: WriteOptions = WriteOptions(),
    bn: BatchNormOptions | None = None,
    progress: Progress | None = None,
    evaluation: RowEvaluation | None = None,
    lora: LoraAverage | None = None,
) -> AverageResult:
    """Average checkpoints into one safetensors file or a folder, streaming one tensor at a time; a plan with
    several output rows (a sweep, windows) writes one output per row, from one read of the inputs.

    Example:
        >>> from ckptavg import average, Selection
        >>> average("runs/", "avg.safetensors", select=Selection(last=5))  # doctest: +SKIP

    Args:
        inputs: files, directories or glob patterns.
        output: the safetensors file to write, or a folder (an existing directory, or a path ending in a
            separator) for a Hugging Face style folder. For several rows, a template with ``{field}``s
            (``ema-{sigma_rel}.safetensors``) or a folder. Written atomically: nothing appears on failure,
            and all rows' outputs appear together.
        plan: the weighting method (default: uniform `Swa()`).
        select, load: as for `plan_checkpoints`.
        write: how to compute and write the result (`WriteOptions`).
        bn: recompute BatchNorm statistics of the average (`torch.optim.swa_utils.update_bn` semantics).
        progress: called with (bytes read, total bytes) as the work advances.
        evaluation: score every row and keep the best (or all), `RowEvaluation`.
        lora: how to average LoRA adapters, as for `plan_checkpoints`.
    """
    started = time.perf_counter()
    job = prepare(inputs, output, plan or Swa(), select=select, load=load, write=write, bn=bn, evaluation=evaluation,
                  progress=progress, lora=lora)
    opened: list[OpenOutput] = []
    committed: list[OpenOutput] = []
    outputs, metadata, rows = list(job.outputs), list(job.metadata), list(range(len(job.outputs)))
    scores: list[dict[str, Any]] = []
    states: list[dict[str, torch.Tensor]] = []
    try:
        if job.evaluation is not None:  # the headers name the rows kept and hold the scores: open after scoring
            states = _states(job, progress)
            scores, rows = score_rows(job.evaluation, job.report.matrix.rows, states)
            if len(outputs) > 1:  # one per row (a template or folder): the kept rows' only
                outputs = [outputs[r] for r in rows]
            metadata = [row_metadata(job.report, r, bn, scores) for r in rows]
        for out, meta in zip(outputs, metadata, strict=True):
            opened.append(out.open(meta))
        if job.evaluation is not None:
            _write_states(opened, states, rows)
        else:
            produce(job, opened, progress)
        check_unchanged(job.report.sources)  # a file rewritten mid-run would mix two saves into the average
        for into in opened:  # before the rename: a file that fails never appears
            into.finish(write.verify, not write.allow_nonfinite)
        for into in opened:
            into.commit(force=write.force)
            committed.append(into)
    except BaseException:
        for into in reversed(opened):  # the last first: the output that created a shared folder removes it last
            into.discard()
        for into in reversed(committed):  # all rows' outputs or none: a sweep is not left half-written
            into.withdraw()
        raise
    files = [f for into in opened for f in into.files]
    return AverageResult(Path(output), job.report, files, time.perf_counter() - started,
                         outputs=[o.path for o in outputs], scores=scores, rows=rows,
                         bn_batches=job.bn_batches[0] if job.bn_batches else None)


def average_checkpoints(
    inputs: Sequence[PathLike] | PathLike,
    output: PathLike,
    plan: Plan | None = None,
    *,
    select: Selection = Selection(),
    load: LoadOptions = LoadOptions(),
    dtype: str | None = None,
    accum_dtype: str = "float64",
    allow_nonfinite: bool = False,
    force: bool = False,
    progress: Progress | None = None,
    bn: BatchNormOptions | None = None,
    device: str = "cpu",
    max_shard_size: str | None = None,
    shards_like_input: bool = False,
    verify: bool = False,
) -> AverageResult:
    """`average` with the `WriteOptions` given one by one (the first round's signature, kept for callers)."""
    write = WriteOptions(dtype, accum_dtype, allow_nonfinite, force, device, max_shard_size, shards_like_input, verify)
    return average(inputs, output, plan, select=select, load=load, write=write, bn=bn, progress=progress)


def recalibrate_bn(
    weights: PathLike, output: PathLike, bn: BatchNormOptions, *, load: LoadOptions = LoadOptions(),
    write: WriteOptions = WriteOptions(), progress: Progress | None = None,
) -> AverageResult:
    """Recompute the BatchNorm statistics of one weights file or checkpoint and write the result.

    Raises:
        BatchNormError: when `weights` is not exactly one checkpoint, the model has no BatchNorm layer, or
            the weights do not fit the model.
    """
    found = find_checkpoints(weights)
    if len(found) != 1:
        raise BatchNormError(f"{weights}: BatchNorm recalibration takes one weights file or checkpoint, "
                             f"not {len(found)}.")
    return average(found, output, Copy(), select=Selection(), load=load, write=write, bn=bn, progress=progress)

