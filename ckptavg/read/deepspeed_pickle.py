"""DeepSpeed's checkpoint files unpickled without running code: its few classes become inert stand-ins.

`engine.save_checkpoint` writes torch zip archives. The model states files hold plain data; the ZeRO optimizer
files also pickle a loss scaler object, the ZeRO stage as an enum, `fragment_address` records and (ZeRO-3)
the flat fp32 partitions through `torch._tensor._rebuild_from_type_v2`. This unpickler answers exactly those
names, plus what a plain torch state dict needs (tensors become `LazyTensor`s, nothing of their data is read),
and refuses every other global before anything from the file runs. The checked accessors at the end read the
entries that the rebuild needs, refusing values of the wrong type as a corrupt file.
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import CheckpointFormatError, first_line
from .fastpickle import Extended, _Tensor
from .pickle_scan import scan
from .safe_pickle import Refused, refusal
from .torch_zip import check_torch_zip


class Record:
    """Stand-in for a DeepSpeed object (loss scaler, fragment address): unpickling only fills its attributes,
    with plain values; nothing of DeepSpeed's behaviour comes with it."""

    deepspeed_name = ""

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
            raise pickle.UnpicklingError(f"bad state for {self.deepspeed_name}")
        self.__dict__.update(state)


def _record(module: str, name: str) -> tuple[tuple[str, str], type[Record]]:
    return (module, name), type(name, (Record,), {"deepspeed_name": f"{module}.{name}"})


def _zero_stage(value: Any) -> int:
    """Replaces `ZeroStageEnum(value)`: the stage as a plain int (the enum is an int enum of 0..3)."""
    if type(value) is not int or not 0 <= value <= 3:
        raise pickle.UnpicklingError(f"bad ZeRO stage {value!r}")
    return value


def _size(dims: Any = ()) -> tuple[int, ...]:
    """Replaces `torch.Size(dims)` (param_shapes): a tuple of counts."""
    if not isinstance(dims, tuple | list) or not all(type(d) is int and d >= 0 for d in dims):
        raise pickle.UnpicklingError("bad torch.Size")
    return tuple(dims)


class _PlainTensorType:
    """Stands for `torch.Tensor` as the type argument of `_rebuild_from_type_v2`; nothing else accepts it."""


def _from_type(func: Any, new_type: Any, args: Any, state: Any) -> _Tensor:
    """Replaces `torch._tensor._rebuild_from_type_v2` for plain tensors: ZeRO-3 pickles its flat partitions
    this way because DeepSpeed sets attributes on them (`ds_id`); the attributes are dropped."""
    if new_type is not _PlainTensorType or not callable(func) or not isinstance(args, tuple):
        raise pickle.UnpicklingError("tensor subclass")
    if state is not None and not (isinstance(state, dict) and all(isinstance(k, str) for k in state)):
        raise pickle.UnpicklingError("tensor state")
    tensor = func(*args)
    if not isinstance(tensor, _Tensor):
        raise pickle.UnpicklingError("tensor rebuild")
    return tensor


_LOSS = "deepspeed.runtime.fp16.loss_scaler"
ALLOWED: dict[tuple[str, str], Any] = dict([
    _record(_LOSS, "LossScaler"),
    _record(_LOSS, "DynamicLossScaler"),
    _record("deepspeed.utils.tensor_fragment", "fragment_address"),
])
ALLOWED.update({
    ("deepspeed.runtime.zero.config", "ZeroStageEnum"): _zero_stage,
    ("torch", "Size"): _size,
    ("torch", "Tensor"): _PlainTensorType,
    ("torch._tensor", "_rebuild_from_type_v2"): _from_type,
})


class _Unpickler(Extended):
    """The lazy tensor unpickler with DeepSpeed's names (`ALLOWED`) added."""

    allowed = ALLOWED


def unwrap(obj: Any) -> Any:
    """`obj` with each tensor stand-in replaced by its LazyTensor, through dicts, lists and tuples."""
    if isinstance(obj, _Tensor):
        return obj.lazy
    if isinstance(obj, dict):
        return type(obj)((k, unwrap(v)) for k, v in obj.items())
    if type(obj) in (list, tuple):
        return type(obj)(unwrap(v) for v in obj)
    return obj


