"""The GPU reducer: a reader thread fills pinned host buffers whose copies to the device overlap the arithmetic."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..layout import Sink, TensorSpec, accumulator_dtype
from ..read.checkpoint import Checkpoint
from .batches import POOL_BUFFERS, Batch, Prefetcher, Read, WeightsFor, Whole, hand_over, plan_batches, widest_itemsize
from .tensor import add_share, reduce_tensor


def reduce_cuda(
    specs: Sequence[TensorSpec], ckpts: Sequence[Checkpoint], weights_for: WeightsFor, sink: Sink,
    accum_dtype: torch.dtype, dev: torch.device, on_read: Callable[[int], None] | None, elems: int,
) -> None:
    """The GPU reducer: a reader thread fills pinned buffers, which cross to the device in their own
    (narrower) dtype and are widened and added there while the next ones are read."""
    widest = widest_itemsize(ckpts)
    reader = Prefetcher(plan_batches(specs, ckpts, weights_for, elems), elems, widest, pin=True)
    copies = _CopyTracker(reader)
    accs: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]] = {}  # (accumulator, scratch) by dtype, reused
    outs: dict[torch.dtype, torch.Tensor] = {}  # reused pinned host buffers for the rounded blocks, by dtype
    block = torch.empty(0)
    try:
        for item in reader:
            if isinstance(item, Whole):
                spec = specs[item.spec_index]
                whole = reduce_tensor(spec, ckpts, weights_for(spec), accum_dtype, on_read)
                sink(spec, 0, whole.reshape(-1))
                continue
            batch = item.batch
            dtype = accumulator_dtype(specs[batch.pieces[0].spec_index].in_dtype, accum_dtype)
            if dtype not in accs:
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
    finally:
        reader.close()


def _finish(batch: Batch, block: torch.Tensor, specs: Sequence[TensorSpec], sink: Sink,
            outs: dict[torch.dtype, torch.Tensor], elems: int) -> None:
    """Divide a finished batch (uniform weights), round it once and hand each tensor's piece to the sink."""
    if batch.divisor:
        block.div_(batch.divisor)
    hand_over(batch, _rounded(block, specs[batch.pieces[0].spec_index].out_dtype, outs, elems), specs, sink)


def _rounded(block: torch.Tensor, dtype: torch.dtype, outs: dict[torch.dtype, torch.Tensor], capacity: int) -> torch.Tensor:
    """Round the block once to `dtype` into a reused pinned host buffer: no allocation per block, so the heap
    does not grow (the sink must be done with a block before the next one arrives)."""
    buf = outs.get(dtype)
    if buf is None:
        buf = outs[dtype] = torch.empty(capacity, dtype=dtype, pin_memory=True)
    out = buf[: block.numel()]
    out.copy_(block)
    return out


def _accumulate(block: torch.Tensor, item: Read, scratch: torch.Tensor) -> None:
    """Add one checkpoint's share of a batch into the block on the device (see `reduce.add_share`)."""
    if item.data is None:
        block.zero_()
        return
    add_share(block, item.data.to(block.device, non_blocking=True), item.first, item.weight, scratch)


class _CopyTracker:
    """Return pool buffers to the reader once nothing reads them any more.

    The host-to-device copy is asynchronous, so each buffer goes back when an event recorded after its
    copy has completed; the arithmetic on one block thus overlaps the copy of the next and the pread of
    the one after.
    """

    def __init__(self, reader: Prefetcher) -> None:
        self._reader = reader
        self._pending: list[tuple[torch.cuda.Event, int]] = []

    def done_with(self, slot: int) -> None:
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
