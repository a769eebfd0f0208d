"""A DCP folder's `.metadata` pickle, read without running code: DCP's own classes become inert records."""

from __future__ import annotations

import io
import pickle
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import torch

from ..errors import CheckpointFormatError, first_line
from .pickle_scan import scan
from .safe_pickle import Refused, refusal


class _Record:
    """Stand-in for one of DCP's metadata dataclasses: unpickling only fills its attributes."""

    dcp_name = ""

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
            raise pickle.UnpicklingError(f"bad state for {self.dcp_name}")
        self.__dict__.update(state)


def _record(name: str) -> type[_Record]:
    return type(name, (_Record,), {"dcp_name": name})


class _TensorProperties(_Record):
    """TensorProperties pickles its fields as a tuple, dtype first (its own __getstate__)."""

    dcp_name = "TensorProperties"

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) >= 2:
            state = {"dtype": state[0], "layout": state[1]}
        super().__setstate__(state)


def _layout(name: Any) -> str:
    """Replaces torch.serialization._get_layout: only the name is needed (to refuse sparse tensors)."""
    if not isinstance(name, str):
        raise pickle.UnpicklingError("bad layout")
    return name


def _enum_value(value: Any) -> Any:
    """Replaces TensorProperties' memory-format enum, which is deprecated and unused here."""
    return value


def _write_item_type(value: Any) -> int:
    """Replaces `WriteItemType(value)` (TENSOR, SHARD, BYTE_IO are 1, 2, 3): the value as a plain int."""
    if type(value) is not int or not 1 <= value <= 3:
        raise pickle.UnpicklingError("bad WriteItemType")
    return value


_DCP = "torch.distributed.checkpoint.metadata"
_OLD_DCP = "torch.distributed._shard.sharded_tensor.metadata"  # TensorProperties' home before torch 2.1
_PLANNER = "torch.distributed.checkpoint.planner"
_MCORE = "megatron.core.dist_checkpointing.strategies.torch"
_ALLOWED: dict[tuple[str, str], Any] = {
    **{(_DCP, n): _record(n) for n in (
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
        "MetadataIndex", "StorageMeta",
    )},
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"): _record("_StorageInfo"),
    # The writers' save plans: Megatron's torch_dist keeps every rank's plan in `Metadata.all_local_plans`, to
    # check that the next save may reuse it. Read as records, never used.
    **{(_PLANNER, n): _record(n) for n in ("SavePlan", "WriteItem", "TensorWriteData", "BytesIOWriteData")},
    (_PLANNER, "WriteItemType"): _write_item_type,
    ("torch.distributed.checkpoint.filesystem", "_StoragePrefix"): _record("_StoragePrefix"),
    # Megatron-core before 0.15 pickled its own subclasses of Metadata and SavePlan (0.16 keeps empty classes
    # of these names so that such files still load).
    **{(_MCORE, n): _record(n) for n in ("MCoreMetadata", "MCoreSavePlan")},
    (_DCP, "TensorProperties"): _TensorProperties,
    (_OLD_DCP, "TensorProperties"): _TensorProperties,
    (_DCP, "_MEM_FORMAT_ENCODING"): _enum_value,
    (_OLD_DCP, "MEM_FORMAT_ENCODING"): _enum_value,
    ("torch", "Size"): torch.Size,
    ("torch.serialization", "_get_layout"): _layout,
    # StorageMeta.checkpoint_id: pure paths never touch the file system
    ("pathlib", "PosixPath"): PurePosixPath,
    ("pathlib", "PurePosixPath"): PurePosixPath,
    ("pathlib", "WindowsPath"): PureWindowsPath,
    ("pathlib", "PureWindowsPath"): PureWindowsPath,
}
_DTYPES = {name: v for name, v in vars(torch).items() if isinstance(v, torch.dtype)}


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        found = _ALLOWED.get((module, name))
        if found is None and module == "torch":
            found = _DTYPES.get(name)
        if found is None:
            raise Refused(f"{module}.{name}")
        return found


def read_metadata(path: Path, trust_pickle: bool = False) -> Any:
    """Unpickle a DCP `.metadata` file, allowing only DCP's metadata classes unless `trust_pickle`."""
    try:
        data = path.read_bytes()
        if data[:1] == b"{":
            raise CheckpointFormatError(
                f"{path}: JSON metadata of HuggingFaceStorageWriter, not a .distcp checkpoint; "
                "pass its .safetensors files as inputs instead."
            )
        scan(data)  # sizes and memo indices the C unpickler may trust (see pickle_scan)
        f = io.BytesIO(data)
        return pickle.load(f) if trust_pickle else _SafeUnpickler(f).load()
    except Refused as e:
        raise refusal(path, str(e), "DCP metadata needs only DCP's and Megatron's own classes; ") from None
    except CheckpointFormatError:
        raise
    except OSError as e:
        raise CheckpointFormatError(f"{path}: cannot read ({e.strerror}).") from None
    except Exception as e:  # noqa: BLE001 - a corrupt pickle raises almost any type
        raise corrupt(path, f"{type(e).__name__}: {first_line(e)[:200]}") from None


def corrupt(path: Path, why: str) -> CheckpointFormatError:
    return CheckpointFormatError(f"{path}: corrupt DCP metadata ({why}); re-copy the checkpoint or save it again.")
