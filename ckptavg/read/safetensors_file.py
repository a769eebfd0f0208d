"""Safetensors files, and telling checkpoint files apart by their first bytes.

A safetensors header is parsed and validated in full (offsets, dtypes, shapes, sizes) before any
tensor is read; each tensor then stays in the file as a `LazyTensor`.
"""

from __future__ import annotations

import json
import os
import stat
import struct
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointFormatError, one_line
from ..layout import SAFETENSORS_DTYPES
from .lazy import LazyTensor, read_exact

# A safetensors header larger than this is treated as corrupt rather than allocated.
MAX_HEADER_BYTES = 100 * 1024 * 1024


def sniff(path: Path) -> str | None:
    """Return 'safetensors', 'torch-zip', 'torch-legacy', or None when `path` is no checkpoint.

    Only regular files can be checkpoints: tensors are read with pread at their offsets, which a pipe
    or a device cannot do, and opening a FIFO for reading would block until a writer appears.
    """
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; it is refused below in any case.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise CheckpointFormatError(
                    f"{path}: not a regular file (a directory, pipe or device); give a checkpoint file."
                )
            head = os.pread(fd, 16, 0)
        finally:
            os.close(fd)
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


def read_safetensors_header(path: Path) -> tuple[dict[str, LazyTensor], dict[str, str]]:
    """Parse and validate a safetensors header; return lazy tensors (in file order) and metadata.

    Everything a hostile header could use to make a later step fail, hang or allocate is checked here,
    so that any byte string either reads or raises CheckpointFormatError.
    """
    size = path.stat().st_size
    if size < 8:
        raise CheckpointFormatError(f"{path}: too short to be a safetensors file ({size} bytes).")
    head = bytearray(8)
    read_exact(path, 0, head)
    (n,) = struct.unpack("<Q", head)
    if n > size - 8 or n > MAX_HEADER_BYTES:  # checked before allocating: a corrupt length may be 2**63
        raise CheckpointFormatError(
            f"{path}: safetensors header claims {n} bytes but the file has {size}; "
            "the file is truncated or not safetensors."
        )
    header = read_json_header(path, 0, n, "safetensors header")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise CheckpointFormatError(f"{path}: safetensors __metadata__ must map strings to strings.")
    for text in [*header, *meta, *meta.values()]:
        _entry_check_utf8(path, text)
    data_start, data_size = 8 + n, size - 8 - n
    entries = sorted(
        ((_entry_offsets(path, k, v), k, v) for k, v in header.items()), key=lambda e: e[0]
    )
    tensors: dict[str, LazyTensor] = {}
    expected = 0
    for (begin, end), key, v in entries:
        name = one_line(key, 120)
        if begin != expected:
            what = "overlaps the previous tensor" if begin < expected else "leaves a hole"
            raise CheckpointFormatError(f"{path}: tensor '{name}' {what} (offset {begin}).")
        if end > data_size:
            raise CheckpointFormatError(
                f"{path}: tensor '{name}' ends at byte {end} past the data ({data_size} bytes); "
                "the file is truncated."
            )
        t = LazyTensor(path, _entry_dtype(path, key, v), _entry_shape(path, key, v), data_start + begin)
        if t.nbytes != end - begin:
            raise CheckpointFormatError(
                f"{path}: tensor '{name}' has shape {list(t.shape)} of {v['dtype']} "
                f"({t.nbytes} bytes) but its offsets span {end - begin} bytes."
            )
        tensors[key] = t
        expected = end
    return tensors, meta


def _entry_check_utf8(path: Path, text: str) -> None:
    """Refuse names JSON escapes made invalid (a lone surrogate like \\ud800): they cannot be written back."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise CheckpointFormatError(
            f"{path}: safetensors header holds a name that is not valid Unicode ('{one_line(text, 120)}')."
        ) from None


def read_json_header(path: Path, offset: int, n: int, what: str) -> dict[str, Any]:
    """Read and parse the `n`-byte JSON object at `offset + 8` (a safetensors header, here or inside a blob)."""
    raw = bytearray(n)
    read_exact(path, offset + 8, raw)
    try:
        # UTF-8 only, as the format says (json.loads would also guess UTF-16/32 from raw bytes). ValueError
        # covers integers longer than Python's int digit limit, RecursionError deeply nested arrays.
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CheckpointFormatError(f"{path}: {what} is not valid JSON ({one_line(e, 120)}).") from None
    if not isinstance(header, dict):
        raise CheckpointFormatError(f"{path}: {what} is not a JSON object.")
    return header


def _entry_offsets(path: Path, key: str, v: Any) -> tuple[int, int]:
    offs = v.get("data_offsets") if isinstance(v, dict) else None
    if (
        not isinstance(offs, list) or len(offs) != 2
        or not all(type(o) is int and o >= 0 for o in offs) or offs[0] > offs[1]
    ):
        raise CheckpointFormatError(
            f"{path}: tensor '{one_line(key, 120)}' has bad data_offsets {one_line(offs, 60)}."
        )
    return offs[0], offs[1]


def _entry_dtype(path: Path, key: str, v: dict[str, Any]) -> torch.dtype:
    name = v.get("dtype")
    dtype = SAFETENSORS_DTYPES.get(name) if isinstance(name, str) else None
    if dtype is None:
        raise CheckpointFormatError(
            f"{path}: tensor '{one_line(key, 120)}' has unsupported dtype {one_line(name, 60)}."
        )
    return dtype


# torch sizes and strides are int64: a shape whose element count (zeros aside) reaches 2**63 cannot be built,
# even with a 0 in it, e.g. [0, 2**40, 2**40]. Empty tensors need no bytes, so the offsets do not bound them.
_MAX_ELEMENTS = 2**63 - 1


def _entry_shape(path: Path, key: str, v: dict[str, Any]) -> tuple[int, ...]:
    shape = v.get("shape")
    if not isinstance(shape, list) or not all(type(s) is int and s >= 0 for s in shape):
        raise CheckpointFormatError(f"{path}: tensor '{one_line(key, 120)}' has bad shape {one_line(shape, 60)}.")
    count = 1
    for s in shape:
        count *= max(s, 1)
        if count > _MAX_ELEMENTS:
            raise CheckpointFormatError(
                f"{path}: tensor '{one_line(key, 120)}' has shape {one_line(shape, 60)}, too large for a tensor."
            )
    return tuple(shape)
