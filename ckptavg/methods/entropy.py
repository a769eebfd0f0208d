"""Layer entropy and filter-grafting coefficients (docs/ALGORITHMS.md §3): pure maths, no I/O.

Entropies are computed in float32 bin by bin, exactly as the reference code does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..errors import PlanError
from .schedules import check_choice, check_integer, check_number

GRAFT_MODES = ("pairwise", "cyclic")


def graft_entropy(t: torch.Tensor, bins: int = 10) -> float:
    """Filter-grafting layer entropy, the reference definition exactly (docs/ALGORITHMS.md §3.1).

    On a float32 copy: edges ``e_i = min + i * ((max - min) / bins)``, bin i counts ``e_i <= x < e_{i+1}`` (the
    maximum usually falls outside every bin), ``p_i = count_i / numel``, ``H = -sum_{p_i > 0} p_i ln p_i``, all
    in float32 scalar arithmetic bin by bin like the reference (counts exact; the reference's float32 count sum
    is exact too below 2**24 elements).

    Args:
        t: A real tensor of any dtype (converted to float32 first).
        bins: Number of bins (>= 1).

    Returns:
        H in nats; 0.0 for an empty or constant tensor.
    """
    bins = check_integer("bins", bins, 1)
    if t.is_complex():
        raise PlanError(f"graft entropy needs a real tensor, got dtype {t.dtype}")
    x = t.detach().reshape(-1).to(torch.float32)
    if x.numel() and not bool(torch.isfinite(x).all()):
        raise PlanError(f"graft entropy of a tensor with NaN/Inf (or beyond float32 range), shape {tuple(t.shape)}")
    if x.numel() == 0:
        return 0.0
    lo, hi = torch.aminmax(x)
    edges = lo + torch.arange(bins + 1, dtype=torch.float32, device=x.device) * ((hi - lo) / bins)
    at_or_above = [int((x >= e).sum()) for e in edges]
    h = torch.zeros((), dtype=torch.float32)
    for count in (at_or_above[i] - at_or_above[i + 1] for i in range(bins)):
        if count > 0:
            p = torch.tensor(count, dtype=torch.float32) / x.numel()
            h = h - p * torch.log(p)
    return float(h)


def _check_graft(a: float, c: float, round_digits: int | None) -> None:
    check_number("a", a, 0.0, 1.0)
    check_number("c", c, 0.0)
    if round_digits is not None:
        check_integer("round_digits", round_digits, 0)


def _alpha(h_own: float, h_donor: float, a: float, c: float, round_digits: int | None) -> float:
    value = a / math.pi * math.atan(c * (h_own - h_donor)) + 0.5
    return value if round_digits is None else round(value, round_digits)


def graft_alpha(h_own: float, h_donor: float, *, a: float = 0.4, c: float = 500.0,
                round_digits: int | None = 2) -> float:
    """Grafting coefficient the receiving network keeps; the donor gets ``1 - alpha`` (docs/ALGORITHMS.md §3.1).

    Python's ``round`` rounds the exact binary value (0.615, stored just below, gives 0.61); only exactly
    representable ties (0.375, 0.625) go to even. The reference rounds a numpy float64 (scale by 100, round half
    to even), which can differ within a few ulp of a tie.

    Args:
        h_own, h_donor: Entropies of the receiver's and of the donor's tensor.
        a: Amplitude in [0, 1]; alpha lies in [0.5 - a/2, 0.5 + a/2].
        c: Steepness (>= 0).
        round_digits: Decimals kept (>= 0), or None for no rounding.

    Returns:
        ``round((a/pi) * atan(c * (h_own - h_donor)) + 0.5, round_digits)``.
    """
    _check_graft(a, c, round_digits)
    return _alpha(check_number("h_own", h_own, -math.inf), check_number("h_donor", h_donor, -math.inf), a, c, round_digits)


def graft_weights(entropies: Sequence[float], *, mode: str = "pairwise", a: float = 0.4, c: float = 500.0,
                  round_digits: int | None = 2) -> list[float]:
    """Weights of N checkpoints in one graft group from their entropies (docs/ALGORITHMS.md §3.3); they sum to 1.

    Args:
        entropies: One finite entropy per checkpoint, in checkpoint order (at least one).
        mode: ``"pairwise"`` (mean of all N(N-1)/2 two-network grafts, ``alpha_ij`` for i < j and
            ``1 - alpha_ij`` for j) or ``"cyclic"`` (checkpoint k receives from k-1, 1 from N, then the mean).
        a, c, round_digits: As in `graft_alpha`.

    Returns:
        One weight per checkpoint; N = 2 gives the paper's ``(alpha, 1 - alpha)``.
    """
    mode = check_choice("mode", mode, GRAFT_MODES)
    _check_graft(a, c, round_digits)
    h = [check_number(f"entropies[{i}]", v, -math.inf) for i, v in enumerate(entropies)]
    n = len(h)
    if n < 2:
        if not h:
            raise PlanError("entropies is empty: at least one checkpoint is needed")
        return [1.0]
    if mode == "cyclic":
        alphas = [_alpha(h[k], h[k - 1], a, c, round_digits) for k in range(n)]
        return [(alphas[i] + 1.0 - alphas[(i + 1) % n]) / n for i in range(n)]
    w = [0.0] * n
    for i in range(n):
        for j in range(i + 1, n):
            alpha = _alpha(h[i], h[j], a, c, round_digits)
            w[i] += alpha
            w[j] += 1.0 - alpha
    return [x * 2.0 / (n * (n - 1)) for x in w]


def graft_sequential_weights(tensors: Sequence[torch.Tensor], *, a: float = 0.4, c: float = 500.0, bins: int = 10,
                             round_digits: int | None = 2) -> list[float]:
    """Effective weights of ``G_1 = theta_1``, ``G_k = alpha_k theta_k + (1 - alpha_k) G_{k-1}`` (docs/ALGORITHMS.md §3.3).

    ``alpha_k = graft_alpha(H(theta_k), H(G_{k-1}))``; G is merged in float64, its entropy taken on a float32 copy.

    Args:
        tensors: One real tensor per checkpoint (one graft group), all of one shape, in checkpoint order.
        a, c, round_digits: As in `graft_alpha`.
        bins: Entropy bins (>= 1).

    Returns:
        One weight per checkpoint, summing to 1.
    """
    _check_graft(a, c, round_digits)
    bins = check_integer("bins", bins, 1)
    if not tensors or any(t.is_complex() for t in tensors) or len({tuple(t.shape) for t in tensors}) > 1:
        shapes = [f"{tuple(t.shape)} {t.dtype}" for t in tensors]
        raise PlanError(f"sequential grafting needs one or more real tensors of one shape, got {shapes}")
    weights = [1.0]
    merged = tensors[0].detach().to(torch.float64)
    for t in tensors[1:]:
        alpha = _alpha(graft_entropy(t, bins), graft_entropy(merged.to(torch.float32), bins), a, c, round_digits)
        weights = [(1.0 - alpha) * w for w in weights] + [alpha]
        merged = alpha * t.detach().to(torch.float64) + (1.0 - alpha) * merged
    return weights
