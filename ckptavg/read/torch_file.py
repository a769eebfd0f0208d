"""Torch pickles: unpickle safely (weights_only), onto the meta device for zip archives, so that
only the structure is read and each tensor becomes a LazyTensor pointing at its bytes in the file."""

from __future__ import annotations

import argparse
import mmap
import pickle
import re
import warnings
import zipfile  # noqa: F401 - tests/test_fastpickle.py reaches zipfile through this module
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointFormatError, CkptavgWarning, first_line, one_line
from .fastpickle import load_plain
from .lazy import LazyTensor, check_view, lazy_view
from .locate import ModuleState
from .pickle_scan import TORCH_WEIGHTS_ONLY, BadPickle, scan
from .safe_pickle import refusal
from .torch_zip import check_torch_zip
from .walk import Cycle, rebuild

# Plain data containers seen in real training checkpoints; none can run code when rebuilt. Lightning's
# AttributeDict (a dict subclass holding hyper_parameters) is read as a plain dict: torch's weights-only
# unpickler fills only exact dicts (SETITEMS), and the weights never depend on it.
_SAFE_EXTRAS: list[Any] = [
    argparse.Namespace,
    (dict, "lightning.fabric.utilities.data.AttributeDict"),
    (dict, "pytorch_lightning.utilities.parsing.AttributeDict"),
    (dict, "lightning_fabric.utilities.data.AttributeDict"),
]


