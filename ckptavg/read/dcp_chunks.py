"""The data side of a DCP folder: where each saved item lies, and reading and assembling a tensor's chunks.

A chunk is a small `torch.save` archive (DCP's default), or, with `SerializationFormat.SAFETENSORS`, an entry
of a safetensors blob that starts at the recorded offset.
"""

from __future__ import annotations

import functools
import io
import math
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeGuard

import torch

from ..errors import CheckpointFormatError, one_line
from ..layout import SAFETENSORS_DTYPES
from .lazy import MAX_INT64, LazyTensor, read_exact
from .safetensors_file import MAX_HEADER_BYTES, read_json_header

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


@dataclass
class DcpTensor(LazyTensor):
    """A tensor of a DCP folder; `load()` decodes its chunks and assembles them into the full tensor."""

    key: str = ""
    chunks: tuple[Chunk, ...] = ()

    @property
    def streamable(self) -> bool:
        """False: chunks are archives (or blocks of a larger tensor), not one byte range of a file."""
        return False

    def load(self) -> torch.Tensor:
        """Read and assemble the whole tensor into a new CPU tensor."""
        if self.numel == 0:
            return torch.empty(self.shape, dtype=self.dtype)
        if len(self.chunks) == 1 and self.chunks[0].sizes == self.shape:
            return read_chunk(self.chunks[0], self.key, self.dtype)  # the usual case: no copy
        blocks = ((c.start, read_chunk(c, self.key, self.dtype)) for c in self.chunks)
        return assemble(f"{self.path.parent}: '{self.key}'", self.shape, self.dtype, blocks)


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
        size = s.file.stat().st_size
        # 8 bytes even when `length` is shorter: with safetensors serialization `length` counts only the
        # tensor's data, and `offset` points at the blob's 8-byte header length
        head = bytearray(max(0, min(8, size - s.offset)))
        read_exact(s.file, s.offset, head)
        if head[:4] == ZIP_MAGIC:
            t = _from_archive(s, key)
        elif len(head) == 8 and (n := struct.unpack("<Q", head)[0]) <= min(MAX_HEADER_BYTES, size - s.offset - 8):
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
    st = s.file.stat()
    header = _blob_header(s.file, s.offset, header_size, (st.st_size, st.st_mtime_ns))
    entry = header.get(key)
    entry = entry if isinstance(entry, dict) else {}
    name, shape, offs = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    dtype = SAFETENSORS_DTYPES.get(name) if isinstance(name, str) else None
    if (
        dtype is None or not all_ints(shape) or not all_ints(offs) or len(offs) != 2
        or offs[1] - offs[0] != math.prod(shape) * dtype.itemsize
        or offs[1] > st.st_size - s.offset - 8 - header_size or offs[1] - offs[0] > s.length  # before allocating
    ):
        raise CheckpointFormatError(
            f"{s.file}: the safetensors data at offset {s.offset} has no readable entry '{one_line(key, 120)}'; the "
            "file is corrupt."
        )
    buf = bytearray(offs[1] - offs[0])
    read_exact(s.file, s.offset + 8 + header_size + offs[0], buf)
    return torch.frombuffer(buf, dtype=dtype).view(shape)


@functools.lru_cache(maxsize=8)
def _blob_header(file: Path, offset: int, n: int, stamp: tuple[int, int]) -> dict[str, Any]:
    """The JSON header (`n` bytes) of the safetensors blob at `offset`; cached, since all its chunks share it.
    `stamp` (size, mtime) keeps a rewritten file from being served an old header."""
    return read_json_header(file, offset, n, f"safetensors header at offset {offset}")


