"""File formats: sniff a file by its bytes, and read tensors lazily, one at a time, with pread.

Nothing here maps a whole file into memory: each tensor's bytes are read into a fresh buffer when
asked for, so memory does not grow with the number or size of the inputs.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointFormatError

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16,
    "U16": torch.uint16, "F16": torch.float16, "BF16": torch.bfloat16, "I32": torch.int32,
    "U32": torch.uint32, "F32": torch.float32, "F64": torch.float64, "I64": torch.int64,
    "U64": torch.uint64, "C64": torch.complex64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in SAFETENSORS_DTYPES.items()}

# A safetensors header larger than this is treated as corrupt rather than allocated.
MAX_HEADER_BYTES = 100 * 1024 * 1024
LEGACY_TORCH_MAGIC = 0x1950A86A20F9469CFC6C


@dataclass
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
    def streamable(self) -> bool:
        """True when the bytes lie contiguously at `file_offset`, so any element range can be read with pread.

        Readers whose tensors cannot be read piecewise (legacy pickles, non-contiguous views, formats that
        compress or wrap each tensor) return False and are reduced through `load()` instead.
        """
        return self.eager is None and self.stride is None

    def load(self) -> torch.Tensor:
        """Read the tensor into a new CPU tensor that owns its memory."""
        if self.eager is not None:
            return self.eager
        if self.numel == 0:
            return torch.empty(self.shape, dtype=self.dtype)
        nbytes = self.span if self.span is not None else self.nbytes
        buf = bytearray(nbytes)
        read_exact(self.path, self.file_offset, buf)
        flat = torch.frombuffer(buf, dtype=self.dtype)
        if self.stride is None:
            return flat.view(self.shape)
        return flat.as_strided(self.shape, self.stride).clone()


def read_exact(path: Path, offset: int, buf: bytearray) -> None:
    """Fill `buf` with the bytes of `path` starting at `offset`, or raise if the file is short."""
    view = memoryview(buf)
    fd = os.open(path, os.O_RDONLY)
    try:
        done = 0
        while done < len(buf):
            n = os.preadv(fd, [view[done:]], offset + done)
            if n == 0:
                raise CheckpointFormatError(
                    f"{path}: file is truncated (needed {len(buf)} bytes at offset {offset}, "
                    f"found {done}); re-copy or re-save the checkpoint."
                )
            done += n
    finally:
        os.close(fd)


def sniff(path: Path) -> str | None:
    """Return 'safetensors', 'torch-zip', 'torch-legacy', or None when `path` is no checkpoint."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as e:
        raise CheckpointFormatError(f"{path}: cannot read ({e.strerror}).") from None
    if head[:4] == b"PK\x03\x04":
        return "torch-zip"
    if len(head) >= 9 and head[0] == 0x80 and head[2] == 0x8A:
        return "torch-legacy"  # pickle protocol 2 opening with the LONG1 torch magic number
    if len(head) >= 9 and head[8:9] == b"{":
        (n,) = struct.unpack("<Q", head[:8])
        if n <= MAX_HEADER_BYTES:  # plausible header length; a truncated file is reported when read
            return "safetensors"
    return None


# ---------------------------------------------------------------- safetensors


def read_safetensors_header(path: Path) -> tuple[dict[str, LazyTensor], dict[str, str]]:
    """Parse and validate a safetensors header; return lazy tensors (in file order) and metadata."""
    size = path.stat().st_size
    if size < 8:
        raise CheckpointFormatError(f"{path}: too short to be a safetensors file ({size} bytes).")
    head = bytearray(8)
    read_exact(path, 0, head)
    (n,) = struct.unpack("<Q", head)
    if n > size - 8 or n > MAX_HEADER_BYTES:
        raise CheckpointFormatError(
            f"{path}: safetensors header claims {n} bytes but the file has {size}; "
            "the file is truncated or not safetensors."
        )
    raw = bytearray(n)
    read_exact(path, 8, raw)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise CheckpointFormatError(f"{path}: safetensors header is not valid JSON ({e}).") from e
    if not isinstance(header, dict):
        raise CheckpointFormatError(f"{path}: safetensors header is not a JSON object.")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise CheckpointFormatError(f"{path}: safetensors __metadata__ must map strings to strings.")
    data_start, data_size = 8 + n, size - 8 - n
    entries = sorted(
        ((_entry_offsets(path, k, v), k, v) for k, v in header.items()), key=lambda e: e[0]
    )
    tensors: dict[str, LazyTensor] = {}
    expected = 0
    for (begin, end), key, v in entries:
        if begin != expected:
            what = "overlaps the previous tensor" if begin < expected else "leaves a hole"
            raise CheckpointFormatError(f"{path}: tensor '{key}' {what} (offset {begin}).")
        if end > data_size:
            raise CheckpointFormatError(
                f"{path}: tensor '{key}' ends at byte {end} past the data ({data_size} bytes); "
                "the file is truncated."
            )
        t = LazyTensor(path, _entry_dtype(path, key, v), _entry_shape(path, key, v), data_start + begin)
        if t.nbytes != end - begin:
            raise CheckpointFormatError(
                f"{path}: tensor '{key}' has shape {list(t.shape)} of {v['dtype']} "
                f"({t.nbytes} bytes) but its offsets span {end - begin} bytes."
            )
        tensors[key] = t
        expected = end
    return tensors, meta


def _entry_offsets(path: Path, key: str, v: Any) -> tuple[int, int]:
    offs = v.get("data_offsets") if isinstance(v, dict) else None
    if (
        not isinstance(offs, list) or len(offs) != 2
        or not all(type(o) is int and o >= 0 for o in offs) or offs[0] > offs[1]
    ):
        raise CheckpointFormatError(f"{path}: tensor '{key}' has bad data_offsets {offs!r}.")
    return offs[0], offs[1]


def _entry_dtype(path: Path, key: str, v: dict[str, Any]) -> torch.dtype:
    name = v.get("dtype")
    dtype = SAFETENSORS_DTYPES.get(name) if isinstance(name, str) else None
    if dtype is None:
        raise CheckpointFormatError(f"{path}: tensor '{key}' has unsupported dtype {v.get('dtype')!r}.")
    return dtype


def _entry_shape(path: Path, key: str, v: dict[str, Any]) -> tuple[int, ...]:
    shape = v.get("shape")
    if not isinstance(shape, list) or not all(type(s) is int and s >= 0 for s in shape):
        raise CheckpointFormatError(f"{path}: tensor '{key}' has bad shape {shape!r}.")
    return tuple(shape)
