"""The bytes of a torch.save-style archive, planned before any is written: the pickle, the other small
records, and the zip container around them, laid out for a writer that streams each record once.

The pickle (``data.pkl``) is made by Python's pickler from stand-ins that reduce exactly as torch's tensors
and storages do; it depends only on the specs, so every size and offset is known up front.

Every record is stored (never compressed), its data aligned to `ALIGN` bytes by padding in the local
header's extra field, as torch's own writer does, so that `torch.load(mmap=True)` can map tensors in place.
A record's CRC-32 is only known once its data has been written, so the local header carries none: general
purpose bit 3 says a data descriptor after the data holds the CRC and sizes, and the central directory
repeats them. Empty records have nothing to wait for and get neither the bit nor a descriptor.

ZIP64 is used per record, only where a value does not fit in 32 bits: a record of 4 GiB or more, or one
that starts 4 GiB or more into the file, gets a ZIP64 extra field in its local header and in its central
entry (holding just the values that overflow) and a 64-bit descriptor. The archive always ends with a ZIP64
end record and locator, as torch's writer does; the classic end record keeps the values that fit.

Sizes and offsets depend only on names and data sizes, so the whole file size is known before any byte is
written; the CRCs are the only thing filled in afterwards. Everything is little-endian, with no timestamps.
"""

from __future__ import annotations

import io
import json
import pickle
import struct
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..layout import TensorSpec
from ..read.torch_extra import ARCHIVE, EXTRA_METADATA

ALIGN = 64
ZIP64_LIMIT = 0xFFFFFFFF  # sizes and offsets from here on need ZIP64 (tests lower it to exercise ZIP64 cheaply)
COUNT_LIMIT = 0xFFFF  # likewise for the entry count
_MAX32 = 0xFFFFFFFF  # a 32-bit field holding this means "see the ZIP64 field"
_MAX16 = 0xFFFF

_LOCAL = b"PK\x03\x04"
_DESCRIPTOR = b"PK\x07\x08"
_CENTRAL = b"PK\x01\x02"
_END64 = b"PK\x06\x06"
_LOCATOR64 = b"PK\x06\x07"
_END = b"PK\x05\x06"
_ZIP64_TAG = 0x0001
_PAD_TAG = 0x4246  # "FB", the tag of torch's alignment padding
_UTF8 = 0x0800  # bit 11: names are UTF-8
_STREAMED = 0x0008  # bit 3: CRC and sizes follow the data
_VERSION = 20  # 2.0: stored records with data descriptors
_VERSION64 = 45  # 4.5: ZIP64
_FIXED_LOCAL = 30
_FIXED_CENTRAL = 46
_PAD_HEADER = 4


@dataclass(frozen=True)
class Record:
    """One member of the archive: its name, the offset of its local header, the size of its data."""

    name: str
    offset: int
    size: int

    @property
    def raw_name(self) -> bytes:
        return self.name.encode()

    @property
    def wide_size(self) -> bool:
        return self.size >= ZIP64_LIMIT

    @property
    def wide_offset(self) -> bool:
        return self.offset >= ZIP64_LIMIT

    @property
    def zip64(self) -> bool:
        """Its local header carries a ZIP64 extra field and its descriptor 64-bit sizes.

        torch.load computes where tensor data lies from these rules rather than reading each local header
        (on the meta device, and optionally with mmap), so they follow what torch's writer does: ZIP64 when
        the size or the local header's offset needs it, the field holding only the values that overflow.
        """
        return self.wide_size or self.wide_offset

    @property
    def streamed(self) -> bool:
        """Written with bit 3 and a data descriptor; an empty record's CRC (0) is known up front."""
        return self.size > 0

    def _zip64_extra(self, size: int) -> bytes:
        wide = ([size, size] if self.wide_size else []) + ([self.offset] if self.wide_offset else [])
        return struct.pack(f"<HH{len(wide)}Q", _ZIP64_TAG, 8 * len(wide), *wide) if wide else b""

    def _local_extra_len(self) -> int:
        unpadded = len(self._zip64_extra(0)) + _PAD_HEADER
        return unpadded + (-(self.offset + _FIXED_LOCAL + len(self.raw_name) + unpadded)) % ALIGN

    @property
    def data_start(self) -> int:
        """Where the record's data begins: a multiple of `ALIGN`."""
        return self.offset + _FIXED_LOCAL + len(self.raw_name) + self._local_extra_len()

    @property
    def descriptor_len(self) -> int:
        return 0 if not self.streamed else 24 if self.zip64 else 16

    @property
    def end(self) -> int:
        """The offset just past the record (its descriptor included)."""
        return self.data_start + self.size + self.descriptor_len

    @property
    def _version(self) -> int:
        return _VERSION64 if self.zip64 else _VERSION

    @property
    def _flags(self) -> int:
        return _UTF8 | (_STREAMED if self.streamed else 0)

    def local_header(self) -> bytes:
        """The local header, padded so that the data which follows it starts at a multiple of `ALIGN`."""
        name = self.raw_name
        extra = self._zip64_extra(0)  # sizes: zero here, as bit 3 asks; the descriptor has them
        pad = self._local_extra_len() - len(extra) - _PAD_HEADER
        extra += struct.pack("<HH", _PAD_TAG, pad) + b"Z" * pad
        size32 = _MAX32 if self.wide_size else 0
        return struct.pack("<4sHHHHHIIIHH", _LOCAL, self._version, self._flags, 0, 0, 0, 0, size32, size32,
                           len(name), len(extra)) + name + extra

    def descriptor(self, crc: int) -> bytes:
        """The data descriptor that follows the data (nothing for an empty record)."""
        if not self.streamed:
            return b""
        return struct.pack("<4sIQQ" if self.zip64 else "<4sIII", _DESCRIPTOR, crc, self.size, self.size)

    def central_len(self) -> int:
        return _FIXED_CENTRAL + len(self.raw_name) + len(self._zip64_extra(self.size))

    def central(self, crc: int) -> bytes:
        """The record's central directory entry."""
        name = self.raw_name
        extra = self._zip64_extra(self.size)
        size32 = _MAX32 if self.wide_size else self.size
        offset32 = _MAX32 if self.wide_offset else self.offset
        return struct.pack("<4sHHHHHHIIIHHHHHII", _CENTRAL, _VERSION64, self._version, self._flags, 0, 0, 0, crc,
                           size32, size32, len(name), len(extra), 0, 0, 0, 0, offset32) + name + extra


