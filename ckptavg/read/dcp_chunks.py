"""The data side of a DCP folder: where each saved item lies, and reading and assembling a tensor's chunks.

A chunk is a small `torch.save` archive (DCP's default), or, with `SerializationFormat.SAFETENSORS`, an entry
of a safetensors blob that starts at the recorded offset.
"""

from __future__ import annotations

import functools
import io
import math
import struct
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeGuard

import torch

from ..errors import CheckpointFormatError, one_line
from ..layout import SAFETENSORS_DTYPES
from .fastpickle import load_plain
from .lazy import MAX_INT64, LazyTensor, read_exact
from .safetensors_file import MAX_HEADER_BYTES, read_json_header
from .torch_zip import data_records

ZIP_MAGIC = b"PK\x03\x04"


@dataclass(frozen=True)
class Stored:
    """Where one saved item lies: data file, byte offset and length, and DCP stream transforms (none by default)."""

    file: Path
    offset: int
    length: int
    transforms: tuple[str, ...] = ()


@dataclass(frozen=True)
class Chunk:
    """One block of a tensor (as one rank saved it): its start and sizes in the full tensor, and its bytes."""

    start: tuple[int, ...]
    sizes: tuple[int, ...]
    stored: Stored


@dataclass(frozen=True)
class BytesEntry:
    """A non-tensor entry (step counter, hyper-parameter): a `torch.save` archive of the value."""

    stored: Stored


def all_ints(value: Any) -> TypeGuard[list[int] | tuple[int, ...]]:
    """A list or tuple of ints in [0, 2**63): sizes and offsets torch can hold."""
    return isinstance(value, tuple | list) and all(type(v) is int and 0 <= v <= MAX_INT64 for v in value)


Run = tuple[int, int, Path, int]  # a chunk's (first element, element count, file, byte offset of its data)


@dataclass
class DcpTensor(LazyTensor):
    """A tensor of a DCP folder; `load()` decodes its chunks and assembles them into the full tensor."""

    key: str = ""
    chunks: tuple[Chunk, ...] = ()
    _runs: list[Run] | None = field(default=None, init=False, repr=False, compare=False)
    _located: bool = field(default=False, init=False, repr=False, compare=False)

    @property
    def streamable(self) -> bool:
        """True when the chunks are blocks of whole rows (the usual split: one chunk, or one per rank along the
        first dimension) whose elements lie plainly in the files: the tensor is then read block by block like
        any other. Found on first use, with a few small reads per chunk (its archive's directory and pickle)."""
        return self._chunk_runs() is not None

    def ranges(self, start: int, count: int) -> list[tuple[Path, int, int]]:
        """The byte runs of elements `start` to `start + count`, across the chunks they fall in."""
        runs, size, end = self._chunk_runs(), self.dtype.itemsize, start + count
        assert runs is not None, "ranges() of a DCP tensor that is not streamable"
        out = []
        for lo, n, file, offset in runs:
            a, b = max(start, lo), min(end, lo + n)
            if a < b:
                out.append((file, offset + (a - lo) * size, (b - a) * size))
        return out

    def _chunk_runs(self) -> list[Run] | None:
        if not self._located:
            self._runs, self._located = _row_runs(self), True
        return self._runs

    def load(self) -> torch.Tensor:
        """Read and assemble the whole tensor into a new CPU tensor."""
        if self.numel == 0:
            return torch.empty(self.shape, dtype=self.dtype)
        if len(self.chunks) == 1 and self.chunks[0].sizes == self.shape:
            return read_chunk(self.chunks[0], self.key, self.dtype)  # the usual case: no copy
        blocks = ((c.start, read_chunk(c, self.key, self.dtype)) for c in self.chunks)
        return assemble(f"{self.path.parent}: '{self.key}'", self.shape, self.dtype, blocks)


def _row_runs(t: DcpTensor) -> list[Run] | None:
    """Each chunk's elements as one run of the flattened tensor, in order, when the chunks split it into
    blocks of whole rows and each chunk's data lies uncompressed and contiguous in its file; else None."""
    if t.numel == 0 or not t.chunks:
        return None
    rows = math.prod(t.shape[1:]) if t.shape else 1
    chunks = sorted(t.chunks, key=lambda c: c.start)
    runs, next_row = [], 0
    for c in chunks:
        if len(c.start) != len(t.shape) or any(c.start[1:]) or tuple(c.sizes[1:]) != tuple(t.shape[1:]):
            return None  # split along another dimension: assembled by load()
        first = c.start[0] if t.shape else 0
        if first != next_row:
            return None
        next_row += c.sizes[0] if t.shape else 1
        at = chunk_data(c, t.key, t.dtype)
        if at is None:
            return None
        runs.append((first * rows, math.prod(c.sizes), *at))
    return runs if next_row == (t.shape[0] if t.shape else 1) else None


