"""Averaging LoRA adapters (docs/ALGORITHMS.md §13): the mean update ``s Σ w_k B_k A_k`` stored as an adapter.

Three ways to store it: ``factors`` (mean A, mean B: approximate), ``concat`` (exact, rank N·r) and ``svd`` (the
best rank-r approximation, from the stacked factors: no out × in matrix is ever formed). Pure functions on CPU
tensors; everything is computed and returned in float64, and the caller rounds to the output dtype.
"""

from __future__ import annotations

import copy
import math
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch

from ..errors import CheckpointFormatError, IncompatibleCheckpointsError, PlanError, listing

Mode = Literal["svd", "concat", "factors", "merge"]
MODES: tuple[Mode, ...] = ("svd", "concat", "factors", "merge")

# Saved files drop the adapter name (`q.lora_A.weight`, `emb.lora_embedding_A`); live state dicts keep it
# (`q.lora_A.default.weight`, `emb.lora_embedding_A.default`). Conv layers use the lora_A/lora_B form too.
_LINEAR = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")
_EMBEDDING = re.compile(r"^(?P<module>.+)\.lora_embedding_(?P<ab>[AB])(?:\.(?P<adapter>[^.]+))?$")


def _split(names: Iterable[str]) -> tuple[dict[str, tuple[str, str]], list[str]]:
    found: dict[str, dict[str, str]] = {}
    plain: list[str] = []
    for name in names:
        m = _LINEAR.match(name) or _EMBEDDING.match(name)
        if m is None:
            plain.append(name)
            continue
        layer = m["module"] if m["adapter"] is None else f"{m['module']}[{m['adapter']}]"
        slot = found.setdefault(layer, {})
        # "eA" for lora_embedding_A: a layer has one kind of factors, never both
        ab = ("e" if m.re is _EMBEDDING else "") + m["ab"]
        if ab in slot or any(k.startswith("e") != ab.startswith("e") for k in slot):
            raise CheckpointFormatError(f"{next(iter(slot.values()))} and {name} clash: two factors of the same layer {layer}.")
        slot[ab] = name
    pairs: dict[str, tuple[str, str]] = {}
    lone: list[str] = []
    for layer, slot in found.items():
        if len(slot) == 2:
            a_key, b_key = (slot[k] for k in sorted(slot))
            pairs[layer] = (a_key, b_key)
        else:
            lone.extend(slot.values())
    if lone:
        raise CheckpointFormatError(f"LoRA factors without their other half: {listing(sorted(lone), 3)}.")
    return pairs, plain


def lora_pairs(names: Iterable[str]) -> dict[str, tuple[str, str]]:
    """Group PEFT adapter keys into layers (docs/ALGORITHMS.md §13): layer name -> (A key, B key).

    Recognised: ``<module>.lora_A.weight`` / ``lora_B.weight`` (linear and conv layers), the same with an adapter
    name (``lora_A.<adapter>.weight``, as in a live state dict), and ``<module>.lora_embedding_A`` / ``_B``
    (embeddings, with or without ``.<adapter>``). The layer name is the module path, with ``[adapter]`` appended
    when the key holds one. Every other key (``modules_to_save`` copies, ``lora_B.bias``, DoRA's magnitude
    vectors) is a plain tensor: see `plain_keys`.

    Raises:
        CheckpointFormatError: A factor without its other half, or two keys for the same factor.
    """
    return _split(names)[0]


def plain_keys(names: Iterable[str]) -> list[str]:
    """The keys of an adapter that `lora_pairs` leaves out, in their order: tensors averaged as usual."""
    return _split(names)[1]


def scale(r: int, lora_alpha: float, rslora: bool = False) -> float:
    """PEFT's scale of the update ``s·B·A`` (docs/ALGORITHMS.md §13): ``lora_alpha / r``, or ``/ √r`` with rslora."""
    if r < 1:
        raise PlanError(f"a LoRA rank must be >= 1, not {r}.")
    return lora_alpha / math.sqrt(r) if rslora else lora_alpha / r


def alpha_for(new_r: int, r: int, lora_alpha: float, rslora: bool = False) -> float:
    """The lora_alpha that gives rank `new_r` the scale that (r, lora_alpha) had (docs/ALGORITHMS.md §13)."""
    if new_r < 1:
        raise PlanError(f"a LoRA rank must be >= 1, not {new_r}.")
    return lora_alpha * math.sqrt(new_r / r) if rslora else lora_alpha * new_r / r


