"""The blocked, prefetched reduction: average every tensor at about the speed of reading its bytes.

Each tensor is cut into blocks of `block_elems` elements. For one block, the bytes of every checkpoint
are read with pread (and, on the CPU, widened to float64) by a reader thread into a small pool of
reusable buffers; the first checkpoint's block becomes the accumulator, the others are added into it
while it stays in the CPU cache, and it is then rounded once to the output dtype and handed to a sink
(the writer). Reading and widening overlap adding. Memory is the pool plus one output block: it does
not grow with the number of checkpoints, their size, or even the size of the largest tensor.

Tensors that cannot be read piecewise (legacy pickles, non-contiguous views, other readers' formats)
and non-floating tensors take the whole-tensor path of `reduce.reduce_tensor`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .errors import PlanError
from .readahead import POOL_BUFFERS, Batch, Prefetcher, Read, WeightsFor, Whole, plan_batches
from .reduce import TensorSpec, accumulator_dtype, reduce_tensor, widen
from .sources import Checkpoint

# 128 Ki elements: a 1 MiB float64 accumulator and the 1 MiB block added into it fit the L2 cache, yet the per-block
# Python work is small next to the arithmetic (bench/RESULTS.md, "block size").
CPU_BLOCK_ELEMS = 128 * 1024
# On a GPU the arithmetic is nearly free; large blocks amortise the launch and copy latency.
CUDA_BLOCK_ELEMS = 4 * 1024 * 1024

Sink = Callable[[TensorSpec, int, torch.Tensor], None]  # (spec, first element, block in the output dtype)


def resolve_device(device: str) -> torch.device:
    """Check a --device value (cpu, cuda, cuda:N) against what this machine and torch build offer."""
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise PlanError(f"--device {device!r}: not a device; use cpu, cuda or cuda:N.") from None
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise PlanError(f"--device {device!r}: only cpu and cuda are supported.")
    if not torch.cuda.is_available():
        raise PlanError(f"--device {device}: CUDA is not available (torch {torch.__version__}); use --device cpu.")
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise PlanError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s).")
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
    dev = resolve_device(device)
    cuda = dev.type == "cuda"
    threads = torch.get_num_threads()
    if not cuda:
        # One compute thread: the reader thread needs a core, and a 128Ki-element add is too small to
        # split across threads with a gain (bench/RESULTS.md, "threads").
        torch.set_num_threads(1)
    try:
        _reduce_all(specs, ckpts, weights_for, sink, accum_dtype, dev, on_read, block_elems)
    finally:
        torch.set_num_threads(threads)


def _reduce_all(
    specs: Sequence[TensorSpec], ckpts: Sequence[Checkpoint], weights_for: WeightsFor, sink: Sink,
    accum_dtype: torch.dtype, dev: torch.device, on_read: Callable[[int], None] | None, block_elems: int | None,
) -> None:
    cuda = dev.type == "cuda"
    elems = block_elems or (CUDA_BLOCK_ELEMS if cuda else CPU_BLOCK_ELEMS)
    widest = max((t.dtype.itemsize for c in ckpts for t in c.tensors.values()), default=1)
    # on a GPU the inputs cross to the device in their own (narrower) dtype and are widened there
    reader = Prefetcher(plan_batches(specs, ckpts, weights_for, elems), elems, widest, pin=cuda,
                        widen_to=None if cuda else accum_dtype)
    copies = _CopyTracker(reader, cuda)
    accs: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]] = {}  # (accumulator, scratch) by dtype, reused
    outs: dict[torch.dtype, torch.Tensor] = {}  # reused host buffers for the rounded blocks, by dtype
    block = torch.empty(0)
    held = -1  # the pool slot whose data is the current batch's accumulator (CPU), or -1
    try:
        for item in reader:
            if isinstance(item, Whole):
                spec = specs[item.spec_index]
                whole = reduce_tensor(spec, ckpts, weights_for(spec), accum_dtype, on_read)
                sink(spec, 0, whole.reshape(-1))
                continue
            batch = item.batch
            dtype = accumulator_dtype(specs[batch.pieces[0].spec_index].in_dtype, accum_dtype)
            if item.first and not cuda and item.data is not None and item.data.dtype == dtype:
                # the reader's (widened) copy of the first checkpoint becomes the accumulator: no copy, no
                # extra block of memory; its slot goes back to the reader when the batch is done
                block, held = item.data, item.slot
                if item.weight != 1.0:
                    block.mul_(item.weight)
            else:
                if dtype not in accs:  # torch.empty: pages are touched only when used
                    accs[dtype] = (torch.empty(elems, dtype=dtype, device=dev), torch.empty(elems, dtype=dtype, device=dev))
                if item.first:
                    block = accs[dtype][0][: batch.total]
                _accumulate(block, item, accs[dtype][1])
                if item.data is not None:
                    copies.done_with(item.slot)
            if on_read and item.nbytes:
                on_read(item.nbytes)
            if item.last:
                _finish(batch, block, specs, sink, outs, elems)
                if held >= 0:
                    copies.done_with(held)
                    held = -1
    finally:
        reader.close()


def _finish(batch: Batch, block: torch.Tensor, specs: Sequence[TensorSpec], sink: Sink,
            outs: dict[torch.dtype, torch.Tensor], elems: int) -> None:
    """Divide a finished batch (uniform weights), round it once and hand each tensor's piece to the sink."""
    if batch.divisor:
        block.div_(batch.divisor)
    out = _rounded(block, specs[batch.pieces[0].spec_index].out_dtype, outs, elems)
    at = 0
    for piece in batch.pieces:
        sink(specs[piece.spec_index], piece.start, out[at : at + piece.count])
        at += piece.count


