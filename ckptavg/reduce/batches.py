"""Read-ahead for the reducer: which bytes to read, in what groups, and a reader thread that reads them.

`plan_batches` turns the output tensors into batches of at most one block of elements (small tensors
gathered together, large ones cut): the work list of both reducers. For the GPU reducer (`cuda.py`),
`Prefetcher` reads each checkpoint's share of a batch with pread into a small pool of reusable (pinned)
buffers, ahead of the copies to the device; the CPU workers (`cpu.py`) read for themselves.
"""

from __future__ import annotations

import os
import queue
import resource
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CheckpointFormatError
from ..layout import Sink, TensorSpec, byte_view
from ..read.checkpoint import Checkpoint
from ..read.lazy import LazyTensor, pread_exact
from .tensor import uniform_divisor

POOL_BUFFERS = 3  # read-ahead depth, in buffers of one checkpoint's block each (3 and 4 measure the same)
MAX_OPEN_FILES = 256  # per pool
FD_HEADROOM = 64  # descriptors left to everything but the pools (at least; a quarter of the limit when larger)

WeightsFor = Callable[[TensorSpec], Sequence[float]]
RowsFor = Callable[[TensorSpec], Sequence[Sequence[float]]]  # one weight per checkpoint, for each output row


def open_file_budget() -> int:
    """How many files all FileHandles pools together may hold open: the process's soft RLIMIT_NOFILE less
    headroom for everything else (the output, torch, Python, the terminal), and never over MAX_OPEN_FILES
    per pool times a few pools."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 20
    return max(4, min(soft - max(FD_HEADROOM, soft // 4), 4 * MAX_OPEN_FILES))


class FileHandles:
    """Open files once and keep them open, least recently used closed first.

    Every pool of the process (one per reader thread) draws on one budget, `open_file_budget()`, so
    thousands of inputs work under a low open-file limit (``ulimit -n 256``, macOS's default): past the
    budget, a pool closes its own oldest file before opening another. A pool always keeps at least the
    file it is reading, so the total is at most the budget plus one per pool.
    """

    _lock = threading.Lock()
    _open_total = 0  # files held by every pool of the process

    def __init__(self, limit: int = MAX_OPEN_FILES) -> None:
        self._fds: OrderedDict[Path, int] = OrderedDict()
        self._limit = limit
        self._budget = open_file_budget()

    def fd(self, path: Path) -> int:
        """An open descriptor of `path` (opened now, or kept from before)."""
        fd = self._fds.get(path)
        if fd is None:
            with FileHandles._lock:
                while self._fds and (len(self._fds) >= self._limit or FileHandles._open_total >= self._budget):
                    os.close(self._fds.popitem(last=False)[1])
                    FileHandles._open_total -= 1
                try:
                    fd = os.open(path, os.O_RDONLY)
                except OSError as e:
                    raise CheckpointFormatError(f"{path}: cannot open ({e.strerror}).") from None
                self._fds[path] = fd
                FileHandles._open_total += 1
        self._fds.move_to_end(path)
        return fd

    def close(self) -> None:
        """Close every file of this pool."""
        with FileHandles._lock:
            for fd in self._fds.values():
                os.close(fd)
            FileHandles._open_total -= len(self._fds)
            self._fds.clear()


@dataclass(frozen=True)
class Piece:
    """Elements [start, start + count) of one output tensor."""

    spec_index: int
    start: int
    count: int


@dataclass(frozen=True)
class RowShare:
    """What one output row takes from a batch's inputs: (input index, weight) pairs, and its uniform divisor."""

    terms: tuple[tuple[int, float], ...]
    divisor: int  # uniform weights: sum, then divide once by this (see tensor.uniform_divisor)


@dataclass
class Batch:
    """Pieces of one or more tensors reduced together as one run of elements.

    Small tensors are gathered into one batch (their bytes read one after another into the same buffer),
    so the per-read and per-add overhead is paid once per ~block, not once per tensor: a ResNet has 320
    tensors, most of them a few hundred elements long. Every piece of a batch has, in each checkpoint, the
    same dtype and weights, so one add covers them all. `inputs` are the checkpoints that some row weighs,
    each read once; `rows` say how each output row adds them up.
    """

    pieces: list[Piece]
    inputs: list[list[LazyTensor]]  # per contributing checkpoint, in checkpoint order: a lazy tensor per piece
    rows: list[RowShare]
    total: int = 0  # elements of all pieces

    def add(self, piece: Piece, lazies: Sequence[LazyTensor]) -> None:
        self.pieces.append(piece)
        for mine, t in zip(self.inputs, lazies, strict=True):
            mine.append(t)
        self.total += piece.count


@dataclass
class Read:
    """One checkpoint's share of a batch (`index` into its inputs): its bytes sit in a pool buffer (`slot`)
    until released."""

    batch: Batch
    index: int
    data: torch.Tensor | None  # the batch's elements, as stored; None for a batch nobody contributes to
    slot: int
    first: bool
    last: bool
    nbytes: int = 0  # bytes read from the files


@dataclass
class Whole:
    """A tensor reduced as a whole (not streamable, or not floating)."""

    spec_index: int


def plan_batches(
    specs: Sequence[TensorSpec], ckpts: Sequence[Checkpoint], rows_for: RowsFor, block_elems: int
) -> Iterator[Batch | Whole]:
    """The work in output order: batches of at most `block_elems` elements, and whole tensors.

    With uniform weights 1/k the inputs are summed with weight 1 and the sum divided once by k (`divisor`):
    closer to the exact mean than adding fl(1/k)*x k times, and a mean of identical values is then exact.
    """
    current: Batch | None = None
    key: tuple[object, ...] = ()
    for i, spec in enumerate(specs):
        lazies = [c.tensors[spec.name] for c in ckpts]
        if not spec.averaged or not all(t.streamable for t in lazies):
            if current is not None:
                yield current
                current = None
            yield Whole(i)
            continue
        rows = tuple(tuple(w) for w in rows_for(spec))
        used = [k for k in range(len(ckpts)) if any(w[k] != 0 for w in rows)]
        shares = [_share(w, used) for w in rows]
        spec_key = (rows, spec.out_dtype, tuple(lazies[k].dtype for k in used))
        numel = lazies[0].numel
        start = 0
        while True:
            if current is not None and (spec_key != key or current.total >= block_elems):
                yield current
                current = None
            if current is None:
                current, key = Batch([], [[] for _ in used], shares), spec_key
            count = min(block_elems - current.total, numel - start)
            current.add(Piece(i, start, count), [lazies[k] for k in used])
            start += count
            if start >= numel:
                break
    if current is not None:
        yield current


def _share(weights: Sequence[float], used: Sequence[int]) -> RowShare:
    divisor = uniform_divisor(weights)
    return RowShare(tuple((n, 1.0 if divisor else weights[k]) for n, k in enumerate(used) if weights[k] != 0), divisor)


def widest_itemsize(ckpts: Sequence[Checkpoint]) -> int:
    """Bytes per element of the widest tensor of any checkpoint: what a read buffer of a block must hold."""
    return max((t.dtype.itemsize for c in ckpts for t in c.tensors.values()), default=1)


def read_share(files: FileHandles, batch: Batch, lazies: Sequence[LazyTensor], view: memoryview) -> int:
    """Read one checkpoint's share of `batch` (a lazy tensor per piece) into `view`, the pieces one after
    another; return its size in bytes."""
    at = 0
    for piece, lazy in zip(batch.pieces, lazies, strict=True):
        for path, offset, n in lazy.ranges(piece.start, piece.count):  # one run, or a gathered tensor's several
            pread_exact(files.fd(path), path, offset, view[at : at + n])
            at += n
    return at


def hand_over(batch: Batch, out: torch.Tensor, specs: Sequence[TensorSpec], sink: Sink) -> None:
    """Give the sink each tensor's piece of a rounded batch, in order."""
    at = 0
    for piece in batch.pieces:
        sink(specs[piece.spec_index], piece.start, out[at : at + piece.count])
        at += piece.count


class Prefetcher:
    """A reader thread that fills pool buffers with the batches of `plan_batches`, in order."""

    def __init__(self, work: Iterator[Batch | Whole], block_elems: int, itemsize: int, pin: bool) -> None:
        """`work` holds batches of at most `block_elems` elements of at most `itemsize` bytes each."""
        self._work = work
        self._elems = block_elems
        self._pool = [torch.empty(block_elems * itemsize, dtype=torch.uint8, pin_memory=pin) for _ in range(POOL_BUFFERS)]
        self._views = [byte_view(b) for b in self._pool]  # pread targets, sliced without torch calls
        # SimpleQueue (C) rather than Queue (Python locks): ~8 queue operations per block. The pool bounds
        # how far the reader runs ahead; what else it queues (Whole, empty reads) holds no tensor data.
        self._free: queue.SimpleQueue[int] = queue.SimpleQueue()
        for slot in range(POOL_BUFFERS):
            self._free.put(slot)
        self._out: queue.SimpleQueue[Read | Whole | BaseException | None] = queue.SimpleQueue()
        # a plain flag, not an Event: Event.set takes a lock in Python code, which a Ctrl-C on the main thread
        # can leave held (see workers.stream_cpu); assigning an attribute cannot be half done
        self._stopping = False
        self._files = FileHandles()
        self._thread = threading.Thread(target=self._run, name="ckptavg-reader", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for item in self._work:
                if self._stopping:
                    return
                if isinstance(item, Whole):
                    self._put(item)
                    continue
                self._read_batch(item)
            self._put(None)
        except BaseException as e:  # handed to the main thread, which raises it there
            self._put(e)
        finally:
            self._files.close()

    def _read_batch(self, batch: Batch) -> None:
        if not batch.inputs:
            self._put(Read(batch, -1, None, -1, True, True))
            return
        for k, lazies in enumerate(batch.inputs):
            slot = self._take_slot()
            if slot is None:
                return
            at = read_share(self._files, batch, lazies, self._views[slot])
            data = self._pool[slot][:at].view(lazies[0].dtype)
            self._put(Read(batch, k, data, slot, k == 0, k == len(batch.inputs) - 1, at))

    def _take_slot(self) -> int | None:
        while not self._stopping:
            try:
                return self._free.get(timeout=0.1)
            except queue.Empty:
                continue
        return None

    def _put(self, item: Read | Whole | BaseException | None) -> None:
        if not self._stopping:
            self._out.put(item)

    def __iter__(self) -> Iterator[Read | Whole]:
        while True:
            item = self._out.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def release(self, slot: int) -> None:
        """Give a buffer back to the reader once its bytes have been consumed."""
        if slot >= 0:
            self._free.put(slot)

    def close(self) -> None:
        """Stop the reader (on success or failure) and wait for it."""
        self._stopping = True
        self._thread.join()