def concat_alpha(r: int, n: int, lora_alpha: float, rslora: bool = False) -> tuple[int, float]:
    """``(N·r, lora_alpha')`` for `concat` of `n` adapters, the scale unchanged (docs/ALGORITHMS.md §13):
    ``lora_alpha' = N·lora_alpha``, or ``√N·lora_alpha`` with rslora."""
    if n < 1:
        raise PlanError(f"concat needs at least one adapter, not {n}.")
    scale(r, lora_alpha, rslora)
    return n * r, alpha_for(n * r, r, lora_alpha, rslora)


def _flat(As: Sequence[torch.Tensor], Bs: Sequence[torch.Tensor], weights: Sequence[float]) \
        -> tuple[list[torch.Tensor], list[torch.Tensor], list[float]]:
    """A as r × in and B as out × r in float64 (conv factors flattened), shapes checked."""
    if not (len(As) == len(Bs) == len(weights)) or not As:
        raise PlanError(f"LoRA averaging needs as many A, B and weights, at least one: {len(As)}, {len(Bs)}, {len(weights)}.")
    a0, b0 = As[0].shape, Bs[0].shape
    for a, b in zip(As, Bs, strict=True):
        if a.shape != a0 or b.shape != b0:
            raise IncompatibleCheckpointsError(f"LoRA factor shapes differ: A {tuple(a.shape)} vs {tuple(a0)}, "
                                               f"B {tuple(b.shape)} vs {tuple(b0)}.")
    r = a0[0] if a0 else 0
    if len(a0) < 2 or len(b0) < 2 or b0[1] != r or math.prod(b0[2:]) != 1:
        raise IncompatibleCheckpointsError(f"not a LoRA pair: A {tuple(a0)} (r × in) and B {tuple(b0)} (out × r).")
    return ([a.reshape(r, -1).to(torch.float64) for a in As], [b.reshape(b0[0], r).to(torch.float64) for b in Bs],
            [float(w) for w in weights])


