"""The GPU reducer: a reader thread fills pinned host buffers whose copies to the device overlap the arithmetic."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..layout import Sink, TensorSpec, accumulator_dtype
from ..read.checkpoint import Checkpoint
from .batches import POOL_BUFFERS, Prefetcher, RowsFor, Whole, hand_over, plan_batches, widest_itemsize
from .tensor import add_share, reduce_rows


def reduce_cuda(
    specs: Sequence[TensorSpec], ckpts: Sequence[Checkpoint], rows_for: RowsFor, sinks: Sequence[Sink],
    accum_dtype: torch.dtype, dev: torch.device, on_read: Callable[[int], None] | None, elems: int,
) -> None:
    """The GPU reducer: a reader thread fills pinned buffers, which cross to the device in their own
    (narrower) dtype once and are widened and added there, into every row that weighs them, while the
    next ones are read."""
    widest = widest_itemsize(ckpts)
    reader = Prefetcher(plan_batches(specs, ckpts, rows_for, elems), elems, widest, pin=True)
    copies = _CopyTracker(reader)
    blocks: dict[tuple[str, torch.dtype], torch.Tensor] = {}  # reused device blocks by (role, dtype)
    outs: dict[torch.dtype, torch.Tensor] = {}  # reused pinned host buffers for the rounded blocks, by dtype
    started: list[bool] = []
    try:
        for item in reader:
            if isinstance(item, Whole):
                spec = specs[item.spec_index]
                for sink, whole in zip(sinks, reduce_rows(spec, ckpts, rows_for(spec), accum_dtype, on_read), strict=True):
                    sink(spec, 0, whole.reshape(-1))
                continue
            batch = item.batch
            dtype = accumulator_dtype(specs[batch.pieces[0].spec_index].in_dtype, accum_dtype)

            def block(role: str, dtype: torch.dtype = dtype, total: int = batch.total) -> torch.Tensor:
                if (role, dtype) not in blocks:
                    blocks[role, dtype] = torch.empty(elems, dtype=dtype, device=dev)
                return blocks[role, dtype][:total]

            if item.first:
                started = [False] * len(batch.rows)
            if item.data is not None:
                data = item.data.to(dev, non_blocking=True)
                copies.done_with(item.slot)
                for r, row in enumerate(batch.rows):
                    weight = dict(row.terms).get(item.index)
                    if weight is not None:
                        add_share(block(f"acc{r}"), data, not started[r], weight, block("scratch"))
                        started[r] = True
            if on_read and item.nbytes:
                on_read(item.nbytes)
            if item.last:
                for r, (row, sink) in enumerate(zip(batch.rows, sinks, strict=True)):
                    acc = block(f"acc{r}")
                    if not started[r]:
                        acc.zero_()
                    if row.divisor:
                        acc.div_(row.divisor)
                    hand_over(batch, _rounded(acc, specs[batch.pieces[0].spec_index].out_dtype, outs, elems), specs, sink)
    finally:
        reader.close()


def _rounded(block: torch.Tensor, dtype: torch.dtype, outs: dict[torch.dtype, torch.Tensor], capacity: int) -> torch.Tensor:
    """Round the block once to `dtype` into a reused pinned host buffer: no allocation per block, so the heap
    does not grow (the sink must be done with a block before the next one arrives)."""
    buf = outs.get(dtype)
    if buf is None:
        buf = outs[dtype] = torch.empty(capacity, dtype=dtype, pin_memory=True)
    out = buf[: block.numel()]
    out.copy_(block)
    return out


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