def load_deepspeed_file(path: Path, optimizer: bool, trust_pickle: bool = False) -> Any:
    """Unpickle one DeepSpeed model states (`optimizer` False) or optimizer states file, tensors lazy.

    A refused class in an optimizer file is reported as training state: the file holds the fp32 master
    partitions beside the Adam moments, never a model to load, so `--trust-pickle` is not the way out.
    """
    archive = check_torch_zip(path)
    try:
        if not trust_pickle:
            scan(archive.pickled, 0)  # memo and size bombs are refused before the C unpickler allocates for them
        obj = _Unpickler(io.BytesIO(archive.pickled), path, archive.prefix, archive.records, trust_pickle).load()
        return unwrap(obj)
    except Refused as e:
        if optimizer:
            raise CheckpointFormatError(
                f"{path}: DeepSpeed ZeRO optimizer state (training state, not weights) pickles '{e}', which is not "
                "one of the DeepSpeed classes ckptavg reads without running code; rebuild the tag's weights with "
                "DeepSpeed's zero_to_fp32.py and average its output instead."
            ) from None
        raise refusal(path, str(e), "DeepSpeed model states need only torch's and DeepSpeed's own classes; ") from None
    except KeyError as e:
        raise CheckpointFormatError(f"{path}: the pickle references tensor data {e} that the archive does not hold; "
                                    "the file is corrupt, re-copy the checkpoint.") from None
    except Exception as e:  # noqa: BLE001 - a corrupt pickle raises almost any type
        raise CheckpointFormatError(
            f"{path}: unreadable DeepSpeed checkpoint file ({type(e).__name__}: {first_line(e)[:200]}); "
            "the file may be truncated or corrupt, re-copy the checkpoint."
        ) from None


# ---------------------------------------------------------------- checked entries of the unpickled dicts


def mapping(path: Path, obj: Any) -> dict[Any, Any]:
    """`obj`, which must be a dict (what DeepSpeed writes at the top of its files)."""
    if not isinstance(obj, dict):
        raise CheckpointFormatError(f"{path}: holds a {type(obj).__name__} where DeepSpeed writes a dict; not a "
                                    "DeepSpeed checkpoint file, or a corrupt one.")
    return obj


def shape_groups(path: Path, states: Mapping[Any, Any]) -> list[dict[str, tuple[int, ...]]]:
    """`param_shapes`: per param group, each trainable param's name and shape, in the order of the partitions."""
    groups = states.get("param_shapes") or []
    groups = [groups] if isinstance(groups, dict) else groups
    if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
        raise CheckpointFormatError(f"{path}: bad 'param_shapes' in the DeepSpeed model states; the file is corrupt.")
    return [{str(k): shape(path, k, v) for k, v in g.items()} for g in groups]


def shape(path: Path, name: Any, value: Any) -> tuple[int, ...]:
    """A shape of `param_shapes` or `frozen_param_shapes`: a tuple of counts."""
    if not isinstance(value, tuple | list) or not all(type(d) is int and d >= 0 for d in value):
        raise CheckpointFormatError(f"{path}: bad shape for '{name}' in the DeepSpeed model states; the file is corrupt.")
    return tuple(value)


def entry(path: Path, states: Any, key: str) -> dict[Any, Any]:
    """A dict entry of a DeepSpeed file; absent or None is empty."""
    value = states.get(key) if isinstance(states, dict) else None
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise CheckpointFormatError(f"{path}: bad '{key}' in the DeepSpeed checkpoint; the file is corrupt.")
    return value


def paddings(path: Path, value: Any) -> list[list[int]] | None:
    """ZeRO-1/2's `param_alignment_paddings`: per group, the padding after each param (older DeepSpeed versions write none)."""
    if value is None:
        return None
    if not isinstance(value, list) or not all(
        isinstance(g, list) and all(type(n) is int and n >= 0 for n in g) for g in value
    ):
        raise CheckpointFormatError(f"{path}: bad param_alignment_paddings; the file is corrupt.")
    return value