def chunk_data(chunk: Chunk, key: str, dtype: torch.dtype) -> tuple[Path, int] | None:
    """Where one chunk's elements lie, contiguous and as stored: (file, byte offset), or None when they do not
    (a strided or compressed chunk, a storage extension, anything unexpected: `read_chunk` then judges it)."""
    s = chunk.stored
    if s.transforms or math.prod(chunk.sizes) == 0:
        return None
    try:
        kind, n = _kind(s)
        lazy = _archive_tensor(s) if kind == "zip" else _blob_tensor(s, key, n) if kind == "safetensors" else None
    except (CheckpointFormatError, OSError, ValueError, zipfile.BadZipFile, EOFError, NotImplementedError, RuntimeError):
        return None
    if lazy is None or not lazy.streamable or lazy.dtype != dtype or lazy.shape != tuple(chunk.sizes):
        return None
    return s.file, lazy.file_offset


def _archive_tensor(s: Stored) -> LazyTensor | None:
    """The tensor of a chunk's `torch.save` archive as a LazyTensor into the DCP file, from the archive's
    directory (checked as for any torch file) and pickle (read with the allow-list of the fast path; no
    tensor data is read)."""
    with zipfile.ZipFile(_Window(s.file, s.offset, s.length)) as z:
        pickles = [i for i in z.infolist() if i.filename.endswith("/data.pkl")]
        if len(pickles) != 1 or any(i.compress_type != zipfile.ZIP_STORED for i in z.infolist()):
            return None
        records = data_records(s.file, z.infolist(), z.start_dir, base=s.offset, length=s.length)
        found = load_plain(s.file, z.read(pickles[0]), pickles[0].filename[: -len("data.pkl")], records)
    return found if isinstance(found, LazyTensor) else None


def _blob_tensor(s: Stored, key: str, header_size: int) -> LazyTensor | None:
    """A chunk stored as an entry of a safetensors blob (`SerializationFormat.SAFETENSORS`)."""
    st = s.file.stat()
    entry = _blob_header(s.file, s.offset, header_size, (st.st_size, st.st_mtime_ns)).get(key)
    entry = entry if isinstance(entry, dict) else {}
    name, shape, offs = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    dtype = SAFETENSORS_DTYPES.get(name) if isinstance(name, str) else None
    if (
        dtype is None or not all_ints(shape) or not all_ints(offs) or len(offs) != 2
        or offs[1] - offs[0] != math.prod(shape) * dtype.itemsize
        or offs[1] > st.st_size - s.offset - 8 - header_size or offs[1] - offs[0] > s.length
    ):
        return None
    return LazyTensor(s.file, dtype, tuple(shape), s.offset + 8 + header_size + offs[0])


def _kind(s: Stored) -> tuple[str, int]:
    """What a stored item is: ("zip", 0), a `torch.save` archive; ("safetensors", header size), an entry of a
    safetensors blob; or ("", 0), neither."""
    size = s.file.stat().st_size
    # 8 bytes even when `length` is shorter: with safetensors serialization `length` counts only the
    # tensor's data, and `offset` points at the blob's 8-byte header length
    head = bytearray(max(0, min(8, size - s.offset)))
    read_exact(s.file, s.offset, head)
    if head[:4] == ZIP_MAGIC:
        return "zip", 0
    if len(head) == 8 and (n := struct.unpack("<Q", head)[0]) <= min(MAX_HEADER_BYTES, size - s.offset - 8):
        return "safetensors", n
    return "", 0


class _Window(io.RawIOBase):
    """Bytes `offset` to `offset + length` of a file, as a read-only seekable file (for zipfile), read with pread."""

    def __init__(self, path: Path, offset: int, length: int) -> None:
        super().__init__()
        self._path, self._offset, self._length, self._at = path, offset, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._at

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._at, io.SEEK_END: self._length}[whence]
        self._at = max(0, base + pos)
        return self._at

    def readinto(self, buf: Any) -> int:
        n = max(0, min(len(buf), self._length - self._at))
        if n:
            read_exact(self._path, self._offset + self._at, memoryview(buf)[:n])
        self._at += n
        return n


