"""A training checkpoint's pickle as an inert tree, for writing a copy of it (`--container`).

Every global the pickle names becomes a stand-in class (`Global`) that remembers its module and name and is
never imported; every object the pickle builds from one (REDUCE, NEWOBJ, BUILD, APPENDS, SETITEMS) becomes an
`Opaque` that remembers how it was built, so that `write.container` can pickle it again to the same opcodes.
Tensors stay as the call torch.load makes to rebuild them, around a `Stored` reference to their storage
record: nothing of the file runs, and no tensor data is read.

Without trust only the globals of `ALLOWED` are accepted (torch's tensors, storages and dtypes, plain
containers, the args Namespace, Lightning's AttributeDict, NumPy's RNG state, Transformer Engine's BytesIO);
any other is refused by name. With trust any global is carried through, still as a stand-in.
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import CheckpointFormatError, first_line, one_line
from .pickle_scan import BadPickle, scan
from .safetensors_file import sniff
from .torch_zip import check_torch_zip

_STORAGES = {f"{kind}Storage" for kind in ("Bool", "Byte", "Char", "Short", "Int", "Long", "Half", "BFloat16",
                                           "Float", "Double", "ComplexFloat", "ComplexDouble", "Untyped")}
ALLOWED = frozenset({
    ("collections", "OrderedDict"), ("argparse", "Namespace"), ("_codecs", "encode"), ("codecs", "encode"),
    ("builtins", "set"), ("builtins", "frozenset"), ("__builtin__", "set"), ("__builtin__", "frozenset"),
    ("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_tensor_v3"), ("torch._utils", "_rebuild_parameter"),
    ("torch.storage", "UntypedStorage"), ("torch", "Size"), ("torch", "device"), ("pathlib", "PosixPath"),
    ("lightning.fabric.utilities.data", "AttributeDict"), ("pytorch_lightning.utilities.parsing", "AttributeDict"),
    ("lightning_fabric.utilities.data", "AttributeDict"), ("_io", "BytesIO"), ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
})
TENSOR_REBUILDS = frozenset({("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_tensor_v3")})
PARAMETER = ("torch._utils", "_rebuild_parameter")
UNSET: Any = object()  # no BUILD state (a BUILD of None is possible)


def _allowed(module: str, name: str) -> bool:
    import torch  # noqa: PLC0415 - the dtype names, known once torch is loaded (it is, by the reader)

    return ((module, name) in ALLOWED or module == "torch" and (name in _STORAGES or isinstance(getattr(
        torch, name, None) if name.isidentifier() and not name.startswith("_") else None, torch.dtype)))


class Global(type):
    """The metaclass of stand-ins: a class that stands for the global `module.name` of a pickle."""

    _where: tuple[str, str]

    @property
    def where(cls) -> tuple[str, str]:
        return cls._where


class Opaque:
    """An object the pickle built from a stand-in class: its arguments, and what was set on it afterwards."""

    _where: tuple[str, str]
    args: tuple[Any, ...]
    newobj: bool
    state: Any
    items: list[Any]
    pairs: list[tuple[Any, Any]]

    def __new__(cls, *args: Any) -> Opaque:  # NEWOBJ calls this alone; REDUCE calls the class (and __init__)
        self = object.__new__(cls)
        self.args, self.newobj, self.state = args, True, UNSET
        self.items, self.pairs = [], []
        return self

    def __init__(self, *args: Any) -> None:
        self.newobj = False

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __setitem__(self, key: Any, value: Any) -> None:
        self.pairs.append((key, value))

    def append(self, item: Any) -> None:
        self.items.append(item)

    def extend(self, items: Any) -> None:
        self.items.extend(items)

    @property
    def where(self) -> tuple[str, str]:
        return self._where

    def rebuilt(self, args: tuple[Any, ...]) -> Opaque:
        """The same call with other arguments (a parameter around a new tensor)."""
        other = Opaque.__new__(type(self), *args)
        other.newobj, other.state, other.items, other.pairs = self.newobj, self.state, self.items, self.pairs
        return other


@dataclass(frozen=True)
class Stored:
    """A reference to a storage record of the source archive (torch's persistent id)."""

    pid: tuple[Any, ...]

    @property
    def key(self) -> str:
        return str(self.pid[2])


class _Refused(pickle.UnpicklingError):
    pass


class _TreeUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, trust: bool) -> None:
        super().__init__(io.BytesIO(data))
        self._trust = trust
        self._classes: dict[tuple[str, str], type] = {}

    def find_class(self, module: str, name: str) -> Any:
        if not self._trust and not _allowed(module, name):
            raise _Refused(f"{module}.{name}")
        found = self._classes.get((module, name))
        if found is None:
            found = self._classes[(module, name)] = Global(name, (Opaque,), {"_where": (module, name)})
        return found

    def persistent_load(self, pid: Any) -> Stored:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[2], str)):
            raise pickle.UnpicklingError("a persistent id that is not a torch storage")
        return Stored(pid)


