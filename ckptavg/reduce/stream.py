"""The blocked reduction: average every tensor at about the speed of reading its bytes.

Each tensor is cut into blocks of `block_elems` elements (small tensors are gathered into one block,
`batches.plan_batches`). For one block, every checkpoint's share is read with pread, widened and added
into a float64 accumulator that stays in the CPU cache, divided, rounded once to the output dtype and
handed to a sink (the writer), in order. Memory is a few blocks: it does not grow with the number of
checkpoints, their size, or even the size of the largest tensor.

On the CPU, worker threads each reduce whole blocks (`cpu.py`); on a GPU, a reader thread fills
pinned buffers whose copies to the device overlap the arithmetic there (`cuda.py`). Tensors that
cannot be read piecewise (legacy pickles, non-contiguous views, other readers' formats) and
non-floating tensors take the whole-tensor path of `tensor.reduce_tensor`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..errors import PlanError
from ..layout import Sink, TensorSpec
from ..read.checkpoint import Checkpoint
from .batches import RowsFor, WeightsFor
from .cpu import stream_cpu_rows
from .cuda import reduce_cuda

# 128 Ki elements: a 1 MiB float64 accumulator and the 1 MiB block added into it fit the L2 cache, yet the per-block
# Python work is small next to the arithmetic (bench/RESULTS.md, "block size").
CPU_BLOCK_ELEMS = 128 * 1024
# On a GPU the arithmetic is nearly free; large blocks amortise the launch and copy latency.
CUDA_BLOCK_ELEMS = 4 * 1024 * 1024


def resolve_device(device: str) -> torch.device:
    """Check a --device value (cpu, cuda, cuda:N) against what this machine and torch build offer."""
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise PlanError(f"device {device!r}: not a device; use cpu, cuda or cuda:N.", params=("device",)) from None
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise PlanError(f"device {device!r}: only cpu and cuda are supported.", params=("device",))
    if not torch.cuda.is_available():
        raise PlanError(f"device {device}: CUDA is not available (torch {torch.__version__}); use device cpu.", params=("device",))
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise PlanError(f"device {device}: this machine has {torch.cuda.device_count()} CUDA device(s).", params=("device",))
    return dev


def stream_reduce(
    specs: Sequence[TensorSpec],
    ckpts: Sequence[Checkpoint],
    weights_for: WeightsFor,
    sink: Sink,
    *,
    accum_dtype: torch.dtype = torch.float64,
    device: str = "cpu",
    on_read: Callable[[int], None] | None = None,
    block_elems: int | None = None,
) -> None:
    """Reduce every spec, in order, handing each finished block to `sink` in the output dtype.

    Blocks of one tensor arrive in order, and tensors arrive in the order of `specs`. A block lives in a
    reused buffer: it is valid until the sink returns, so a sink that keeps it must copy it.
    """
    stream_rows(specs, ckpts, lambda s: [weights_for(s)], [sink], accum_dtype=accum_dtype, device=device,
                on_read=on_read, block_elems=block_elems)


def stream_rows(
    specs: Sequence[TensorSpec],
    ckpts: Sequence[Checkpoint],
    rows_for: RowsFor,
    sinks: Sequence[Sink],
    *,
    accum_dtype: torch.dtype = torch.float64,
    device: str = "cpu",
    on_read: Callable[[int], None] | None = None,
    block_elems: int | None = None,
) -> None:
    """Reduce every spec into several outputs at once (the rows of a weight matrix), reading each block once.

    `rows_for(spec)` gives one weight vector per output; output r's blocks go to `sinks[r]`, and each row's
    blocks are bit for bit those that `stream_reduce` gives for that row alone.
    """
    dev = resolve_device(device)
    if dev.type == "cuda":
        reduce_cuda(specs, ckpts, rows_for, sinks, accum_dtype, dev, on_read, block_elems or CUDA_BLOCK_ELEMS)
        return
    stream_cpu_rows(specs, ckpts, rows_for, sinks, accum_dtype, on_read, block_elems or CPU_BLOCK_ELEMS)
