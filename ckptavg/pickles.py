"""Torch pickles: unpickle safely (weights_only), onto the meta device for zip archives, so that
only the structure is read and each tensor becomes a LazyTensor pointing at its bytes in the file."""

from __future__ import annotations

import argparse
import pickle
import re
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointFormatError, CkptavgWarning
from .formats import LazyTensor


class _AttributeDict(dict):  # type: ignore[type-arg]
    """Stand-in for Lightning's AttributeDict (a plain dict subclass) so safe loading accepts it."""


# Plain data containers seen in real training checkpoints; none can run code when rebuilt.
_SAFE_EXTRAS: list[Any] = [
    argparse.Namespace,
    (_AttributeDict, "lightning.fabric.utilities.data.AttributeDict"),
    (_AttributeDict, "pytorch_lightning.utilities.parsing.AttributeDict"),
    (_AttributeDict, "lightning_fabric.utilities.data.AttributeDict"),
]


def load_torch(path: Path, fmt: str, trust_pickle: bool) -> Any:
    """Unpickle a torch checkpoint; zip archives come back with lazy tensors (no data read)."""
    if fmt == "torch-zip":
        _check_torch_zip(path)
    lazy = fmt == "torch-zip"
    try:
        # An open file, not a path: torch.load hands paths ending in .safetensors to safetensors.
        with open(path, "rb") as f, warnings.catch_warnings(), torch.serialization.safe_globals(_SAFE_EXTRAS):
            warnings.simplefilter("ignore")
            obj = torch.load(f, map_location="meta" if lazy else "cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as e:
        m = re.search(r"GLOBAL ([\w.]+)", str(e))
        if m and not trust_pickle:
            raise CheckpointFormatError(
                f"{path}: safe loading refused to unpickle '{m.group(1)}' (it could run code). "
                "If you trust this file, pass --trust-pickle."
            ) from None
        raise CheckpointFormatError(f"{path}: cannot unpickle ({_first_line(e)}).") from None
    except (ImportError, AttributeError) as e:
        raise CheckpointFormatError(
            f"{path}: unpickling needs code that is not importable here ({_first_line(e)})."
        ) from None
    except CheckpointFormatError:
        raise
    except Exception as e:  # noqa: BLE001 - torch's loaders raise many types on corrupt bytes
        raise CheckpointFormatError(
            f"{path}: unreadable torch checkpoint ({type(e).__name__}: {_first_line(e)}); the file may be truncated."
        ) from None
    if not lazy:
        warnings.warn(
            "legacy (non-zip) torch files are read whole into memory instead of streamed; "
            "re-save them with a current torch.save to stream them.",
            CkptavgWarning,
            stacklevel=2,
        )
    return _lazify(path, obj, _lazy_from_meta if lazy else _eager)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def _check_torch_zip(path: Path) -> None:
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
            if any(n.endswith("/constants.pkl") for n in names):
                raise CheckpointFormatError(
                    f"{path}: this is a TorchScript archive; save the model's state_dict() instead."
                )
            if not any(n.endswith("/data.pkl") for n in names):
                raise CheckpointFormatError(f"{path}: zip file without data.pkl, not a torch checkpoint.")
            order = [n for n in names if n.endswith("/byteorder")]
            if order and z.read(order[0]).strip() != b"little":
                raise CheckpointFormatError(
                    f"{path}: big-endian torch checkpoints are not supported; re-save on a little-endian machine."
                )
    except (zipfile.BadZipFile, OSError) as e:
        raise CheckpointFormatError(f"{path}: broken zip archive ({e}); the file may be truncated.") from None


def _lazify(path: Path, obj: Any, wrap: Callable[[Path, torch.Tensor], LazyTensor]) -> Any:
    """Replace every tensor in an unpickled checkpoint by a LazyTensor made by `wrap`."""
    if isinstance(obj, torch.Tensor):
        return wrap(path, obj)
    if isinstance(obj, dict):  # dict, OrderedDict and dict subclasses rebuild from pairs
        return type(obj)((k, _lazify(path, v, wrap)) for k, v in obj.items())
    if isinstance(obj, list | tuple) and not hasattr(obj, "_fields"):
        return type(obj)(_lazify(path, v, wrap) for v in obj)
    return obj


def _eager(path: Path, t: torch.Tensor) -> LazyTensor:
    if t.layout != torch.strided or t.is_quantized:
        raise CheckpointFormatError(f"{path}: sparse or quantized tensors are not supported.")
    return LazyTensor(path, t.dtype, tuple(t.shape), eager=t.detach())


def _lazy_from_meta(path: Path, t: torch.Tensor) -> LazyTensor:
    if t.layout != torch.strided or t.is_quantized:
        raise CheckpointFormatError(f"{path}: sparse or quantized tensors are not supported.")
    storage_at = getattr(t.untyped_storage(), "_checkpoint_offset", None)
    if storage_at is None:
        raise CheckpointFormatError(f"{path}: cannot locate tensor data in the archive.")
    item = t.dtype.itemsize
    start = storage_at + t.storage_offset() * item
    shape = tuple(t.shape)
    if t.is_contiguous() or t.numel() <= 1:
        return LazyTensor(path, t.dtype, shape, start)
    last = sum((s - 1) * st for s, st in zip(shape, t.stride(), strict=True) if s > 0)
    return LazyTensor(path, t.dtype, shape, start, stride=tuple(t.stride()), span=(last + 1) * item)
