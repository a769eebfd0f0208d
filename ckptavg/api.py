"""The library entry points: `plan_checkpoints` (weights only) and `average_checkpoints` (the work)."""

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

from . import dist
from .bn import BatchNormOptions, recalibrate
from .errors import OutputError, PlanError
from .layout import ACCUM_DTYPES, OUT_DTYPES, Sink, TensorSpec, check_layout
from .methods.base import Plan
from .methods.uniform import Swa
from .read.checkpoint import Checkpoint, LoadOptions, PathLike
from .read.discover import find_checkpoints
from .read.layouts import open_checkpoint
from .reduce.stream import resolve_device, stream_reduce
from .reduce.tensor import CheckpointData, check_finite, work_bytes
from .results import AverageResult, PlanReport, WrittenFile, provenance
from .select import Selection, order_checkpoints, select_checkpoints
from .write.hf_folder import (
    INDEX,
    Shard,
    balance,
    check_folder,
    commit,
    discard,
    index_json,
    is_folder_output,
    parse_size,
    plan_shards,
    sidecars,
    write_shards,
)
from .write.safetensors import SafetensorsWriter, check_output
from .write.verify import verify_output

Progress = Callable[[int, int], None]  # (bytes read so far, total bytes to read)


def plan_checkpoints(
    inputs: Sequence[PathLike] | PathLike,
    plan: Plan | None = None,
    *,
    select: Selection = Selection(),
    load: LoadOptions = LoadOptions(),
    dtype: str | None = None,
) -> PlanReport:
    """Find, order and select checkpoints and compute the plan's weights; read no tensor data.

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
    return _plan(find_checkpoints(inputs), plan or Swa(), select, load, dtype)


def _plan(paths: list[Path], plan: Plan, select: Selection, load: LoadOptions, dtype: str | None) -> PlanReport:
    out_dtype = _out_dtype(dtype)
    opened = [open_checkpoint(p, load) for p in paths]
    ordered, used = order_checkpoints(opened, select.order)
    chosen = select_checkpoints(ordered, select)
    specs = check_layout(chosen, out_dtype)  # before the weights: grafts and soups read tensor data
    matrix = plan.weights(chosen, CheckpointData(chosen, specs))
    return PlanReport(plan, chosen, matrix, used, specs, select.metric, ordered)


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
    """Average checkpoints into one safetensors file, streaming one tensor at a time.

    Example:
        >>> from ckptavg import average_checkpoints, Selection
        >>> average_checkpoints("runs/", "avg.safetensors", select=Selection(last=5))  # doctest: +SKIP

    Args:
        inputs: files, directories or glob patterns.
        output: the safetensors file to write, or a folder (an existing directory, or a path ending in a
            separator) for a Hugging Face style folder. Written atomically: nothing appears on failure.
        plan: the weighting method (default: uniform `Swa()`).
        select, load, dtype: as for `plan_checkpoints`.
        accum_dtype: ``float64`` (default) or ``float32`` accumulator for floating tensors.
        allow_nonfinite: average NaN/Inf values instead of refusing them.
        force: overwrite an existing output.
        progress: called with (bytes read, total bytes) as the work advances.
        device: ``cpu``, ``cuda`` or ``cuda:N``: where the arithmetic runs (inputs are read and the output
            written on the host either way).
        max_shard_size: write a folder of shards of at most this size ("5GB", "500MiB"), with an index.
        shards_like_input: write a folder sharded like the first input (a sharded Hugging Face folder).
        verify: re-open every written file (with ckptavg's reader and with safetensors) and check each
            tensor's name, shape, dtype and (unless allow_nonfinite) finiteness before renaming it into place.
        bn: recompute BatchNorm statistics of the average (`torch.optim.swa_utils.update_bn` semantics).
    """
    started = time.perf_counter()
    if accum_dtype not in ACCUM_DTYPES:
        raise PlanError(f"accum_dtype must be one of {', '.join(ACCUM_DTYPES)}, not {accum_dtype!r}.")
    max_bytes = parse_size(max_shard_size) if max_shard_size is not None else None
    out = Path(output)
    to_folder = is_folder_output(output) or max_bytes is not None or shards_like_input or dist.launched()
    dev = resolve_device(device)
    group = dist.join(dev)
    if group and bn is not None:
        raise PlanError("BatchNorm recalibration needs the whole model in one process; run it without torchrun.")
    report, job = dist.agreed(group, lambda: _prepare(
        inputs, out, to_folder, plan or Swa(), select, load, dtype, force, bn, max_bytes, shards_like_input, group))
    total = sum(work_bytes(s, report.checkpoints, report.weights.for_tensor(s.name)) for sh in job.mine for s in sh.specs)
    done = 0

    def on_read(n: int) -> None:
        nonlocal done
        done += n
        if progress:
            progress(done, total)

    def checked(spec: TensorSpec, block: torch.Tensor) -> torch.Tensor:
        if spec.averaged and not allow_nonfinite:
            check_finite(spec, block, report.checkpoints)
        return block

    def reduce(specs: Sequence[TensorSpec], sink: Sink) -> None:
        stream_reduce(specs, report.checkpoints, lambda s: report.weights.for_tensor(s.name),
                      lambda spec, start, block: sink(spec, start, checked(spec, block)),
                      accum_dtype=ACCUM_DTYPES[accum_dtype], device=device, on_read=on_read)

    def fill(order: Sequence[TensorSpec], sink: Sink) -> None:
        if bn is None:  # stream: one block in memory at a time
            reduce(order, sink)
            return
        # the BatchNorm pass runs the whole model, so the average is built in memory first
        tensors = {s.name: torch.empty(s.shape, dtype=s.out_dtype) for s in report.specs}

        def keep(spec: TensorSpec, start: int, block: torch.Tensor) -> None:
            tensors[spec.name].view(-1)[start : start + block.numel()] = block

        reduce(report.specs, keep)
        tensors.update(recalibrate(tensors, bn, dev))
        for spec in order:
            sink(spec, 0, tensors[spec.name].reshape(-1))

    metadata = provenance(report) | ({"ckptavg_bn": json.dumps(bn.params(), sort_keys=True)} if bn else {})
    writers: list[SafetensorsWriter] = []
    try:  # finished temp files wait until every rank has finished its own, then are renamed
        dist.agreed(group, lambda: writers.extend(write_shards(job.folder, job.mine, metadata, fill)))
        if verify:  # before the rename: a file that fails the check never appears
            dist.agreed(group, lambda: _verify(writers, not allow_nonfinite))
        lead = group is None or group.rank == 0
        index = index_json(job.shards) if to_folder and len(job.shards) > 1 and lead else None
        dist.agreed(group, lambda: commit(job.folder, writers, job.copies if lead else [], index))
    except BaseException:
        discard(writers)
        raise
    files = [WrittenFile(w.path, w.nbytes, w.sha256) for w in writers]
    if group is not None:
        files = sorted((f for part in group.gather(files) for f in part), key=lambda f: f.path)
        group.close()
    return AverageResult(out, report, files, time.perf_counter() - started)


def _verify(writers: Sequence[SafetensorsWriter], check_finite: bool) -> None:
    for w in writers:
        if w.done is not None:
            try:
                verify_output(w.done, w.order, check_finite)
            except OutputError as e:  # name the output the user asked for, not the temp file it would have become
                raise OutputError(str(e).replace(str(w.done), str(w.path)) + " Nothing was written.") from None


@dataclass(frozen=True)
class _Job:
    folder: Path
    shards: list[Shard]  # every output file
    mine: list[Shard]  # those this process writes
    copies: list[Path]  # sidecar files to copy into an output folder


def _prepare(inputs: Sequence[PathLike] | PathLike, out: Path, to_folder: bool, plan: Plan, select: Selection,
             load: LoadOptions, dtype: str | None, force: bool, bn: BatchNormOptions | None, max_bytes: int | None,
             like_input: bool, group: dist.Ranks | None) -> tuple[PlanReport, _Job]:
    """Plan the average and the output files, and check that they can be written."""
    paths = find_checkpoints(inputs)
    if not to_folder:
        check_output(out, paths, force)  # fail fast, before a graft or soup plan reads tensors
    if bn is not None:
        bn.check()
    report = _plan(paths, plan, select, load, dtype)
    read = _files_read(report.considered)  # unselected inputs are still inputs
    if not to_folder:
        check_output(out, read, force)
        return report, _Job(out.parent, [Shard(out.name, tuple(report.specs))], [Shard(out.name, tuple(report.specs))], [])
    world, rank = (group.world, group.rank) if group else (1, 0)
    shards = plan_shards(report.specs, max_bytes, report.checkpoints[0] if like_input else None, parts=world)
    owner = balance([sh.nbytes for sh in shards], world)
    copies = sidecars(report.checkpoints)
    check_folder(out, [sh.name for sh in shards] + [p.name for p in copies] + ([INDEX] if len(shards) > 1 else []),
                 read, force)
    out.mkdir(exist_ok=True)
    return report, _Job(out, shards, [sh for sh, o in zip(shards, owner, strict=True) if o == rank], copies)


def _out_dtype(dtype: str | None) -> torch.dtype | None:
    if dtype is None:
        return None
    if dtype not in OUT_DTYPES:
        raise PlanError(f"dtype must be one of {', '.join(OUT_DTYPES)}, not {dtype!r}.")
    return OUT_DTYPES[dtype]


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
