"""The library verbs: `plan_checkpoints` (weights only), `average` (the work), `inspect_checkpoint` and
`recalibrate_bn`; and the two phases of an average, `prepare` and `produce`, which `dist` also runs on every
rank of a torchrun job around its own agreement steps.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .bn import BatchNormOptions, recalibrate
from .errors import BatchNormError, PlanError
from .layout import ACCUM_DTYPES, OUT_DTYPES, TensorSpec, check_layout
from .methods.base import Plan
from .methods.uniform import Swa
from .read.checkpoint import Checkpoint, LoadOptions, PathLike
from .read.discover import find_checkpoints
from .read.layouts import open_checkpoint
from .reduce.stream import resolve_device, stream_reduce
from .reduce.tensor import CheckpointData, check_finite, work_bytes
from .results import AverageResult, PlanReport, provenance
from .select import Selection, order_checkpoints, select_checkpoints
from .write.hf_folder import parse_size
from .write.output import OpenOutput, Output, is_folder_output, plan_output
from .write.safetensors import check_output

Progress = Callable[[int, int], None]  # (bytes read so far, total bytes to read)


@dataclass(frozen=True)
class WriteOptions:
    """How an average is computed and written; checked when built.

    Attributes:
        dtype: output dtype of floating tensors (``float32``, ``float16``, ``bfloat16``); None keeps each
            tensor's input dtype.
        accum_dtype: ``float64`` (default) or ``float32`` accumulator for floating tensors.
        allow_nonfinite: average NaN/Inf values instead of refusing them.
        force: overwrite an existing output.
        device: ``cpu``, ``cuda`` or ``cuda:N``: where the arithmetic runs (files are read and written on the
            host either way).
        max_shard_size: write a folder of shards of at most this size ("5GB", "500MiB"), with an index.
        shards_like_input: write a folder sharded like the first input (a sharded Hugging Face folder).
        verify: re-open every written file (with ckptavg's reader and with safetensors) and check each
            tensor's name, shape, dtype and (unless allow_nonfinite) finiteness before renaming it into place.
    """

    dtype: str | None = None
    accum_dtype: str = "float64"
    allow_nonfinite: bool = False
    force: bool = False
    device: str = "cpu"
    max_shard_size: str | None = None
    shards_like_input: bool = False
    verify: bool = False

    def __post_init__(self) -> None:
        if self.accum_dtype not in ACCUM_DTYPES:
            raise PlanError(f"accum_dtype must be one of {', '.join(ACCUM_DTYPES)}, not {self.accum_dtype!r}.",
                            params=("accum_dtype",))
        if self.dtype is not None and self.dtype not in OUT_DTYPES:
            raise PlanError(f"dtype must be one of {', '.join(OUT_DTYPES)}, not {self.dtype!r}.", params=("dtype",))
        if self.max_shard_size is not None:
            parse_size(self.max_shard_size)

    @property
    def max_bytes(self) -> int | None:
        return parse_size(self.max_shard_size) if self.max_shard_size is not None else None


def plan_checkpoints(
    inputs: Sequence[PathLike] | PathLike,
    plan: Plan | None = None,
    *,
    select: Selection = Selection(),
    load: LoadOptions = LoadOptions(),
    dtype: str | None = None,
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

    Raises:
        CkptavgError: with a message naming the file, the key and the fix.
    """
    WriteOptions(dtype=dtype)
    return _plan(find_checkpoints(inputs), plan or Swa(), select, load, dtype)


def _plan(paths: list[Path], plan: Plan, select: Selection, load: LoadOptions, dtype: str | None) -> PlanReport:
    opened = [open_checkpoint(p, load) for p in paths]
    ordered, used = order_checkpoints(opened, select.order)
    chosen = select_checkpoints(ordered, select)
    specs = check_layout(chosen, OUT_DTYPES[dtype] if dtype else None)  # before the weights: graft reads tensors
    matrix = plan.weights(chosen, CheckpointData(chosen, specs))
    return PlanReport(plan, chosen, matrix, used, specs, select.metric, ordered)


@dataclass(frozen=True)
class Job:
    """A prepared average: its plan, where it goes, and how."""

    report: PlanReport
    output: Output
    metadata: dict[str, str]
    write: WriteOptions
    bn: BatchNormOptions | None


def prepare(inputs: Sequence[PathLike] | PathLike, output: PathLike, plan: Plan, *, select: Selection,
            load: LoadOptions, write: WriteOptions, bn: BatchNormOptions | None, parts: int = 1) -> Job:
    """Plan the average and its output files (`parts` balanced files for a torchrun job), and check that they
    can be written, before any tensor data is read."""
    resolve_device(write.device)
    to_folder = is_folder_output(output) or write.max_bytes is not None or write.shards_like_input or parts > 1
    paths = find_checkpoints(inputs)
    if not to_folder:
        check_output(Path(output), paths, write.force)  # fail fast, before a graft or soup plan reads tensors
    if bn is not None:
        bn.check()
    report = _plan(paths, plan, select, load, write.dtype)
    target = plan_output(output, report.specs, report.checkpoints, to_folder=to_folder, max_bytes=write.max_bytes,
                         like_input=write.shards_like_input, parts=parts)
    target.check(_files_read(report.considered), write.force)  # unselected inputs are still inputs
    metadata = provenance(report) | ({"ckptavg_bn": json.dumps(bn.params(), sort_keys=True)} if bn else {})
    return Job(report, target, metadata, write, bn)


def produce(job: Job, into: OpenOutput, progress: Progress | None = None) -> None:
    """Compute the average and hand it to `into`, tensor by tensor in its order (one block in memory at a time);
    with BatchNorm recalibration, the whole average is built in memory first, since that pass runs the model."""
    ckpts, weights, write = job.report.checkpoints, job.report.weights, job.write
    total = sum(work_bytes(s, ckpts, [weights.for_tensor(s.name)]) for s in into.order)
    done = 0

    def on_read(n: int) -> None:
        nonlocal done
        done += n
        if progress:
            progress(done, total)

    def checked(spec: TensorSpec, start: int, block: torch.Tensor) -> None:
        if spec.averaged and not write.allow_nonfinite:
            check_finite(spec, block, ckpts)
        into.sink(spec, start, block)

    def reduce(specs: Sequence[TensorSpec], sink: Callable[[TensorSpec, int, torch.Tensor], None]) -> None:
        stream_reduce(specs, ckpts, lambda s: weights.for_tensor(s.name), sink,
                      accum_dtype=ACCUM_DTYPES[write.accum_dtype], device=write.device, on_read=on_read)

    if job.bn is None:
        reduce(into.order, checked)
        return
    tensors = {s.name: torch.empty(s.shape, dtype=s.out_dtype) for s in job.report.specs}

    def keep(spec: TensorSpec, start: int, block: torch.Tensor) -> None:
        if spec.averaged and not write.allow_nonfinite:
            check_finite(spec, block, ckpts)
        tensors[spec.name].view(-1)[start : start + block.numel()] = block

    reduce(job.report.specs, keep)
    tensors.update(recalibrate(tensors, job.bn, resolve_device(write.device)))
    for spec in into.order:
        into.sink(spec, 0, tensors[spec.name].reshape(-1))


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
) -> AverageResult:
    """Average checkpoints into one safetensors file or a folder, streaming one tensor at a time.

    Example:
        >>> from ckptavg import average, Selection
        >>> average("runs/", "avg.safetensors", select=Selection(last=5))  # doctest: +SKIP

    Args:
        inputs: files, directories or glob patterns.
        output: the safetensors file to write, or a folder (an existing directory, or a path ending in a
            separator) for a Hugging Face style folder. Written atomically: nothing appears on failure.
        plan: the weighting method (default: uniform `Swa()`).
        select, load: as for `plan_checkpoints`.
        write: how to compute and write the result (`WriteOptions`).
        bn: recompute BatchNorm statistics of the average (`torch.optim.swa_utils.update_bn` semantics).
        progress: called with (bytes read, total bytes) as the work advances.
    """
    started = time.perf_counter()
    job = prepare(inputs, output, plan or Swa(), select=select, load=load, write=write, bn=bn)
    into = job.output.open(job.metadata)
    try:
        produce(job, into, progress)
        into.finish(write.verify, not write.allow_nonfinite)  # before the rename: a file that fails never appears
        into.commit()
    except BaseException:
        into.discard()
        raise
    return AverageResult(Path(output), job.report, into.files, time.perf_counter() - started)


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
    return average(found, output, Swa(), select=Selection(), load=load, write=write, bn=bn, progress=progress)


