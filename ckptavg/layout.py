"""The shape of an average, shared by every stage: output tensor specs, the layout check, dtype tables, the sink.

A leaf module: it imports nothing of ckptavg but the errors, so every stage may import it.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from .errors import IncompatibleCheckpointsError, listing

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16,
    "U16": torch.uint16, "F16": torch.float16, "BF16": torch.bfloat16, "I32": torch.int32,
    "U32": torch.uint32, "F32": torch.float32, "F64": torch.float64, "I64": torch.int64,
    "U64": torch.uint64, "C64": torch.complex64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in SAFETENSORS_DTYPES.items()}


class TensorInfo(Protocol):
    """What the layout check needs of an input tensor: its shape and dtype (no data)."""

    @property
    def shape(self) -> tuple[int, ...]: ...

    @property
    def dtype(self) -> torch.dtype: ...


class HasTensors(Protocol):
    """What the layout check needs of a checkpoint: a name for messages and its tensors by key."""

    @property
    def name(self) -> str: ...

    @property
    def tensors(self) -> Mapping[str, TensorInfo]: ...


Sink = Callable[["TensorSpec", int, torch.Tensor], None]
"""Receives the output: (spec, first element, a block of the tensor in the output dtype)."""

ACCUM_DTYPES = {"float64": torch.float64, "float32": torch.float32}
OUT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class TensorSpec:
    """One output tensor: its name, shape, the input dtype and the dtype written."""

    name: str
    shape: tuple[int, ...]
    in_dtype: torch.dtype
    out_dtype: torch.dtype

    @property
    def averaged(self) -> bool:
        """Floating and complex tensors are averaged; the others are copied."""
        return self.in_dtype.is_floating_point or self.in_dtype.is_complex

    @property
    def nbytes(self) -> int:
        n = self.out_dtype.itemsize
        for s in self.shape:
            n *= s
        return n


def accumulator_dtype(in_dtype: torch.dtype, accum_dtype: torch.dtype) -> torch.dtype:
    """What an input of `in_dtype` is summed in: `accum_dtype`, complex128 for complex inputs, and never
    narrower than the input (float64 inputs are summed in float64 even with an `accum_dtype` of float32)."""
    if in_dtype.is_complex:
        return torch.complex128
    return in_dtype if in_dtype.is_floating_point and in_dtype.itemsize > accum_dtype.itemsize else accum_dtype


def _kind(dtype: torch.dtype) -> str:
    if dtype.is_complex:
        return "complex"
    if dtype.is_floating_point:
        return "floating"
    return "bool" if dtype == torch.bool else "integer"


def _fmt_shape(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(map(str, shape)) + ("," if len(shape) == 1 else "") + ")"


def check_layout(ckpts: Sequence[HasTensors], out_dtype: torch.dtype | None = None) -> list[TensorSpec]:
    """Return the output specs, or raise listing every way the checkpoints disagree.

    Keys and shapes must match, and so must dtype kinds. Floating dtypes that differ
    (fp16 in one, fp32 in another) are an error unless `out_dtype` says what to write.
    """
    ref = ckpts[0]
    problems: list[str] = []
    dtypes: list[str] = []  # floating tensors stored in another floating dtype: a choice, not a mismatch
    for other in ckpts[1:]:
        missing = [k for k in ref.tensors if k not in other.tensors]
        extra = [k for k in other.tensors if k not in ref.tensors]
        if (prefix := _prefix_only(missing, extra)) is not None:
            problems.append(f"{other.name}'s tensor names differ from {ref.name}'s only by the prefix '{prefix[1]}' "
                            f"({'added' if prefix[0] else 'missing'}); pass strip_prefix or add_prefix")
        else:
            problems += [f"{other.name}: lacks '{k}', which {ref.name} has" for k in missing]
            problems += [f"{other.name}: has '{k}', which {ref.name} lacks" for k in extra]
        for key, t in ref.tensors.items():
            o = other.tensors.get(key)
            if o is None:
                continue
            if o.shape != t.shape:
                problems.append(
                    f"{other.name}: '{key}' has shape {_fmt_shape(o.shape)} but {ref.name} has {_fmt_shape(t.shape)}"
                )
            elif _kind(o.dtype) != _kind(t.dtype):
                problems.append(
                    f"{other.name}: '{key}' is {_kind(o.dtype)} ({o.dtype}) but in {ref.name} it is "
                    f"{_kind(t.dtype)} ({t.dtype})"
                )
            elif o.dtype != t.dtype and not (out_dtype is not None and t.dtype.is_floating_point):
                found = f"{other.name}: '{key}' is {o.dtype} but {ref.name} has {t.dtype}"
                (dtypes if t.dtype.is_floating_point else problems).append(found)
    if problems:
        raise IncompatibleCheckpointsError(
            f"checkpoints do not match: {listing(problems + dtypes, 10, '; ')}. "
            "All checkpoints must come from the same architecture.",
            params=("strip_prefix", "add_prefix") if "pass strip_prefix" in " ".join(problems) else (),
        )
    if dtypes:
        raise IncompatibleCheckpointsError(
            f"checkpoints store floating tensors in different dtypes: {listing(dtypes, 5, '; ')}; "
            "pass dtype to choose the output dtype.", params=("dtype",)
        )
    return [
        TensorSpec(k, t.shape, t.dtype, out_dtype if (out_dtype is not None and t.dtype.is_floating_point) else t.dtype)
        for k, t in ref.tensors.items()
    ]


def _prefix_only(missing: list[str], extra: list[str]) -> tuple[bool, str] | None:
    """(True, P) when the other checkpoint's names are the reference's with P put before them, (False, P)
    when P is missing from them; None when the names differ otherwise."""
    if not missing or len(missing) != len(extra):
        return None
    for added, (short, long) in ((True, (missing, extra)), (False, (extra, missing))):
        for s in short:
            if long[0].endswith(s) and len(long[0]) > len(s):
                p = long[0][: len(long[0]) - len(s)]
                if {p + k for k in short} == set(long):
                    return added, p
                break
    return None


def byte_view(t: torch.Tensor) -> memoryview:
    """A writable view of a contiguous CPU tensor's bytes (without numpy, which ckptavg does not need)."""
    return memoryview((ctypes.c_char * t.nbytes).from_address(t.data_ptr())).cast("B")