def load_torch(path: Path, fmt: str, trust_pickle: bool) -> Any:
    """Unpickle a torch checkpoint; zip archives come back with lazy tensors (no data read)."""
    lazy = fmt == "torch-zip"
    archive = check_torch_zip(path) if lazy else None
    if archive is not None and not trust_pickle:
        plain = load_plain(path, archive.pickled, archive.prefix, archive.records)
        if plain is not None:  # the common case, read by the C unpickler; anything else goes to torch's
            return plain
    records = {start: size for start, size in archive.records.values()} if archive else {}
    _scan_pickles(path, archive.pickled if archive else None, None if trust_pickle else TORCH_WEIGHTS_ONLY)
    try:
        # An open file, not a path: torch.load hands paths ending in .safetensors to safetensors.
        with open(path, "rb") as f, warnings.catch_warnings(), torch.serialization.safe_globals(_SAFE_EXTRAS):
            warnings.simplefilter("ignore")
            obj = torch.load(f, map_location="meta" if lazy else "cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as e:
        m = re.search(r"GLOBAL ([\w.]+)", str(e))
        if m and not trust_pickle:
            raise refusal(path, m.group(1), _pickled_module(m.group(1))) from None
        raise CheckpointFormatError(f"{path}: cannot unpickle ({_torch_reason(e)}); the file is corrupt.") from None
    except (ImportError, AttributeError) as e:
        raise CheckpointFormatError(
            f"{path}: unpickling needs code that is not importable here ({first_line(e)})."
        ) from None
    except CheckpointFormatError:
        raise
    except Exception as e:  # noqa: BLE001 - torch's loaders raise many types on corrupt bytes
        raise CheckpointFormatError(
            f"{path}: unreadable torch checkpoint ({type(e).__name__}: {one_line(first_line(e), 200)}); the file is "
            "corrupt or truncated."
        ) from None
    if not lazy:
        _check_legacy_storages(path)
        warnings.warn(
            "legacy (non-zip) torch files are read whole into memory instead of streamed; "
            "re-save them with a current torch.save to stream them.",
            CkptavgWarning,
            stacklevel=2,
        )
    return _lazify(path, obj, partial(_lazy_from_meta, records) if lazy else _eager)[0]


def _scan_pickles(path: Path, pickled: bytes | None, allowed: frozenset[int] | None) -> None:
    """Check the pickles' opcodes before any unpickler reads them (see pickle_scan): an archive's data.pkl,
    or the five pickles that open a legacy file (magic number, protocol, system info, object, storage keys)."""
    try:
        if pickled is not None:
            scan(pickled, 0, allowed)
            return
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            at = 0
            for _ in range(5):
                at = scan(data, at, allowed)
    except BadPickle as e:
        raise CheckpointFormatError(f"{path}: not a pickle torch.save writes ({e}); the file is corrupt.") from None
    except (OSError, ValueError) as e:  # ValueError: mmap of an empty file (it shrank since it was sniffed)
        raise CheckpointFormatError(f"{path}: cannot read ({first_line(e)}).") from None


def _pickled_module(name: str) -> str:
    """What a refused class says about the file: Ultralytics (and others) pickle the whole nn.Module."""
    if name.startswith("ultralytics."):
        return "an Ultralytics checkpoint: it holds a pickled module, whose weights are its state_dict(); "
    if ".nn." in name or name.startswith("torch.nn"):
        return "it holds a pickled module, whose weights are its state_dict(); "
    return ""


def _torch_reason(e: BaseException) -> str:
    """The line of torch's weights-only refusal that says what was refused (its first is the same for all)."""
    text = str(e)
    _, found, rest = text.partition("WeightsUnpickler error:")
    lines = [ln.strip() for ln in rest.splitlines() if ln.strip()] if found else []
    return one_line(lines[0] if lines else first_line(e), 200)


class _Anything:
    """Stands for every global and every object in a pickle walked by `_Skeleton`: it accepts any call,
    state or item, so the walk needs no real class and runs no code from the file."""

    def __new__(cls, *args: Any, **kwargs: Any) -> _Anything:
        return object.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __call__(self, *args: Any, **kwargs: Any) -> _Anything:
        return _Anything()

    def __setstate__(self, state: Any) -> None:
        pass

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def append(self, item: Any) -> None:
        pass

    def extend(self, items: Any) -> None:
        pass


class _Skeleton(pickle.Unpickler):
    """Walks a pickle without importing anything, collecting its persistent ids (torch's storage references)."""

    def __init__(self, file: Any) -> None:
        super().__init__(file)
        self.persistent_ids: list[Any] = []

    def find_class(self, module: str, name: str) -> Any:
        return _Anything

    def persistent_load(self, pid: Any) -> Any:
        self.persistent_ids.append(pid)
        return _Anything()


def _check_legacy_storages(path: Path) -> None:
    """Refuse a legacy file whose pickle references a storage that its data section does not hold.

    torch.load gives such a storage uninitialised memory instead of failing (found by fuzzing: one flipped
    digit in a storage key), so the average would silently include garbage. Layout: magic number, protocol,
    system info, the object (storages as persistent ids), the list of storage keys, then their data.
    """
    try:
        with open(path, "rb") as f:
            for _ in range(3):
                _Skeleton(f).load()
            main = _Skeleton(f)
            main.load()
            keys = _Skeleton(f).load()
    except Exception as e:  # noqa: BLE001 - the standard unpickler refuses what torch.save never writes
        # torch's own unpickler is laxer (it accepts an unknown protocol number, found by fuzzing), so a file
        # that only it reads cannot be checked, and may hold exactly the garbage this check is for.
        raise CheckpointFormatError(
            f"{path}: not a pickle torch.save writes ({type(e).__name__}: {first_line(e)}); the file is corrupt."
        ) from None
    held = set(keys) if isinstance(keys, list) and all(isinstance(k, str) for k in keys) else None
    for pid in main.persistent_ids:
        if not (isinstance(pid, tuple) and len(pid) >= 3 and pid[0] in ("storage", b"storage")):
            continue
        if held is None or pid[2] not in held:
            raise CheckpointFormatError(
                f"{path}: the pickle references tensor data (storage {str(pid[2])[:40]!r}) that the file does not "
                "hold; the file is corrupt."
            )


def _lazify(path: Path, obj: Any, wrap: Callable[[Path, torch.Tensor], LazyTensor]) -> tuple[Any, bool]:
    """Replace every tensor in an unpickled checkpoint by a LazyTensor made by `wrap`; also say whether
    `obj` held any tensor. Shared references stay shared: each tensor and container is mapped once."""

    def leaf(node: Any) -> tuple[Any, bool]:
        if isinstance(node, torch.Tensor):
            return wrap(path, node), True
        return node, isinstance(node, LazyTensor)  # a LazyTensor comes from the fast path

    def build(node: Any, results: list[tuple[Any, bool]]) -> Any:
        values = [v for v, _ in results]
        if isinstance(node, torch.nn.Module):  # only with trust_pickle: a whole module gives its state_dict()
            return ModuleState(type(node).__name__, zip(node.state_dict(keep_vars=True), values, strict=True))
        if isinstance(node, dict):  # dict, OrderedDict and dict subclasses rebuild from pairs
            for k, (_, held) in zip(node, results, strict=True):
                if held and isinstance(k, str):
                    _check_name(path, k)
            try:
                return type(node)(zip(node, values, strict=True))
            except TypeError:  # a subclass that is not built from pairs (defaultdict): a plain dict will do
                return dict(zip(node, values, strict=True))
        return type(node)(values)

    try:
        return rebuild(obj, _children, leaf, build)
    except Cycle:
        raise CheckpointFormatError(
            f"{path}: the pickle holds a container that contains itself, which torch.save never writes; "
            "the file is corrupt or crafted."
        ) from None


def _children(node: Any) -> list[Any] | None:
    if isinstance(node, torch.nn.Module):
        return list(node.state_dict(keep_vars=True).values())
    if isinstance(node, dict):
        return list(node.values())
    if isinstance(node, list | tuple) and not hasattr(node, "_fields"):
        return list(node)
    return None


def _check_name(path: Path, key: str) -> None:
    """A key that becomes part of a tensor name must be valid Unicode: pickles can carry lone surrogates,
    which no safetensors header (UTF-8 JSON) can hold."""
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:
        raise CheckpointFormatError(f"{path}: a tensor name is not valid Unicode ({key!r:.80}).") from None


def _eager(path: Path, t: torch.Tensor) -> LazyTensor:
    if t.layout != torch.strided or t.is_quantized:
        raise CheckpointFormatError(f"{path}: sparse or quantized tensors are not supported.")
    check_view(path, t.dtype, tuple(t.shape), tuple(t.stride()))
    return LazyTensor(path, t.dtype, tuple(t.shape), eager=t.detach())


def _lazy_from_meta(records: dict[int, int], path: Path, t: torch.Tensor) -> LazyTensor:
    if t.layout != torch.strided or t.is_quantized:
        raise CheckpointFormatError(f"{path}: sparse or quantized tensors are not supported.")
    storage = t.untyped_storage()
    storage_at = getattr(storage, "_checkpoint_offset", None)
    if storage_at is None:
        raise CheckpointFormatError(f"{path}: cannot locate tensor data in the archive.")
    lazy = lazy_view(path, t.dtype, tuple(t.shape), tuple(t.stride()), storage_at + t.storage_offset() * t.dtype.itemsize)
    _check_extent(path, lazy, storage_at, storage.nbytes(), records)
    return lazy


def _check_extent(path: Path, lazy: LazyTensor, storage_at: int, storage_bytes: int, records: dict[int, int]) -> None:
    """The tensor's bytes must lie inside its storage, and the storage inside its record of the archive:
    otherwise a corrupt pickle could make `load()` read another tensor's bytes, or allocate terabytes."""
    if lazy.numel == 0:
        return
    record = records.get(storage_at)
    if record is not None and record < storage_bytes:
        raise CheckpointFormatError(
            f"{path}: the pickle gives a tensor storage {storage_bytes} bytes, but its record in the archive holds "
            f"{record}; the file is corrupt."
        )
    if record is None:
        raise CheckpointFormatError(
            f"{path}: tensor data is not where torch.save puts it (a storage of {storage_bytes} bytes at offset "
            f"{storage_at}): the archive is corrupt or was re-packed by another zip tool; load it with torch.load "
            "and save it again with torch.save."
        )
    if lazy.file_offset + lazy.extent > storage_at + storage_bytes:
        raise CheckpointFormatError(
            f"{path}: a tensor of shape {list(lazy.shape)} reaches past the end of its storage; the file is corrupt."
        )