def _shaped(a: torch.Tensor, b: torch.Tensor, a_like: torch.Tensor, b_like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat factors of rank k back in the inputs' layout (conv kernels): (k, *in) and (out, k, 1, ...)."""
    k = a.shape[0]
    return a.reshape(k, *a_like.shape[1:]), b.reshape(b_like.shape[0], k, *b_like.shape[2:])


def _lowrank_norm(x: torch.Tensor, y: torch.Tensor) -> float:
    """``‖x yᵀ‖_F`` through the QR factors of x (out × m) and y (in × m): only m × m products."""
    rx = torch.linalg.qr(x, mode="r")[1]
    ry = torch.linalg.qr(y, mode="r")[1]
    return float(torch.linalg.matrix_norm(rx @ ry.T))


def delta(A: torch.Tensor, B: torch.Tensor, s: float = 1.0) -> torch.Tensor:
    """The dense update ``s·B·A`` (out × in, conv kernels flattened) in float64, for tests and checks
    (docs/ALGORITHMS.md §13). Embedding updates are this transposed, as PEFT applies them."""
    a, b, _ = _flat([A], [B], [1.0])
    return s * (b[0] @ a[0])


def average_factors(As: Sequence[torch.Tensor], Bs: Sequence[torch.Tensor], weights: Sequence[float]) \
        -> tuple[torch.Tensor, torch.Tensor]:
    """``(Σ w_k A_k, Σ w_k B_k)`` in float64: approximate, exact for identical adapters when Σ w = 1
    (docs/ALGORITHMS.md §13). Weights are applied as given, never as √w (peft's pitfall)."""
    _flat(As, Bs, weights)
    a = sum((w * x.to(torch.float64) for w, x in zip(weights, As, strict=True)), torch.zeros(As[0].shape, dtype=torch.float64))
    b = sum((w * x.to(torch.float64) for w, x in zip(weights, Bs, strict=True)), torch.zeros(Bs[0].shape, dtype=torch.float64))
    return a, b


def factors_error(As: Sequence[torch.Tensor], Bs: Sequence[torch.Tensor], weights: Sequence[float]) -> float:
    """``‖M − B̄Ā‖_F / ‖M‖_F`` with ``M = Σ w_k B_k A_k``, without out × in matrices (docs/ALGORITHMS.md §13).

    With ``c = Σ w``, ``A'_k = A_k − Ā`` and ``B'_k = B_k − B̄``: ``M − B̄Ā = Σ w_k B'_k A'_k + (1 − c) B̄Ā``, a
    product of (N+1)·r-wide stacks whose norm comes from their QR factors. Centring first makes identical adapters
    give 0 and keeps the error accurate when it is tiny. 0 when M = 0.
    """
    a, b, w = _flat(As, Bs, weights)
    a_bar = sum((wk * x for wk, x in zip(w, a, strict=True)), torch.zeros_like(a[0]))
    b_bar = sum((wk * x for wk, x in zip(w, b, strict=True)), torch.zeros_like(b[0]))
    x = torch.cat([wk * (bk - b_bar) for wk, bk in zip(w, b, strict=True)] + [(1.0 - sum(w)) * b_bar], dim=1)
    y = torch.cat([(ak - a_bar).T for ak in a] + [a_bar.T], dim=1)
    total = _lowrank_norm(torch.cat([wk * bk for wk, bk in zip(w, b, strict=True)], dim=1), torch.cat([ak.T for ak in a], dim=1))
    return _lowrank_norm(x, y) / total if total > 0 else 0.0


def average_concat(As: Sequence[torch.Tensor], Bs: Sequence[torch.Tensor], weights: Sequence[float]) \
        -> tuple[torch.Tensor, torch.Tensor]:
    """Exact: ``A = [A_1; …; A_N]`` (N·r × in), ``B = [w_1 B_1 | … | w_N B_N]`` (out × N·r), float64
    (docs/ALGORITHMS.md §13). Store with `concat_alpha` so that the scale is unchanged."""
    _flat(As, Bs, weights)
    a = torch.cat([x.to(torch.float64) for x in As], dim=0)
    b = torch.cat([w * x.to(torch.float64) for w, x in zip(weights, Bs, strict=True)], dim=1)
    return a, b


def average_svd(As: Sequence[torch.Tensor], Bs: Sequence[torch.Tensor], weights: Sequence[float], rank: int) \
        -> tuple[torch.Tensor, torch.Tensor, float]:
    """The best rank-`rank` approximation M_r of ``M = Σ w_k B_k A_k`` (Eckart–Young; docs/ALGORITHMS.md §13).

    ``M = P Qᵀ`` with P = [w_1 B_1 | … ] (out × Nr) and Q = [A_1ᵀ | … ] (in × Nr); with P = Q_p R_p and
    Q = Q_q R_q, the SVD ``R_p R_qᵀ = U Σ Vᵀ`` of the small core gives M's: ``(Q_p U) Σ (Q_q V)ᵀ``. Cost
    O((out + in)(Nr)² + (Nr)³); no out × in matrix is formed.

    Returns:
        ``A = Σ_r^{1/2} V_rᵀ`` (rank × in), ``B = U_r Σ_r^{1/2}`` (out × rank), zero-padded when M has fewer
        than `rank` singular values, and ``‖M − M_r‖_F / ‖M‖_F`` (0 when M = 0).
    """
    if rank < 1:
        raise PlanError(f"lora.rank must be >= 1, not {rank}.", params=("lora.rank",))
    a, b, w = _flat(As, Bs, weights)
    p = torch.cat([wk * bk for wk, bk in zip(w, b, strict=True)], dim=1)
    q = torch.cat([ak.T for ak in a], dim=1)
    qp, rp = torch.linalg.qr(p)
    qq, rq = torch.linalg.qr(q)
    u, sv, vh = torch.linalg.svd(rp @ rq.T, full_matrices=False)
    k = min(rank, sv.numel())
    root = sv[:k].sqrt()
    b_out = torch.zeros(p.shape[0], rank, dtype=torch.float64)
    a_out = torch.zeros(rank, q.shape[0], dtype=torch.float64)
    b_out[:, :k] = (qp @ u[:, :k]) * root
    a_out[:k] = root[:, None] * (vh[:k] @ qq.T)
    # the tail's own norm, not a difference of norms: accurate when the error is tiny
    total = float(torch.linalg.vector_norm(sv))
    error = float(torch.linalg.vector_norm(sv[k:])) / total if total > 0 else 0.0
    a_shaped, b_shaped = _shaped(a_out, b_out, As[0], Bs[0])
    return a_shaped, b_shaped, error


class LoraLayer(NamedTuple):
    """One averaged layer: the stored factors (float64) and the relative Frobenius error of their update."""

    A: torch.Tensor
    B: torch.Tensor
    error: float


@dataclass(frozen=True)
class LoraAverage:
    """How to store the average of LoRA adapters (docs/ALGORITHMS.md §13), checked when built.

    Args:
        mode: ``svd`` (best rank-r approximation), ``concat`` (exact, rank N·r), ``factors`` (mean A and mean B),
            or ``merge``: full weights, the base's with the exact mean update added (methods/lora_merge.py).
        rank: svd only: the output rank; None keeps each layer's input rank.
        base: merge only: the base model (a Hugging Face folder or a weights file) the adapters apply to.

    Raises:
        PlanError: An unknown mode, a rank below 1, or a rank with another mode than svd; merge without a base,
            or a base with another mode.
    """

    mode: Mode = "svd"
    rank: int | None = None
    base: str | os.PathLike[str] | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise PlanError(f"lora must be one of {', '.join(MODES)}, not {self.mode!r}.", params=("lora",))
        if self.rank is not None:
            if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
                raise PlanError(f"lora.rank must be an integer >= 1, not {self.rank!r}.", params=("lora.rank",))
            if self.mode != "svd":
                raise PlanError(f"lora.rank applies to svd only, not to {self.mode}.", params=("lora.rank",))
        if (self.base is None) == (self.mode == "merge"):
            raise PlanError("lora merge writes the base model with the mean update added: give base, the model "
                            "folder or file the adapters were trained on." if self.base is None else
                            f"base goes with lora merge, not with lora {self.mode}.", params=("base", "lora"))

    def average(self, pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], weights: Sequence[float]) -> LoraLayer:
        """The stored A, B of one layer from each checkpoint's ``(A, B)``, and the relative error of the update
        ``s·B·A`` against ``s Σ w_k B_k A_k``: 0 for concat; for factors computed by `factors_error`, which
        costs QRs of (out + in) × (N+1)·r stacks, like svd."""
        As = [a for a, _ in pairs]
        Bs = [b for _, b in pairs]
        if self.mode in ("concat", "merge"):  # merge: the exact update, applied to the base by lora_merge
            a, b = average_concat(As, Bs, weights)
            return LoraLayer(a, b, 0.0)
        if self.mode == "factors":
            a, b = average_factors(As, Bs, weights)
            return LoraLayer(a, b, factors_error(As, Bs, weights))
        return LoraLayer(*average_svd(As, Bs, weights, self.rank if self.rank is not None else As[0].shape[0]))


