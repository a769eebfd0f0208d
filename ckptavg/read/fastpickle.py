"""The fast path for torch zip archives: the C unpickler with a short allow-list.

torch's weights-only unpickler is written in Python and builds a meta tensor per entry: about 25 ms
for a 320-tensor checkpoint (bench/RESULTS.md). The pickle of a plain state dict or training
checkpoint needs only a handful of globals, so `load_plain` unpickles it with the C unpickler, turning
each tensor straight into a LazyTensor, and gives up (returns None) on anything else. The caller then
falls back to torch's unpickler, so this path never changes what is accepted or how it is refused.

Nothing from the file can run code here: `find_class` answers only the names below, each mapped to
a stand-in of ours or to a plain container type; every other global ends the fast path. Our stand-ins
refuse pickle's BUILD (which would otherwise rewrite their fields, a tensor's file path included), and
the result must consist of plain values only. Before the C unpickler runs, `pickle_scan.scan` checks every
opcode (only those torch's unpickler runs, sizes within the data, memo indices no pickler would exceed), and
the result is mapped by `walk.rebuild`, so nesting and shared references cost what the pickle holds.
"""

from __future__ import annotations

import io
import pickle
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch

from .lazy import LazyTensor, lazy_view
from .pickle_scan import TORCH_WEIGHTS_ONLY, scan
from .safe_pickle import Refused
from .walk import rebuild

_QUANTIZED = {torch.qint8, torch.quint8, torch.qint32, torch.quint4x2, torch.quint2x4}
_STORAGE_DTYPES = {  # torch.FloatStorage and the like, as torch.save names a storage's type
    name: dtype for dtype, name in torch.storage._dtype_to_storage_type_map().items() if dtype not in _QUANTIZED
}


class _NotPlain(Exception):
    """The pickle holds something the fast path does not handle; torch's unpickler will."""


class _Sealed:
    """A stand-in whose fields a pickle cannot set: no __dict__, and BUILD is refused. (Not a dataclass:
    a frozen slotted dataclass brings its own __setstate__, which would let BUILD rewrite every field.)"""

    __slots__ = ()

    def __setstate__(self, state: Any) -> None:
        raise _NotPlain("BUILD on a stand-in")


class _StorageType(_Sealed):
    __slots__ = ("dtype",)

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype  # uint8 for an untyped storage (sizes are then in bytes)


class _Storage(_Sealed):
    __slots__ = ("start", "nbytes", "record", "dtype")

    def __init__(self, start: int, nbytes: int, record: int, dtype: torch.dtype) -> None:
        self.start = start  # first byte of the storage in the file
        self.nbytes = nbytes
        self.record = record  # bytes of its record in the archive
        self.dtype = dtype


class _Tensor(_Sealed):
    __slots__ = ("lazy",)

    def __init__(self, lazy: LazyTensor) -> None:
        self.lazy = lazy


_DTYPES = {name: value for name, value in vars(torch).items() if isinstance(value, torch.dtype)}
_PLAIN_LEAVES = (str, int, float, bool, complex, bytes, type(None), torch.dtype)


def load_plain(path: Path, pickled: bytes, prefix: str, records: dict[str, tuple[int, int]]) -> Any | None:
    """Unpickle `pickled` (the archive's data.pkl) with tensors as LazyTensors; None when it needs more
    than plain containers, numbers, strings and tensors. `records`: {record name: (start, size)}."""
    try:
        # only the opcodes torch's unpickler runs, with sizes the C unpickler may safely trust
        scan(pickled, 0, TORCH_WEIGHTS_ONLY)
        return rebuild(_Plain(io.BytesIO(pickled), path, prefix, records).load(), _children, _leaf, _build)[0]
    except Exception:  # noqa: BLE001 - any surprise, corrupt bytes included, is torch's unpickler's to judge
        return None


def _children(obj: Any) -> list[Any] | None:
    if type(obj) in (dict, OrderedDict):
        if any(type(k) not in _PLAIN_LEAVES for k in obj):
            raise _NotPlain("dict key")
        return list(obj.values())  # a state dict's _metadata (set by BUILD) is dropped, as torch's path drops it
    if type(obj) in (list, tuple):
        return list(obj)
    return None


def _leaf(obj: Any) -> tuple[Any, bool]:
    """Each tensor stand-in becomes its LazyTensor; anything but a plain value is _NotPlain."""
    if isinstance(obj, _Tensor):
        return obj.lazy, True
    if type(obj) in _PLAIN_LEAVES:
        return obj, False
    raise _NotPlain(type(obj).__name__)