def _files_read(ckpts: Sequence[Checkpoint]) -> list[Path]:
    """Every file an input is made of: the file itself, its shards, and all files of a checkpoint folder
    (index, trainer_state.json, config), so that none can be overwritten by the output."""
    files = {c.path for c in ckpts} | {t.path for c in ckpts for t in c.tensors.values()}
    files |= {p for c in ckpts if c.path.is_dir() for p in c.path.iterdir() if p.is_file()}
    return sorted(files, key=os.fspath)


def inspect_checkpoint(path: PathLike, load: LoadOptions = LoadOptions()) -> dict[str, Any]:
    """Describe one checkpoint without reading its tensor data: format, weights location, metadata, tensors.

    For a file written by ckptavg, the ``ckptavg`` entry holds its provenance (version, method,
    parameters, inputs with their weights).
    """
    c = open_checkpoint(path, load)
    info: dict[str, Any] = {
        "path": str(c.path), "format": c.format, "location": c.location, "stripped_prefix": c.stripped_prefix,
        "step": c.meta.step, "step_source": c.meta.step_source,
        "epoch": c.meta.epoch, "epoch_source": c.meta.epoch_source,
        "other_entries": c.other_entries, "file_metadata": c.file_metadata,
        "tensors": [
            {"name": k, "dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape), "bytes": t.nbytes}
            for k, t in c.tensors.items()
        ],
        "bytes": c.nbytes,
    }
    meta = c.file_metadata
    if "ckptavg_version" in meta:
        with contextlib.suppress(json.JSONDecodeError):  # damaged provenance: show the raw metadata instead
            info["ckptavg"] = {
                "version": meta["ckptavg_version"], "method": meta.get("ckptavg_method"),
                "params": json.loads(meta.get("ckptavg_params", "{}")), "order": meta.get("ckptavg_order"),
                "inputs": json.loads(meta.get("ckptavg_inputs", "[]")),
            }
    return info