def plan_records(members: Sequence[tuple[str, int]], start: int = 0) -> list[Record]:
    """Lay out records of these (name, data size), one after another from `start`."""
    records = []
    offset = start
    for name, size in members:
        rec = Record(name, offset, size)
        records.append(rec)
        offset = rec.end
    return records


def directory_len(records: Sequence[Record]) -> int:
    """Bytes of the central directory and the end records that follow the last record."""
    return sum(r.central_len() for r in records) + 56 + 20 + 22


def archive_len(records: Sequence[Record]) -> int:
    """The size of the whole archive."""
    return (records[-1].end if records else 0) + directory_len(records)


def directory(records: Sequence[Record], crcs: Sequence[int]) -> bytes:
    """The central directory and the end records, for `records` with these CRC-32s."""
    entries = b"".join(r.central(c) for r, c in zip(records, crcs, strict=True))
    at = records[-1].end if records else 0
    count = len(records)
    end64 = struct.pack("<4sQHHIIQQQQ", _END64, 44, _VERSION64, _VERSION64, 0, 0, count, count, len(entries), at)
    locator = struct.pack("<4sIQI", _LOCATOR64, 0, at + len(entries), 1)
    count16 = count if count < COUNT_LIMIT else _MAX16
    end = struct.pack("<4sHHHHIIH", _END, 0, 0, count16, count16, _fit32(len(entries)), _fit32(at), 0)
    return entries + end64 + locator + end


def _fit32(value: int) -> int:
    return value if value < ZIP64_LIMIT else _MAX32


FORMAT_VERSION = b"1"
FILE_VERSION = b"3\n"
SERIALIZATION_ID_LEN = 40

# Dtypes with a legacy typed storage class are pickled through it (and _rebuild_tensor_v2), as torch does;
# the others (unsigned 16-64 bit, float8) as an untyped storage of bytes plus their dtype (_rebuild_tensor_v3).
_LEGACY_STORAGES = {
    torch.bool: "BoolStorage", torch.uint8: "ByteStorage", torch.int8: "CharStorage",
    torch.int16: "ShortStorage", torch.int32: "IntStorage", torch.int64: "LongStorage",
    torch.float16: "HalfStorage", torch.bfloat16: "BFloat16Storage", torch.float32: "FloatStorage",
    torch.float64: "DoubleStorage", torch.complex64: "ComplexFloatStorage", torch.complex128: "ComplexDoubleStorage",
}
# One object each, so the pickler writes them once and refers back to them, as in torch's pickles.
_STORAGE = "storage"
_CPU = "cpu"


class _StorageRef:
    """Stands for a tensor's storage; the pickler writes it as torch's persistent id for it."""

    __slots__ = ("pid",)

    def __init__(self, pid: tuple[Any, ...]) -> None:
        self.pid = pid


