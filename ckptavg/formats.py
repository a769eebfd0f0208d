"""File formats: sniff a file by its bytes, and read tensors lazily, one at a time, with pread.

Nothing here maps a whole file into memory: each tensor's bytes are read into a fresh buffer when
asked for, so memory does not grow with the number or size of the inputs.
"""

from __future__ import annotations

import ctypes
import json
import os
import stat
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


def lazy_view(path: Path, dtype: torch.dtype, shape: tuple[int, ...], stride: tuple[int, ...], start: int) -> LazyTensor:
    """A LazyTensor for a view whose first element lies at byte `start`: plain when the view is contiguous
    (any range of it can then be read with pread), else with its strides and the span of storage it covers."""
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


def byte_view(t: torch.Tensor) -> memoryview:
    """A writable view of a contiguous CPU tensor's bytes (without numpy, which ckptavg does not need)."""
    return memoryview((ctypes.c_char * t.nbytes).from_address(t.data_ptr())).cast("B")


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
            raise CheckpointFormatError(
                f"{path}: file is truncated (needed {want} bytes at offset {offset}, "
                f"found {done}); re-copy or re-save the checkpoint."
            )
        done += n


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


# ---------------------------------------------------------------- safetensors


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
        name = _entry_text(key)
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


def _entry_text(value: object, limit: int = 120) -> str:
    """`value` for an error message: one line (control characters escaped) and at most `limit` characters,
    since names and values in a hostile header can hold newlines or be megabytes long."""
    text = value if isinstance(value, str) else repr(value)
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text[: limit + 1])
    return text if len(text) <= limit else text[:limit] + "..."


def _entry_check_utf8(path: Path, text: str) -> None:
    """Refuse names JSON escapes made invalid (a lone surrogate like \\ud800): they cannot be written back."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise CheckpointFormatError(
            f"{path}: safetensors header holds a name that is not valid Unicode ('{_entry_text(text)}')."
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
        raise CheckpointFormatError(f"{path}: {what} is not valid JSON ({_entry_text(e)}).") from None
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
            f"{path}: tensor '{_entry_text(key)}' has bad data_offsets {_entry_text(offs, 60)}."
        )
    return offs[0], offs[1]


def _entry_dtype(path: Path, key: str, v: dict[str, Any]) -> torch.dtype:
    name = v.get("dtype")
    dtype = SAFETENSORS_DTYPES.get(name) if isinstance(name, str) else None
    if dtype is None:
        raise CheckpointFormatError(
            f"{path}: tensor '{_entry_text(key)}' has unsupported dtype {_entry_text(name, 60)}."
        )
    return dtype


# torch sizes and strides are int64: a shape whose element count (zeros aside) reaches 2**63 cannot be built,
# even with a 0 in it, e.g. [0, 2**40, 2**40]. Empty tensors need no bytes, so the offsets do not bound them.
_MAX_ELEMENTS = 2**63 - 1


def _entry_shape(path: Path, key: str, v: dict[str, Any]) -> tuple[int, ...]:
    shape = v.get("shape")
    if not isinstance(shape, list) or not all(type(s) is int and s >= 0 for s in shape):
        raise CheckpointFormatError(f"{path}: tensor '{_entry_text(key)}' has bad shape {_entry_text(shape, 60)}.")
    count = 1
    for s in shape:
        count *= max(s, 1)
        if count > _MAX_ELEMENTS:
            raise CheckpointFormatError(
                f"{path}: tensor '{_entry_text(key)}' has shape {_entry_text(shape, 60)}, too large for a tensor."
            )
    return tuple(shape)