def assemble(
    label: str, shape: tuple[int, ...], dtype: torch.dtype, blocks: Iterable[tuple[tuple[int, ...], torch.Tensor]]
) -> torch.Tensor:
    """Build a tensor of `shape` from (start, block) pairs; every element must come from exactly one block."""
    out = torch.empty(shape, dtype=dtype)
    filled = torch.zeros(shape, dtype=torch.bool)  # catches overlaps and gaps that the metadata check cannot
    for start, block in blocks:
        if len(start) != len(shape) or block.dim() != len(shape) or any(
            o + n > s for o, n, s in zip(start, block.shape, shape, strict=True)
        ):
            raise CheckpointFormatError(f"{label}: a chunk of shape {list(block.shape)} at {list(start)} does not fit {list(shape)}.")
        region = tuple(slice(o, o + n) for o, n in zip(start, block.shape, strict=True))
        if bool(filled[region].any()):
            raise CheckpointFormatError(f"{label}: chunks overlap at {list(start)}; the checkpoint metadata is inconsistent.")
        out[region] = block
        filled[region] = True
    if not bool(filled.all()):
        raise CheckpointFormatError(f"{label}: the chunks leave part of the tensor unwritten; the checkpoint is incomplete.")
    return out


def read_chunk(chunk: Chunk, key: str, dtype: torch.dtype) -> torch.Tensor:
    """Read one chunk's bytes with pread and decode them (torch.save archive or safetensors blob)."""
    s = chunk.stored
    if s.transforms:
        raise CheckpointFormatError(
            f"{s.file}: '{one_line(key, 120)}' is stored through {', '.join(s.transforms)} (a DCP storage extension, such as "
            "compression), which ckptavg cannot read; save the checkpoint without extensions."
        )
    if math.prod(chunk.sizes) == 0:
        return torch.empty(chunk.sizes, dtype=dtype)
    try:
        kind, n = _kind(s)
        if kind == "zip":
            t = _from_archive(s, key)
        elif kind == "safetensors":
            t = _from_safetensors(s, key, n)
        else:
            raise CheckpointFormatError(
                f"{s.file}: '{one_line(key, 120)}' at offset {s.offset} is neither a torch.save archive nor safetensors data; "
                "the file is corrupt, re-copy the checkpoint."
            )
    except OSError as e:
        raise CheckpointFormatError(f"{s.file}: cannot read ({e.strerror}).") from None
    if t.dtype != dtype or tuple(t.shape) != chunk.sizes:
        raise CheckpointFormatError(
            f"{s.file}: '{one_line(key, 120)}' at offset {s.offset} holds {t.dtype} {list(t.shape)} but .metadata "
            f"says {dtype} {list(chunk.sizes)}; data and metadata disagree (files of different saves?), re-save the "
            "checkpoint."
        )
    return t.contiguous()  # a strided view of the chunk's own storage: at most the bytes the chunk claims


def _from_archive(s: Stored, key: str) -> torch.Tensor:
    buf = bytearray(s.length)
    read_exact(s.file, s.offset, buf)
    try:
        t = torch.load(io.BytesIO(buf), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch's loader raises many types on corrupt bytes
        raise CheckpointFormatError(
            f"{s.file}: '{one_line(key, 120)}' at offset {s.offset} cannot be decoded ({type(e).__name__}); the file is corrupt, "
            "re-copy the checkpoint."
        ) from None
    if not isinstance(t, torch.Tensor) or t.layout != torch.strided:
        raise CheckpointFormatError(f"{s.file}: '{one_line(key, 120)}' at offset {s.offset} is not a dense tensor.")
    return t  # made contiguous by read_chunk once its shape is known to be the chunk's


def _from_safetensors(s: Stored, key: str, header_size: int) -> torch.Tensor:
    lazy = _blob_tensor(s, key, header_size)  # checked against the blob and the file before allocating
    if lazy is None:
        raise CheckpointFormatError(
            f"{s.file}: the safetensors data at offset {s.offset} has no readable entry '{one_line(key, 120)}'; the "
            "file is corrupt."
        )
    return lazy.load()


@functools.lru_cache(maxsize=8)
def _blob_header(file: Path, offset: int, n: int, stamp: tuple[int, int]) -> dict[str, Any]:
    """The JSON header (`n` bytes) of the safetensors blob at `offset`; cached, since all its chunks share it.
    `stamp` (size, mtime) keeps a rewritten file from being served an old header."""
    return read_json_header(file, offset, n, f"safetensors header at offset {offset}")