StorageRef = _StorageRef  # what a pickler of a whole training checkpoint writes as a persistent id


class _TensorRef:
    """Stands for a tensor: pickled as the call that torch.load makes to rebuild it."""

    __slots__ = ("rebuild", "args")

    def __init__(self, rebuild: Any, args: tuple[Any, ...]) -> None:
        self.rebuild = rebuild
        self.args = args

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return self.rebuild, self.args


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj: Any) -> Any:
        return obj.pid if isinstance(obj, _StorageRef) else None


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= max(n, 1)
    return tuple(reversed(strides))


def tensor_ref(spec: TensorSpec, key: str) -> _TensorRef:
    """A stand-in that pickles as torch pickles a contiguous tensor of `spec` in storage record `key`."""
    return _tensor_ref(spec, key)


def _tensor_ref(spec: TensorSpec, key: str) -> _TensorRef:
    dtype = spec.out_dtype
    shape = tuple(spec.shape)
    numel = spec.nbytes // dtype.itemsize
    legacy = _LEGACY_STORAGES.get(dtype)
    if legacy is not None:
        storage = _StorageRef((_STORAGE, getattr(torch, legacy), key, _CPU, numel))
        return _TensorRef(torch._utils._rebuild_tensor_v2,
                          (storage, 0, shape, _contiguous_strides(shape), False, OrderedDict()))
    storage = _StorageRef((_STORAGE, torch.UntypedStorage, key, _CPU, spec.nbytes))
    return _TensorRef(torch._utils._rebuild_tensor_v3,
                      (storage, 0, shape, _contiguous_strides(shape), False, OrderedDict(), dtype))


def state_dict_pickle(specs: Sequence[TensorSpec]) -> bytes:
    """data.pkl for these tensors, in this order, tensor i in storage record ``data/<i>``."""
    state = OrderedDict((spec.name, _tensor_ref(spec, str(i))) for i, spec in enumerate(specs))
    buf = io.BytesIO()
    _Pickler(buf, protocol=2).dump(state)
    return buf.getvalue()


def tensor_pickle(spec: TensorSpec) -> bytes:
    """data.pkl of ``torch.save(tensor)`` for one tensor (storage record ``data/0``): what a DCP data file
    holds for each tensor chunk."""
    buf = io.BytesIO()
    _Pickler(buf, protocol=2).dump(_tensor_ref(spec, "0"))
    return buf.getvalue()


def metadata_json(metadata: dict[str, str]) -> bytes:
    """The extra metadata record: keys sorted, compact, UTF-8 (as a safetensors header's ``__metadata__``)."""
    return json.dumps(dict(sorted(metadata.items())), separators=(",", ":"), ensure_ascii=False).encode()


def plan_archive(specs: Sequence[TensorSpec], metadata: dict[str, str], pickled: bytes | None = None,
                 data: Sequence[tuple[str, int]] | None = None) -> tuple[list[Record], list[bytes]]:
    """The records of the file in the order they lie in it, and the contents of those before the tensors.

    Records: the leading ones (whose contents are returned), one per spec (``data/<i>``), then ``version``
    and ``.data/serialization_id``. A training checkpoint around the state dict has a `pickled` data.pkl of its
    own, and its `data` records (key, size) in their order: the specs' and storages copied from another file.
    """
    head = [("data.pkl", state_dict_pickle(specs) if pickled is None else pickled), (".format_version", FORMAT_VERSION),
            (".storage_alignment", str(ALIGN).encode()), ("byteorder", b"little")]
    if metadata:
        head.append((EXTRA_METADATA, metadata_json(metadata)))
    members = [(ARCHIVE + name, len(data)) for name, data in head]
    data = [(str(i), spec.nbytes) for i, spec in enumerate(specs)] if data is None else data
    members += [(f"{ARCHIVE}data/{key}", size) for key, size in data]
    members += [(ARCHIVE + "version", len(FILE_VERSION)), (ARCHIVE + ".data/serialization_id", SERIALIZATION_ID_LEN)]
    return plan_records(members), [data for _, data in head]


def serialization_id(crcs: Sequence[int], nbytes: int) -> bytes:
    """40 digits that identify the archive's contents: a fold of the records' CRCs and their total size.

    torch derives its own id from the records too (never from the time or chance), so equal files get
    equal ids; this one is computed differently, so it never equals one torch made."""
    fold = 0xCBF29CE484222325
    for crc in crcs:
        fold = ((fold ^ crc) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return f"{fold:020d}{nbytes % 10**20:020d}".encode()