def _build(obj: Any, results: list[tuple[Any, bool]]) -> Any:
    values = [v for v, _ in results]
    if isinstance(obj, dict):
        for k, (_, held) in zip(obj, results, strict=False):
            if held and isinstance(k, str) and not k.isascii():
                k.encode("utf-8")  # a lone surrogate: torch's path refuses it with a message (UnicodeEncodeError)
        return type(obj)(zip(obj, values, strict=True))
    return type(obj)(values)


class _Plain(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, path: Path, prefix: str, records: dict[str, tuple[int, int]]) -> None:
        super().__init__(file)
        self._path, self._prefix, self._records = path, prefix, records
        self._storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return self._tensor_v2
        if module == "torch._utils" and name == "_rebuild_tensor_v3":
            return self._tensor_v3
        if module == "torch._utils" and name == "_rebuild_parameter":
            return _parameter
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if (module, name) == ("torch.storage", "UntypedStorage"):
            return _StorageType(torch.uint8)
        if module == "torch" and name in _DTYPES:  # not getattr: torch imports submodules on attribute access
            return _DTYPES[name]
        raise _NotPlain(f"{module}.{name}")

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise _NotPlain("persistent id")
        _, kind, key, _location, numel = pid
        if not (isinstance(kind, _StorageType) and isinstance(key, str) and _is_count(numel)):
            raise _NotPlain("storage")
        if key in self._storages:  # as torch does: the first reference to a storage fixes its dtype and size
            return self._storages[key]
        start, record = self._records[f"{self._prefix}data/{key}"]  # KeyError: a missing record
        storage = self._storages[key] = _Storage(start, numel * kind.dtype.itemsize, record, kind.dtype)
        return storage

    def _tensor_v2(self, storage: Any, offset: Any, size: Any, stride: Any, *_: Any) -> _Tensor:
        if not isinstance(storage, _Storage):
            raise _NotPlain("tensor")
        return self._tensor(storage, storage.dtype, offset, size, stride)

    def _tensor_v3(self, storage: Any, offset: Any, size: Any, stride: Any, _grad: Any, _hooks: Any,
                   dtype: Any, *_: Any) -> _Tensor:
        if not (isinstance(storage, _Storage) and isinstance(dtype, torch.dtype)):
            raise _NotPlain("tensor")
        return self._tensor(storage, dtype, offset, size, stride)

    def _tensor(self, storage: _Storage, dtype: torch.dtype, offset: Any, size: Any, stride: Any) -> _Tensor:
        """The checks of `pickles._lazy_from_meta`, on the numbers torch would have put on a meta tensor."""
        if not (_is_count(offset) and isinstance(size, tuple) and isinstance(stride, tuple)
                and len(size) == len(stride) and all(map(_is_count, size + stride))):
            raise _NotPlain("tensor layout")
        if dtype in _QUANTIZED or storage.record < storage.nbytes:
            raise _NotPlain("tensor storage")
        lazy = lazy_view(self._path, dtype, size, stride, storage.start + offset * dtype.itemsize)
        if lazy.numel and lazy.file_offset + lazy.extent > storage.start + storage.nbytes:
            raise _NotPlain("tensor past its storage")
        return _Tensor(lazy)


def _parameter(data: Any, *_: Any) -> _Tensor:
    if not isinstance(data, _Tensor):
        raise _NotPlain("parameter")
    return data


def _is_count(x: Any) -> bool:
    return type(x) is int and x >= 0


class Extended(_Plain):
    """The lazy tensor unpickler with more names (`allowed`: a library's inert stand-ins); other globals are
    refused by name (`Refused`), or with `trust` imported as pickle normally does."""

    allowed: ClassVar[Mapping[tuple[str, str], Any]] = {}

    def __init__(self, file: io.BytesIO, path: Path, prefix: str, records: dict[str, tuple[int, int]], trust: bool) -> None:
        super().__init__(file, path, prefix, records)
        self._trust = trust

    def find_class(self, module: str, name: str) -> Any:
        found = self.allowed.get((module, name))
        if found is not None:
            return found
        try:
            return super().find_class(module, name)
        except _NotPlain:
            if self._trust:
                return pickle.Unpickler.find_class(self, module, name)
            raise Refused(f"{module}.{name}") from None
