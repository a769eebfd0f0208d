"""Reduce one tensor across checkpoints (the whole-tensor path), and the helpers both reducers share.

At any moment only one input tensor and one accumulator are alive, so memory does not grow with
the number of checkpoints.
"""

from __future__ import annotations

import cmath
import math
from collections.abc import Callable, Sequence

import torch

from ..errors import NonFiniteError
from ..layout import TensorSpec, accumulator_dtype, check_layout
from ..read.checkpoint import Checkpoint


def work_bytes(spec: TensorSpec, ckpts: Sequence[Checkpoint], rows: Sequence[Sequence[float]]) -> int:
    """Bytes read to reduce `spec` into every row: each checkpoint some row weighs once, or the ones copied."""
    if not spec.averaged:
        return sum(ckpts[i].tensors[spec.name].nbytes for i in sorted({_copied_from(w) for w in rows}))
    used = {k for w in rows for k, x in enumerate(w) if x != 0}
    return sum(ckpts[k].tensors[spec.name].nbytes for k in used)


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
    return reduce_rows(spec, ckpts, [weights], accum_dtype, on_read)[0]


def reduce_rows(
    spec: TensorSpec,
    ckpts: Sequence[Checkpoint],
    rows: Sequence[Sequence[float]],
    accum_dtype: torch.dtype = torch.float64,
    on_read: Callable[[int], None] | None = None,
) -> list[torch.Tensor]:
    """`reduce_tensor` for several rows of weights at once: each checkpoint's tensor is loaded once and added
    into every row that weighs it. Each row's result is the one `reduce_tensor` gives for it alone, bit for bit."""
    if not spec.averaged:
        sources = sorted({_copied_from(w) for w in rows})
        loaded = {}
        for i in sources:
            t = ckpts[i].tensors[spec.name]
            if on_read:
                on_read(t.nbytes)
            loaded[i] = t.load()
        return [loaded[_copied_from(w)] for w in rows]
    dtype = accumulator_dtype(spec.in_dtype, accum_dtype)
    numel = math.prod(spec.shape)
    accs = [torch.zeros(numel, dtype=dtype) for _ in rows]  # flat, as the streaming reducers' blocks
    divisors = [uniform_divisor(w) for w in rows]  # see batches.plan_batches: sum, then divide once
    firsts = [True] * len(rows)
    scratch = torch.empty(0, dtype=dtype)
    for k, ckpt in enumerate(ckpts):
        if all(w[k] == 0 for w in rows):
            continue
        lazy = ckpt.tensors[spec.name]
        data = lazy.load().reshape(-1)
        for r, (acc, w) in enumerate(zip(accs, rows, strict=True)):
            if w[k] == 0:
                continue
            if not firsts[r] and data.dtype != dtype and scratch.numel() == 0:
                scratch = torch.empty_like(acc)
            add_share(acc, data, firsts[r], 1.0 if divisors[r] else w[k], scratch)  # as the streaming path does
            firsts[r] = False
        if on_read:
            on_read(lazy.nbytes)
    for acc, divisor in zip(accs, divisors, strict=True):
        if divisor:
            acc.div_(divisor)
    return [acc.to(spec.out_dtype).reshape(spec.shape) for acc in accs]


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
        if spec.name in c.tensors and not bool(torch.isfinite(widen(c.tensors[spec.name].load())).all()):
            raise NonFiniteError(
                f"{c.path}: '{spec.name}' contains NaN or Inf; pass allow_nonfinite to average it anyway.",
                params=("allow_nonfinite",))
    raise NonFiniteError(
        f"'{spec.name}': the average overflows {spec.out_dtype}; choose a wider dtype.", params=("dtype",))


class CheckpointData:
    """Tensor data of the selected checkpoints for the plans that need it (`methods.base.TensorAccess`)."""

    def __init__(self, ckpts: Sequence[Checkpoint], specs: Sequence[TensorSpec],
                 on_progress: Callable[[str, int, int], None] | None = None) -> None:
        self._ckpts, self._specs, self._on_progress = ckpts, specs, on_progress

    @property
    def specs(self) -> Sequence[TensorSpec]:
        return self._specs

    def load(self, index: int, key: str) -> torch.Tensor:
        return self._ckpts[index].tensors[key].load()

    def progress(self, phase: str, done: int, total: int) -> None:
        if self._on_progress is not None:
            self._on_progress(phase, done, total)

    def average(self, members: Sequence[int]) -> dict[str, torch.Tensor]:
        """The uniform mean of some checkpoints, each tensor in its input dtype (what a soup evaluates)."""
        chosen = [self._ckpts[i] for i in members]
        weights = [1.0 / len(chosen)] * len(chosen)
        return {s.name: reduce_tensor(s, chosen, weights) for s in check_layout(chosen)}
