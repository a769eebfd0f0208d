"""Tensors that stay in their file until asked for: `LazyTensor`, and exact reads with pread.

Nothing here maps a whole file into memory: each tensor's bytes are read into a fresh buffer when
asked for, so memory does not grow with the number or size of the inputs.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CheckpointFormatError

LEGACY_TORCH_MAGIC = 0x1950A86A20F9469CFC6C


@dataclass(slots=True)
class LazyTensor:
    """A tensor whose bytes stay in the file until `load()` reads them.

    `file_offset` is where the tensor's first element lies; `stride` and `span` describe a
    non-contiguous view over `span` bytes of storage. `eager` holds an already-loaded tensor
    (legacy pickles, which cannot be read piecewise).
    """

    path: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    file_offset: int = 0
    stride: tuple[int, ...] | None = None
    span: int | None = None
    eager: torch.Tensor | None = None

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    @property
    def extent(self) -> int:
        """Bytes of the file from `file_offset` that the elements cover: `span` for a strided view."""
        return self.span if self.span is not None else self.nbytes

    @property
    def streamable(self) -> bool:
        """True when the bytes lie contiguously at `file_offset`, so any element range can be read with pread.

        Readers whose tensors cannot be read piecewise (legacy pickles, non-contiguous views, formats that
        compress or wrap each tensor) return False and are reduced through `load()` instead.
        """
        return self.eager is None and self.stride is None

    def ranges(self, start: int, count: int) -> list[tuple[Path, int, int]]:
        """Where elements `start` to `start + count` of a `streamable` tensor lie: (file, byte offset, bytes)
        runs, in order. One run here; a tensor gathered from several files has more."""
        size = self.dtype.itemsize
        return [(self.path, self.file_offset + start * size, count * size)]

    def load(self) -> torch.Tensor:
        """Read the tensor into a new CPU tensor that owns its memory."""
        if self.eager is not None:
            return self.eager
        if self.numel == 0:
            return torch.empty(self.shape, dtype=self.dtype)
        buf = bytearray(self.extent)
        read_exact(self.path, self.file_offset, buf)
        flat = torch.frombuffer(buf, dtype=self.dtype)
        if self.stride is None:
            return flat.view(self.shape)
        return flat.as_strided(self.shape, self.stride).clone()


# torch sizes, strides and element counts are int64; checks use Python's exact integers, so nothing wraps.
MAX_INT64 = 2**63 - 1
# A view that repeats elements (a stride of 0, overlapping rows) is materialised to be averaged; beyond this
# many bytes, and more than the storage it reads, it is refused rather than grown from a few bytes of file.
MAX_REPEATED_BYTES = 64 * 1024 * 1024


def check_view(path: Path, dtype: torch.dtype, shape: tuple[int, ...], stride: tuple[int, ...]) -> None:
    """Refuse a view torch could not hold (sizes or strides past int64, element count past int64 even with a
    0 among the sizes), or one that repeats a few stored elements into a huge tensor."""
    if len(shape) != len(stride) or any(not 0 <= v <= MAX_INT64 for v in (*shape, *stride)):
        raise CheckpointFormatError(
            f"{path}: a tensor has shape {_short(shape)} and strides {_short(stride)}, which torch cannot hold; "
            "the file is corrupt."
        )
    count = 1
    for s in shape:
        count *= max(s, 1)
    if count > MAX_INT64:
        raise CheckpointFormatError(f"{path}: a tensor has shape {_short(shape)}, too large for a tensor; the file is corrupt.")
    numel = math.prod(shape)
    span = sum((s - 1) * st for s, st in zip(shape, stride, strict=True)) + 1 if numel else 0
    if numel > span and numel * dtype.itemsize > MAX_REPEATED_BYTES:
        raise CheckpointFormatError(
            f"{path}: a tensor of shape {_short(shape)} repeats {span} stored elements (strides {_short(stride)}) "
            f"into {numel * dtype.itemsize} bytes; save it with .contiguous() (or .clone()) first."
        )


def _short(values: tuple[int, ...]) -> str:
    text = "[" + ", ".join(map(str, values[:8])) + (", ...]" if len(values) > 8 else "]")
    return text if len(text) <= 200 else text[:200] + "..."


def lazy_view(path: Path, dtype: torch.dtype, shape: tuple[int, ...], stride: tuple[int, ...], start: int) -> LazyTensor:
    """A LazyTensor for a view whose first element lies at byte `start`: plain when the view is contiguous
    (any range of it can then be read with pread), else with its strides and the span of storage it covers.
    Raises CheckpointFormatError for a view `check_view` refuses."""
    check_view(path, dtype, shape, stride)
    if _contiguous(shape, stride):
        return LazyTensor(path, dtype, shape, start)
    last = sum((s - 1) * st for s, st in zip(shape, stride, strict=True) if s > 0)
    return LazyTensor(path, dtype, shape, start, stride=stride, span=(last + 1) * dtype.itemsize)


def _contiguous(shape: tuple[int, ...], stride: tuple[int, ...]) -> bool:
    """torch's is_contiguous: row-major strides, ignoring dimensions of size 1; any view of <= 1 element."""
    numel = 1
    for s in shape:
        numel *= s
    expected = 1
    for s, st in zip(reversed(shape), reversed(stride), strict=True):
        if s != 1 and st != expected:
            return numel <= 1
        expected *= s
    return True


def read_exact(path: Path, offset: int, buf: bytearray | memoryview) -> None:
    """Fill `buf` with the bytes of `path` starting at `offset`, or raise if the file is short."""
    fd = os.open(path, os.O_RDONLY)
    try:
        pread_exact(fd, path, offset, memoryview(buf))
    finally:
        os.close(fd)


def pread_exact(fd: int, path: Path, offset: int, view: memoryview) -> None:
    """Fill `view` from the open file `fd` (which is `path`, for messages) at `offset`."""
    done, want = 0, view.nbytes
    view = view.cast("B")
    while done < want:
        try:
            n = os.preadv(fd, [view[done:]], offset + done)
        except OSError as e:
            raise CheckpointFormatError(f"{path}: cannot read ({e.strerror}).") from None
        if n == 0:
            # every offset was checked against the file's size when it was opened: it has shrunk since
            raise CheckpointFormatError(
                f"{path}: file is truncated: changed while being read (needed {want} bytes at offset {offset}, "
                f"found {done}); nothing was written."
            )
        done += n
