"""Distributed averaging under torchrun: every rank reads and writes only its share of the tensors.

`torchrun --nproc-per-node K -m ckptavg swa runs/ -o out/` starts K processes; each joins a
torch.distributed group (gloo on the CPU, nccl with --device cuda), computes the same plan, takes the
shards that a size-balanced assignment gives it, and writes them. The ranks agree after each phase:
if any rank failed, all stop with that rank's message and remove what they wrote; rank 0 writes the
index and the sidecar files last.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from .errors import CkptavgError

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


def average_checkpoints(*args: Any, **kwargs: Any) -> Any:
    """`api.average_checkpoints`, run by every rank of a torchrun job (or alone when not launched by torchrun).

    The command line calls this, never the API directly, so that `torchrun ... -m ckptavg` works.
    """
    from .api import average_checkpoints as average

    return average(*args, **kwargs)