def _rounded(block: torch.Tensor, dtype: torch.dtype, outs: dict[torch.dtype, torch.Tensor], capacity: int) -> torch.Tensor:
    """Round the block once to `dtype` into a reused host buffer: no allocation per block, so the heap
    does not grow (the sink must be done with a block before the next one arrives)."""
    buf = outs.get(dtype)
    if buf is None:
        buf = outs[dtype] = torch.empty(capacity, dtype=dtype, pin_memory=block.device.type == "cuda")
    out = buf[: block.numel()]
    out.copy_(block)
    return out


def _accumulate(block: torch.Tensor, item: Read, scratch: torch.Tensor) -> None:
    """block = data * w on the first read of a batch, block += data * w on the others (in the block's dtype).

    The first read is a copy rather than zero-then-add: one pass over the block instead of two. On the
    CPU the reader thread has already widened the data to the block's dtype; on a GPU later reads are
    widened into `scratch` first: an add_ that mixes dtypes allocates a temporary per call (and on the
    CPU glibc then kept ~16 MiB of freed temporaries resident, bench/RESULTS.md).
    """
    if item.data is None:
        block.zero_()
        return
    data = item.data if item.data.device == block.device else item.data.to(block.device, non_blocking=True)
    data = widen(data)
    if item.first:
        block.copy_(data)
        if item.weight != 1.0:
            block.mul_(item.weight)
        return
    if data.dtype != block.dtype:
        data = scratch[: block.numel()].copy_(data)
    if item.weight == 1.0:
        block.add_(data)
    else:
        block.add_(data, alpha=item.weight)


class _CopyTracker:
    """Return pool buffers to the reader once nothing reads them any more.

    On the CPU that is at once. On a GPU the host-to-device copy is asynchronous, so each buffer
    goes back when an event recorded after its copy has completed; the arithmetic on one block thus
    overlaps the copy of the next and the pread of the one after.
    """

    def __init__(self, reader: Prefetcher, cuda: bool) -> None:
        self._reader = reader
        self._cuda = cuda
        self._pending: list[tuple[torch.cuda.Event, int]] = []

    def done_with(self, slot: int) -> None:
        if not self._cuda:
            self._reader.release(slot)
            return
        event = torch.cuda.Event()  # type: ignore[no-untyped-call]
        event.record()
        self._pending.append((event, slot))
        # keep one buffer free for the reader; wait only when every other one is in flight
        while self._pending and (len(self._pending) >= POOL_BUFFERS - 1 or _complete(self._pending[0][0])):
            ev, done = self._pending.pop(0)
            ev.synchronize()
            self._reader.release(done)


def _complete(event: torch.cuda.Event) -> bool:
    return bool(event.query())  # type: ignore[no-untyped-call]
