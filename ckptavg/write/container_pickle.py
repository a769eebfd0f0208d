"""Pickling a checkpoint's inert tree (`read.container_tree`) back to the opcodes it was read from, so that a
copy of the checkpoint holds every entry as it was, without ckptavg ever importing or running its classes."""

from __future__ import annotations

import io
import pickle
from typing import Any

from ..read.container_tree import UNSET, Global, Opaque, Stored
from .torch_archive import StorageRef

# Globals torch.load(weights_only=True) accepts (with ckptavg's Namespace and AttributeDict): a copy that needs
# no other is checked with it by --verify.
_WEIGHTS_ONLY_MODULES = ("torch", "torch._utils", "torch.storage", "collections", "argparse", "_codecs", "codecs",
                         "lightning.fabric.utilities.data", "pytorch_lightning.utilities.parsing",
                         "lightning_fabric.utilities.data")

_PythonPickler: Any = pickle._Pickler  # its `save` can be extended: see TreePickler


class TreePickler(_PythonPickler):  # type: ignore[misc]
    """Pickles a tree of stand-ins back to the opcodes they were read from (protocol 2, as torch.save).

    After `dump`: `renamed`, each storage's key in the copy, numbered as first referred to; `plain`, whether
    torch.load(weights_only=True) accepts every global the copy names."""

    def __init__(self, file: io.BytesIO) -> None:
        super().__init__(file, protocol=2)
        # (averaged?, key of the source's storage or the averaged tensor's number) -> key in the copy, numbered
        # as first referred to
        self.renamed: dict[tuple[bool, str], str] = {}
        self.plain = True

    def persistent_id(self, obj: Any) -> Any:
        if not isinstance(obj, StorageRef | Stored):
            return None
        source = (isinstance(obj, StorageRef), str(obj.pid[2]))
        key = self.renamed.setdefault(source, str(len(self.renamed)))
        return (obj.pid[0], obj.pid[1], key, *obj.pid[3:])

    def save(self, obj: Any, save_persistent_id: bool = True) -> None:
        if isinstance(obj, Global):
            self._save_global(obj)
        elif isinstance(obj, Opaque):
            self._save_opaque(obj)
        else:
            super().save(obj, save_persistent_id)

    def _memoized(self, obj: Any) -> bool:
        x = self.memo.get(id(obj))
        if x is not None:
            self.write(self.get(x[0]))
        return x is not None

    def _save_global(self, cls: Global) -> None:
        if self._memoized(cls):
            return
        module, name = cls.where
        self.plain = self.plain and module in _WEIGHTS_ONLY_MODULES
        self.write(pickle.GLOBAL + module.encode() + b"\n" + name.encode() + b"\n")
        self.memoize(cls)

    def _save_opaque(self, obj: Opaque) -> None:
        if self._memoized(obj):
            return
        self.save(type(obj))
        self.save(obj.args)
        self.write(pickle.NEWOBJ if obj.newobj else pickle.REDUCE)
        self.memoize(obj)
        if obj.items:
            self.write(pickle.MARK)
            for item in obj.items:
                self.save(item)
            self.write(pickle.APPENDS)
        if obj.pairs:
            self.write(pickle.MARK)
            for k, v in obj.pairs:
                self.save(k)
                self.save(v)
            self.write(pickle.SETITEMS)
        if obj.state is not UNSET:
            self.save(obj.state)
            self.write(pickle.BUILD)
