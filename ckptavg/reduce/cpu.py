"""The CPU reducer: worker threads that each reduce whole batches and hand them to the sink in order.

Each worker takes the next batch of `batches.plan_batches`, reads every checkpoint's share of it with
pread into its own buffer, widens it to the accumulator dtype, adds it into its own accumulator (which
stays in the CPU cache), divides, rounds once to the output dtype, and then waits for its turn to hand
the result to the sink. The turn keeps the sink's contract (blocks in order, one at a time); the reads
and the arithmetic of two batches run at once, on two cores, without the per-read hand-offs that a
separate reader thread needs (bench/RESULTS.md, "two workers").

Memory is a few blocks per worker: it does not grow with the number of checkpoints, their size, or even
the size of the largest tensor.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence

import torch

from ..layout import Sink, TensorSpec, accumulator_dtype, byte_view
from ..read.checkpoint import Checkpoint
from .batches import Batch, FileHandles, RowsFor, WeightsFor, Whole, hand_over, plan_batches, read_share, widest_itemsize
from .tensor import add_share, reduce_rows

# Two: measured on the 2-core CI-class machine, where the sha256 thread needs a share of the cores too
# (one: 2.65 s against 2.30 s for 8 x 475 MiB; three: slower than two).
# Each worker holds 2.5 blocks of memory: its read buffer (which also takes the rounded result), its
# accumulator and a scratch block for widening; 2.5 MiB at 128 Ki elements.
WORKERS = 2


class _Failed(Exception):
    """Another worker failed: stop quietly (its error is the one raised)."""


class _Turns:
    """Hands out work items in order and lets their results reach the sink in that same order."""

    def __init__(self, work: Iterator[Batch | Whole]) -> None:
        self._work = enumerate(work)
        self._take = threading.Lock()  # a generator cannot be advanced by two threads at once
        self._turn = threading.Condition()
        self._next = 0  # the item whose result goes to the sink next
        self.error: BaseException | None = None

    def take(self) -> tuple[int, Batch | Whole] | None:
        with self._take:
            if self.error is not None:
                raise _Failed
            return next(self._work, None)

    def wait(self, seq: int) -> None:
        with self._turn:
            while self._next != seq and self.error is None:
                self._turn.wait()
            if self.error is not None:
                raise _Failed

    def done(self) -> None:
        with self._turn:
            self._next += 1
            self._turn.notify_all()

    def fail(self, e: BaseException) -> None:
        with self._turn:
            if self.error is None:
                self.error = e
            self._turn.notify_all()


class _Worker:
    """One worker's buffers (reused for every batch) and its loop."""

    def __init__(self, specs: Sequence[TensorSpec], ckpts: Sequence[Checkpoint], rows_for: RowsFor,
                 sinks: Sequence[Sink], accum_dtype: torch.dtype, on_read: Callable[[int], None] | None,
                 elems: int, itemsize: int) -> None:
        self._specs, self._ckpts, self._rows_for, self._sinks = specs, ckpts, rows_for, sinks
        self._accum_dtype, self._on_read, self._elems = accum_dtype, on_read, elems
        # torch.empty: pages become resident only when first used
        self._raw = torch.empty(elems * itemsize, dtype=torch.uint8)
        self._view = byte_view(self._raw)  # the pread target, sliced without torch calls
        self._blocks: dict[tuple[str, torch.dtype], torch.Tensor] = {}  # (role, dtype): a reused block
        self._files = FileHandles()

    def run(self, turns: _Turns) -> None:
        """Reduce items until there are none left or a worker fails; on failure, record it in `turns`."""
        torch.set_num_threads(1)  # this thread's own setting: one core per worker (bench/RESULTS.md, "threads")
        try:
            while (taken := turns.take()) is not None:
                seq, item = taken
                if isinstance(item, Whole):
                    turns.wait(seq)  # whole tensors are read in turn: one at a time, however many workers
                    spec = self._specs[item.spec_index]
                    wholes = reduce_rows(spec, self._ckpts, self._rows_for(spec), self._accum_dtype, self._on_read)
                    for sink, whole in zip(self._sinks, wholes, strict=True):
                        sink(spec, 0, whole.reshape(-1))
                else:
                    outs, nbytes = self._reduce(item)
                    turns.wait(seq)
                    for sink, out in zip(self._sinks, outs, strict=True):
                        hand_over(item, out, self._specs, sink)
                    if self._on_read and nbytes:
                        self._on_read(nbytes)
                turns.done()
        except _Failed:
            pass
        except BaseException as e:  # re-raised by stream_cpu, on the calling thread
            turns.fail(e)
        finally:
            self._files.close()

    def _block(self, role: str, dtype: torch.dtype) -> torch.Tensor:
        block = self._blocks.get((role, dtype))
        if block is None:
            block = self._blocks[role, dtype] = torch.empty(self._elems, dtype=dtype)
        return block

    def _reduce(self, batch: Batch) -> tuple[list[torch.Tensor], int]:
        """Sum (or weigh) every checkpoint's share of the batch into each row, divide, and round once to the
        output dtype: the operations of `tensor.reduce_tensor`, in its order, so each row is the same bit for
        bit as when it is reduced alone. Each share is read once, however many rows weigh it."""
        first = self._specs[batch.pieces[0].spec_index]
        dtype = accumulator_dtype(first.in_dtype, self._accum_dtype)
        accs = [self._block(f"acc{r}", dtype)[: batch.total] for r in range(len(batch.rows))]
        weights = [dict(row.terms) for row in batch.rows]
        started = [False] * len(batch.rows)
        nbytes = 0
        for k, lazies in enumerate(batch.inputs):
            n = read_share(self._files, batch, lazies, self._view)
            data = self._raw[:n].view(lazies[0].dtype)
            nbytes += n
            if len(accs) > 1 and data.dtype != dtype:  # widen once for all rows (exact, as add_share would)
                data = self._block("wide", dtype)[: batch.total].copy_(data)
            for r, acc in enumerate(accs):
                if k not in weights[r]:
                    continue
                if not started[r] and data.dtype == dtype:
                    # the first share as one pass, data * w into acc: add_share's copy-then-scale, bit for bit
                    torch.mul(data, weights[r][k], out=acc)
                else:
                    add_share(acc, data, not started[r], weights[r][k], self._block("scratch", dtype) if started[r] else acc)
                started[r] = True
        outs = []
        for r, (acc, row) in enumerate(zip(accs, batch.rows, strict=True)):
            if not started[r]:
                acc.zero_()
            if row.divisor:
                acc.div_(row.divisor)
            outs.append(self._out_block(r, first.out_dtype, batch.total).copy_(acc))
        return outs, nbytes

    def _out_block(self, row: int, dtype: torch.dtype, total: int) -> torch.Tensor:
        """Where a rounded row goes: for the first row, the read buffer, free by now, when the output dtype
        fits in it (it does unless the output is wider than every input), which saves a block per worker."""
        if row == 0 and total * dtype.itemsize <= self._raw.numel():
            return self._raw[: total * dtype.itemsize].view(dtype)
        return self._block(f"out{row}", dtype)[:total]


