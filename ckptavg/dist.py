"""Distributed averaging under torchrun: every rank reads and writes only its share of the tensors.

This module drives the API's phases (`api.prepare`, `api.produce`, the output's `finish` and `commit`) and
agrees with the other ranks between them; the API knows nothing of it.

`torchrun --nproc-per-node K -m ckptavg swa runs/ -o out/` starts K processes; each joins a
torch.distributed group (gloo on the CPU, nccl with --device cuda), computes the same plan, takes the
shards that a size-balanced assignment gives it, and writes them. The ranks agree after each phase:
if any rank failed, all stop with that rank's message and remove what they wrote; rank 0 writes the
index and the sidecar files last.
"""

from __future__ import annotations

import datetime
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch

from . import api
from .api import Progress
from .bn import BatchNormOptions
from .errors import CkptavgError, PlanError
from .methods.base import Plan
from .methods.lora import LoraAverage
from .methods.uniform import Swa
from .read.checkpoint import LoadOptions, PathLike, check_unchanged
from .reduce.stream import resolve_device
from .results import AverageResult, RowEvaluation
from .select import Selection
from .write.hf_folder import balance
from .write.options import WriteOptions

T = TypeVar("T")


@dataclass(frozen=True)
class Ranks:
    """This process's place in a torchrun job."""

    rank: int
    world: int

    def agree(self, error: BaseException | None) -> None:
        """Exchange success or failure with every rank; raise if any rank failed (this one's own error first)."""
        import torch.distributed as dist

        messages: list[str | None] = [None] * self.world
        dist.all_gather_object(messages, None if error is None else str(error))
        if error is not None:
            raise error
        failed = [(r, m) for r, m in enumerate(messages) if m is not None]
        if failed:
            r, m = failed[0]
            raise CkptavgError(f"rank {r} of {self.world} failed: {m}")

    def gather(self, value: T) -> list[T]:
        import torch.distributed as dist

        out: list[T | None] = [None] * self.world
        dist.all_gather_object(out, value)
        return [v for v in out if v is not None]

    def close(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def launched() -> bool:
    """True inside a torchrun job of more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def join(device: torch.device) -> Ranks | None:
    """Join the torchrun job (None when not launched by torchrun with several processes)."""
    if not launched():
        return None
    import torch.distributed as dist

    if not dist.is_available():
        raise CkptavgError("this torch build has no torch.distributed; run ckptavg as a single process.")
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
    return Ranks(dist.get_rank(), dist.get_world_size())


def agreed(group: Ranks | None, step: Callable[[], T]) -> T:
    """Run one phase on every rank; fail on every rank if it failed on any."""
    if group is None:
        return step()
    try:
        result = step()
    except CkptavgError as e:
        group.agree(e)
        raise
    group.agree(None)
    return result


def average(inputs: Sequence[PathLike] | PathLike, output: PathLike, plan: Plan | None = None, *,
            select: Selection = Selection(), load: LoadOptions = LoadOptions(), write: WriteOptions = WriteOptions(),
            bn: BatchNormOptions | None = None, progress: Progress | None = None,
            evaluation: RowEvaluation | None = None, lora: LoraAverage | None = None) -> AverageResult:
    """`api.average` on every rank of a torchrun job, or `api.average` itself when not launched by torchrun.

    Every rank plans the same folder of `world` balanced shards and writes the ones `balance` gives it; the
    ranks agree after each phase, so all fail together with the first failing rank's message and remove what
    they wrote. Rank 0 writes the sidecars and the index last.
    """
    ranks = join(resolve_device(write.device))
    if ranks is None:
        return api.average(inputs, output, plan, select=select, load=load, write=write, bn=bn, progress=progress,
                           evaluation=evaluation, lora=lora)
    started = time.perf_counter()
    if bn is not None:
        raise PlanError("BatchNorm recalibration needs the whole model in one process; run it without torchrun.")
    if evaluation is not None:
        raise PlanError("evaluate needs the whole model in one process; run it without torchrun.",
                        params=("evaluate",))
    job = agreed(ranks, lambda: _prepared(inputs, output, plan or Swa(), select, load, write, ranks.world, lora))
    owner = balance([sh.nbytes for sh in job.output.shards], ranks.world)
    into = agreed(ranks, lambda: job.output.open(job.metadata[0], [sh for sh, o in zip(job.output.shards, owner,
                                                                                     strict=True) if o == ranks.rank]))
    try:  # finished temp files wait until every rank has finished its own, then are renamed
        agreed(ranks, lambda: api.produce(job, [into], progress))
        agreed(ranks, lambda: check_unchanged(job.report.sources))
        agreed(ranks, lambda: into.finish(write.verify, not write.allow_nonfinite))
        agreed(ranks, lambda: into.commit(lead=ranks.rank == 0, force=write.force))
    except BaseException:
        into.discard()
        raise
    files = sorted((f for part in ranks.gather(into.files) for f in part), key=lambda f: f.path)
    ranks.close()
    return AverageResult(Path(output), job.report, files, time.perf_counter() - started)


def _prepared(inputs: Sequence[PathLike] | PathLike, output: PathLike, plan: Plan, select: Selection,
              load: LoadOptions, write: WriteOptions, world: int, lora: LoraAverage | None = None) -> api.Job:
    job = api.prepare(inputs, output, plan, select=select, load=load, write=write, bn=None, parts=world, lora=lora)
    if len(job.outputs) > 1:
        raise PlanError(f"this plan gives {len(job.outputs)} outputs; a torchrun job writes one: run it without "
                        "torchrun, or one row at a time.")
    return job