@dataclass(frozen=True)
class Tree:
    """The unpickled container of a torch zip archive, and its storage records {key: (start, size)}."""

    path: Path
    root: Any
    records: dict[str, tuple[int, int]]


def read_tree(path: Path, trust: bool) -> Tree:
    """Unpickle `path`'s data.pkl into stand-ins, running nothing from it.

    Raises:
        CheckpointFormatError: for a legacy (non-zip) file, a class outside the allow-list (without `trust`;
            the message names it and the opt-in), or a pickle torch.save does not write.
    """
    if sniff(path) == "torch-legacy":
        raise CheckpointFormatError(f"{path}: a legacy (non-zip) torch file; container output copies a zip "
                                    "archive: re-save it with a current torch.save.")
    archive = check_torch_zip(path)
    try:
        scan(archive.pickled, 0)
        root = _TreeUnpickler(archive.pickled, trust).load()
    except _Refused as e:
        raise CheckpointFormatError(
            f"{path}: the checkpoint holds a '{e}', which safe loading does not unpickle (it could run code); "
            "if you trust this file, pass --trust-pickle to carry it into the output unchanged.") from None
    except (BadPickle, pickle.UnpicklingError, ValueError, TypeError, EOFError) as e:
        raise CheckpointFormatError(f"{path}: not a pickle torch.save writes ({one_line(first_line(e), 200)}); "
                                    "the file is corrupt.") from None
    prefix = archive.prefix + "data/"
    records = {name[len(prefix):]: at for name, at in archive.records.items() if name.startswith(prefix)}
    return Tree(path, root, records)


def mapping_items(node: Any) -> list[tuple[Any, Any]] | None:
    """The entries of a dict-like node (a dict, an OrderedDict or AttributeDict stand-in), else None."""
    if isinstance(node, dict):
        return list(node.items())
    if isinstance(node, Opaque) and node.pairs and not node.items:
        pairs: list[tuple[Any, Any]] = node.pairs
        return pairs
    return None


def is_tensor(node: Any) -> bool:
    """A tensor (or parameter) of the source file, as the call that rebuilds it."""
    return isinstance(node, Opaque) and (node.where in TENSOR_REBUILDS or node.where == PARAMETER)


def key_text(key: Any) -> str:
    """A key as part of a dotted tensor name, as `read.locate` spells it."""
    return key if isinstance(key, str) else str(key)


def tensor_leaves(node: Any, prefix: str = "") -> Iterator[tuple[str, Any, Any]]:
    """(dotted name, holder, slot) of every tensor under `node` through dict-like nodes and pickled modules (by
    their state_dict() names), in order; the slot is the key of a dict, the index in a stand-in's entries."""
    module = module_state(node)
    if module is not None:
        yield from _module_leaves(module, prefix)
        return
    items = mapping_items(node)
    for i, (k, v) in enumerate(items or []):
        name = f"{prefix}{key_text(k)}"
        if is_tensor(v):
            yield name, node, k if isinstance(node, dict) else i
        elif mapping_items(v) is not None or module_state(v) is not None:
            yield from tensor_leaves(v, name + ".")


def module_state(node: Any) -> dict[Any, Any] | None:
    """The pickled __dict__ of an nn.Module stand-in (it has _parameters, _buffers and _modules), else None."""
    state = node.state if isinstance(node, Opaque) else None
    if isinstance(state, dict) and all(k in state for k in ("_parameters", "_buffers", "_modules")):
        return state
    return None


def _module_leaves(state: dict[Any, Any], prefix: str) -> Iterator[tuple[str, Any, Any]]:
    """A module's tensors as `nn.Module.state_dict()` names them: parameters, persistent buffers, children."""
    skip = state.get("_non_persistent_buffers_set")
    transient = set(skip.args[0]) if isinstance(skip, Opaque) and skip.args and isinstance(skip.args[0], list) else set()
    for entry in ("_parameters", "_buffers"):
        holder = state[entry]
        for i, (k, v) in enumerate(mapping_items(holder) or []):
            if is_tensor(v) and not (entry == "_buffers" and k in transient):
                yield f"{prefix}{key_text(k)}", holder, k if isinstance(holder, dict) else i
    for k, child in mapping_items(state["_modules"]) or []:
        if module_state(child) is not None:
            yield from tensor_leaves(child, f"{prefix}{key_text(k)}.")


def put(holder: Any, slot: Any, value: Any) -> None:
    """Replace the entry of `holder` at `slot` (from `tensor_leaves`)."""
    if isinstance(holder, dict):
        holder[slot] = value
    else:
        holder.pairs[slot] = (holder.pairs[slot][0], value)


def get(holder: Any, slot: Any) -> Any:
    return holder[slot] if isinstance(holder, dict) else holder.pairs[slot][1]