def stream_cpu(specs: Sequence[TensorSpec], ckpts: Sequence[Checkpoint], weights_for: WeightsFor, sink: Sink,
               accum_dtype: torch.dtype, on_read: Callable[[int], None] | None, block_elems: int,
               workers: int | None = None) -> None:
    """One output row: `stream_cpu_rows` with the weights of `weights_for` and one sink."""
    stream_cpu_rows(specs, ckpts, lambda s: [weights_for(s)], [sink], accum_dtype, on_read, block_elems, workers)


def stream_cpu_rows(specs: Sequence[TensorSpec], ckpts: Sequence[Checkpoint], rows_for: RowsFor,
                    sinks: Sequence[Sink], accum_dtype: torch.dtype, on_read: Callable[[int], None] | None,
                    block_elems: int, workers: int | None = None) -> None:
    """Reduce every spec on `workers` threads; see the module docstring.

    The sink and `on_read` are called by one worker at a time, in order. On any failure (a read error, a
    failing sink, Ctrl-C) every worker stops after its current batch and the first error is raised here.

    The calling thread only waits. Ctrl-C is delivered to it, and it can land anywhere, even just after a
    lock was taken inside a `with` (a Condition's `__enter__` is Python code), which would leave the lock
    held for good; so the calling thread must hold no lock that a worker needs.
    """
    widest = widest_itemsize(ckpts)
    turns = _Turns(plan_batches(specs, ckpts, rows_for, block_elems))
    pool = [threading.Thread(target=_Worker(specs, ckpts, rows_for, sinks, accum_dtype, on_read, block_elems,
                                            widest).run, args=(turns,), name=f"ckptavg-worker-{i}", daemon=True)
            for i in range(workers or WORKERS)]
    threads = torch.get_num_threads()  # each worker sets one; threads started later would inherit that
    started: list[threading.Thread] = []
    try:
        for t in pool:
            started.append(t)  # before start(), which Ctrl-C can interrupt once the thread is running
            t.start()
        for t in started:
            t.join()
    except BaseException as e:
        turns.fail(e)
        raise
    finally:
        _join_all(started)  # each stops after its current batch once a failure is recorded
        torch.set_num_threads(threads)
    if turns.error is not None:
        raise turns.error


def _join_all(threads: Sequence[threading.Thread]) -> None:
    """Join every thread, even through a second Ctrl-C: a helper still running could write into a file
    that the caller is about to remove. The first interrupt is raised once all are joined."""
    pending: BaseException | None = None
    for t in threads:
        while t.is_alive():
            try:
                t.join()
            except BaseException as e:
                pending = pending or e
    if pending is not None:
        raise pending