def adapter_config_for(config: dict[str, Any], mode: Mode, n: int, *, rank: int | None = None) -> dict[str, Any]:
    """The output's ``adapter_config.json`` (docs/ALGORITHMS.md §13): a copy of `config` with ``r`` and
    ``lora_alpha`` changed so that every layer keeps its scale.

    factors, and svd at the input rank: unchanged. concat of `n` adapters: every rank (``r`` and each
    ``rank_pattern`` entry) times n, every alpha (``lora_alpha`` and each ``alpha_pattern`` entry) times n, or
    √n with ``use_rslora``. svd at another `rank`: ``r = rank`` and ``lora_alpha`` rescaled; refused when the
    config has rank or alpha patterns, whose layers would each need their own alpha.

    Raises:
        PlanError: An unknown mode, a bad rank, or svd at another rank with rank_pattern/alpha_pattern.
        CheckpointFormatError: The config has no usable ``r`` or ``lora_alpha``.
    """
    if mode == "merge":
        raise PlanError("lora merge writes full weights, not an adapter: it has no adapter_config.json.",
                        params=("lora",))
    LoraAverage(mode, rank if mode == "svd" else None)
    out = copy.deepcopy(config)
    r, alpha = config.get("r"), config.get("lora_alpha")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1 or isinstance(alpha, bool) or not isinstance(alpha, int | float):
        raise CheckpointFormatError(f"adapter_config.json needs an integer r >= 1 and a number lora_alpha, "
                                    f"not r={r!r}, lora_alpha={alpha!r}.")
    rslora = bool(config.get("use_rslora", False))
    if mode == "factors" or (mode == "svd" and (rank is None or rank == r)):
        return out
    if mode == "concat":
        factor = math.sqrt(n) if rslora else n
        out["r"], new_alpha = concat_alpha(r, n, alpha, rslora)
        out["lora_alpha"] = _tidy(new_alpha)
        if config.get("rank_pattern"):
            out["rank_pattern"] = {k: n * v for k, v in config["rank_pattern"].items()}
        if config.get("alpha_pattern"):
            out["alpha_pattern"] = {k: _tidy(v * factor) for k, v in config["alpha_pattern"].items()}
        return out
    assert rank is not None
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise PlanError(f"lora.rank {rank} differs from the adapters' r {r}, and their rank_pattern/alpha_pattern "
                        "would need an alpha per layer; leave out lora.rank.", params=("lora.rank",))
    out["r"], out["lora_alpha"] = rank, _tidy(alpha_for(rank, r, alpha, rslora))
    return out


def _tidy(alpha: float) -> float | int:
    """An integral alpha written as an integer, as PEFT's own configs have it."""
    return int(alpha) if float(alpha).is_integer() else alpha
