"""Check that checkpoints share one layout, then reduce them one tensor name at a time.

At any moment only one input tensor and one accumulator are alive, so memory does not grow with
the number of checkpoints.
"""

from __future__ import annotations

import cmath
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .errors import IncompatibleCheckpointsError, NonFiniteError, listing
from .sources import Checkpoint

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


def check_layout(ckpts: Sequence[Checkpoint], out_dtype: torch.dtype | None = None) -> list[TensorSpec]:
    """Return the output specs, or raise listing every way the checkpoints disagree.

    Keys and shapes must match, and so must dtype kinds. Floating dtypes that differ
    (fp16 in one, fp32 in another) are an error unless `out_dtype` says what to write.
    """
    ref = ckpts[0]
    problems: list[str] = []
    for other in ckpts[1:]:
        missing = [k for k in ref.tensors if k not in other.tensors]
        extra = [k for k in other.tensors if k not in ref.tensors]
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
                problems.append(
                    f"{other.name}: '{key}' is {o.dtype} but {ref.name} has {t.dtype} (pass --dtype to choose)"
                )
    if problems:
        raise IncompatibleCheckpointsError(
            f"checkpoints do not match: {listing(problems, 10, '; ')}. "
            "All checkpoints must come from the same architecture."
        )
    return [
        TensorSpec(k, t.shape, t.dtype, out_dtype if (out_dtype is not None and t.dtype.is_floating_point) else t.dtype)
        for k, t in ref.tensors.items()
    ]


def work_bytes(spec: TensorSpec, ckpts: Sequence[Checkpoint], weights: Sequence[float]) -> int:
    """Bytes read to reduce `spec`: every checkpoint with a non-zero weight, or the one copied."""
    if not spec.averaged:
        return ckpts[_copied_from(weights)].tensors[spec.name].nbytes
    return sum(c.tensors[spec.name].nbytes for c, w in zip(ckpts, weights, strict=True) if w != 0)


def _copied_from(weights: Sequence[float]) -> int:
    """Non-floating tensors come from the newest checkpoint with a non-zero weight."""
    return max((i for i, w in enumerate(weights) if w != 0), default=len(weights) - 1)


def reduce_tensor(
    spec: TensorSpec,
    ckpts: Sequence[Checkpoint],
    weights: Sequence[float],
    accum_dtype: torch.dtype = torch.float64,
    on_read: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Weighted sum of one tensor across checkpoints, rounded once to the output dtype.

    Non-floating tensors (e.g. ``num_batches_tracked``) are copied from the newest checkpoint
    with a non-zero weight.
    """
    if not spec.averaged:
        t = ckpts[_copied_from(weights)].tensors[spec.name]
        if on_read:
            on_read(t.nbytes)
        return t.load()
    dtype = accumulator_dtype(spec.in_dtype, accum_dtype)
    acc = torch.zeros(math.prod(spec.shape), dtype=dtype)  # flat, as the streaming reducers' blocks
    divisor = uniform_divisor(weights)  # see readahead.plan_batches: sum, then divide once
    scratch = torch.empty(0, dtype=dtype)
    first = True
    for ckpt, w in zip(ckpts, weights, strict=True):
        if w == 0:
            continue
        lazy = ckpt.tensors[spec.name]
        data = lazy.load().reshape(-1)
        if not first and data.dtype != dtype and scratch.numel() == 0:
            scratch = torch.empty_like(acc)
        add_share(acc, data, first, 1.0 if divisor else w, scratch)  # the same operations as the streaming path
        first = False
        if on_read:
            on_read(lazy.nbytes)
    if divisor:
        acc.div_(divisor)
    return acc.to(spec.out_dtype).reshape(spec.shape)


def uniform_divisor(weights: Sequence[float]) -> int:
    """k when the non-zero weights are k equal values 1/k (an SWA), else 0."""
    used = [w for w in weights if w != 0]
    k = len(used)
    return k if k and all(w == used[0] for w in used) and abs(used[0] * k - 1) < 1e-12 else 0


def add_share(acc: torch.Tensor, data: torch.Tensor, first: bool, weight: float, scratch: torch.Tensor) -> None:
    """acc = data * weight for a batch's first share, acc += data * weight for the others, in acc's dtype.

    The first share is copied rather than added to zeros: one pass over the block instead of two, and the
    same sums, in the same order, as `reduce_tensor`. A share of a narrower dtype is widened into
    `scratch` (at least as long as acc) first: an add_ that mixes dtypes allocates a temporary per call
    (and on the CPU glibc then kept ~16 MiB of freed temporaries resident, bench/RESULTS.md).
    """
    data = widen(data)
    if first:
        acc.copy_(data)
        if weight != 1.0:
            acc.mul_(weight)
        return
    if data.dtype != acc.dtype:
        data = scratch[: acc.numel()].copy_(data)
    if weight == 1.0:
        acc.add_(data)
    else:
        acc.add_(data, alpha=weight)


def widen(t: torch.Tensor) -> torch.Tensor:
    """torch does not promote float8 in add_ or implement isfinite/sum for it; widen it (exactly) to float32."""
    return t.float() if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) else t


def _all_finite(block: torch.Tensor) -> bool:
    """Whether every element is finite. A plain sum is ~50x faster than isfinite().all() and is finite
    whenever the elements are; only when it is not (a NaN/Inf, or a sum that overflowed) is it confirmed
    element by element."""
    block = widen(block)
    return cmath.isfinite(block.sum().item()) or bool(torch.isfinite(block).all())


def check_finite(spec: TensorSpec, result: torch.Tensor, ckpts: Sequence[Checkpoint]) -> None:
    """Raise naming the input file that holds a NaN/Inf of `spec`, or the overflow, if `result` is not finite."""
    if _all_finite(result):
        return
    for c in ckpts:  # find the culprit; this costs a second read of one tensor, only on failure
        if not bool(torch.isfinite(widen(c.tensors[spec.name].load())).all()):
            raise NonFiniteError(
                f"{c.path}: '{spec.name}' contains NaN or Inf; pass --allow-nonfinite to average it anyway."
            )
    raise NonFiniteError(
        f"'{spec.name}': the average overflows {spec.out_dtype}; choose a wider --dtype."
    )
