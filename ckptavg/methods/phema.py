"""Post-hoc EMA synthesis from stored power-EMA snapshots (EDM2, docs/ALGORITHMS.md §4.2 and §14).

Owns the inner product of two power-function EMA profiles, the least-squares solve that approximates a
target profile by a combination of stored snapshots, how each snapshot's profile is found (its file name,
its metadata, or the `snapshot_sigma_rel` option in ema-pytorch's profile order), and the `Phema` plan.

A snapshot taken at time t of an EMA with exponent gamma is the average of the training trajectory under
the unit-mass profile ``p(tau) = (gamma + 1) tau^gamma / t^(gamma + 1)`` on ``0 < tau <= t`` (§4.1). The
output ``sum_i x_i snapshot_i`` has the profile ``sum_i x_i p_i``; the x minimising its L2 distance to the
target profile solve ``A x = b`` with the Gram matrix ``A_ij = <p_i, p_j>`` and ``b_i = <p_i, p_target>``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..errors import PlanError, listing
from .base import Entry, Plan, TensorAccess, WeightMatrix, Weights, register
from .schedules import SIGMA_REL_MAX, sigma_rel_to_gamma

# ema-pytorch's KarrasEMA saves its own counters beside the weights, and PostHocEMA stores every entry as float16,
# BatchNorm's num_batches_tracked included: these are counters, not EMA'd weights, so a snapshot combination with
# negative coefficients must not mix them (at step 12, the raw solution would give step 16).
TOP_COUNTERS = ("step", "initted")

PROFILE_PLACES = ("EDM2 file names network-snapshot-{kimg}-{sigma_rel}.pkl",
                  "safetensors metadata sigma_rel, ema_sigma_rel, gamma or ema_gamma",
                  "PostHocEMA file names {index}.{step}.pt with snapshot_sigma_rel or snapshot_gamma")


def gamma_to_sigma_rel(gamma: float) -> float:
    """Relative width of a power profile: ``sqrt((g + 1) / ((g + 2)^2 (g + 3)))`` (docs/ALGORITHMS.md §4.1)."""
    return math.sqrt((gamma + 1.0) / ((gamma + 2.0) ** 2 * (gamma + 3.0)))


def profile_inner(t_a: float, gamma_a: float, t_b: float, gamma_b: float) -> float:
    """``<p_a, p_b> = integral of p_a p_b`` for two unit-mass power profiles ending at t_a and t_b.

    With ``t_a <= t_b`` only ``tau <= t_a`` contributes: ``(ga+1)(gb+1) t_a^(ga+gb+1) / ((ga+gb+1) t_a^(ga+1)
    t_b^(gb+1))``, i.e. ``(ga+1)(gb+1) (t_a/t_b)^gb / ((ga+gb+1) t_b)`` (docs/ALGORITHMS.md §4.2); symmetric.

    Args:
        t_a, t_b: End times > 0 (steps, or images: only ratios matter up to a common factor).
        gamma_a, gamma_b: Exponents >= 0.
    """
    if t_a > t_b:
        t_a, gamma_a, t_b, gamma_b = t_b, gamma_b, t_a, gamma_a
    return (gamma_a + 1.0) * (gamma_b + 1.0) * float((t_a / t_b) ** gamma_b) / ((gamma_a + gamma_b + 1.0) * t_b)


def phema_coefficients(times: Sequence[float], gammas: Sequence[float], target_gamma: float,
                       target_time: float | None = None, *, normalize: bool = True) -> list[float]:
    """Least-squares coefficients of stored snapshots for the power profile ``(target_time, target_gamma)``.

    Only snapshots with ``0 < t_i <= target_time`` take part (the others get 0), as in EDM2.

    Args:
        times: Each snapshot's time t_i.
        gammas: Each snapshot's exponent gamma_i >= 0; no two used snapshots may share both t and gamma.
        target_gamma: Exponent of the profile to synthesise.
        target_time: Its time; default the newest snapshot's.
        normalize: Divide by the sum, as EDM2 does, so the weights sum to 1 exactly (ema-pytorch does not).

    Returns:
        One coefficient per snapshot, in the order given; they may be negative.
    """
    if len(times) != len(gammas) or not times:
        raise PlanError("phema needs at least one snapshot, with one time and one profile each.")
    end = max(times) if target_time is None else target_time
    used = [i for i, t in enumerate(times) if 0 < t <= end]
    if not used:
        raise PlanError(f"no snapshot lies in (0, {end}], the target step; nothing to synthesise from.",
                        params=("at_step",))
    seen: dict[tuple[float, float], int] = {}
    for i in used:
        if (times[i], gammas[i]) in seen:
            raise PlanError(f"snapshots {seen[(times[i], gammas[i])]} and {i} have the same step {times[i]} and profile "
                            f"(gamma {gammas[i]:.6g}), so the least squares has no unique solution; select one of them.")
        seen[(times[i], gammas[i])] = i
    gram = torch.tensor([[profile_inner(times[i], gammas[i], times[j], gammas[j]) for j in used] for i in used],
                        dtype=torch.float64)
    rhs = torch.tensor([profile_inner(times[i], gammas[i], end, target_gamma) for i in used], dtype=torch.float64)
    try:
        solved = torch.linalg.solve(gram, rhs).tolist()
    except RuntimeError as e:
        raise PlanError(f"the snapshots' Gram matrix is singular ({e}); select fewer snapshots.") from None
    if not all(math.isfinite(x) for x in solved):
        raise PlanError("the least squares gave non-finite coefficients; select fewer snapshots.")
    if normalize:
        total = math.fsum(solved)
        if total == 0.0:
            raise PlanError("the coefficients sum to 0 and cannot be normalised; try normalize=False.",
                            params=("normalize",))
        solved = [x / total for x in solved]
    out = [0.0] * len(times)
    for i, x in zip(used, solved, strict=True):
        out[i] = x
    return out


def is_counter(name: str) -> bool:
    """Whether an entry of a snapshot is a counter, copied rather than combined: KarrasEMA's top-level `step` and
    `initted`, or a BatchNorm `num_batches_tracked`."""
    return name in TOP_COUNTERS or name.rsplit(".", 1)[-1] == "num_batches_tracked"


def _copying(row: Weights, counters: Sequence[str]) -> Weights:
    """`row` with each counter copied from the newest snapshot it uses, as ckptavg copies integer tensors."""
    if not counters:
        return row
    newest = max(i for i, x in enumerate(row.values) if x != 0)
    onehot = tuple(1.0 if i == newest else 0.0 for i in range(len(row.values)))
    return Weights(row.values, row.residual, {name: onehot for name in counters}, row.name, row.params)


def _target_gamma(name: str, value: float) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and 0.0 < value < SIGMA_REL_MAX
    if not ok:
        raise PlanError(f"{name} must be in (0, {SIGMA_REL_MAX:.6f}) (a power profile with gamma > 0), "
                        f"not {value!r}.", params=(name,))
    return sigma_rel_to_gamma(value)


@register
@dataclass(frozen=True)
class Phema(Plan):
    """EDM2's post-hoc EMA: combine stored power-EMA snapshots into the EMA of another width (§4.2, §14).

    Each input must be a snapshot of a power-function EMA whose profile is known: from an EDM2 file name,
    from safetensors metadata, or from `snapshot_sigma_rel` (or `snapshot_gamma`) indexed by the profile index
    of ema-pytorch's ``{index}.{step}.pt`` names. Raw training checkpoints are not snapshots: average them with
    ``Ema(sigma_rel=...)`` (§4.3) instead. Counters stored as floats (`is_counter`: KarrasEMA's `step` and
    `initted`, BatchNorm's `num_batches_tracked`) get one-hot `by_tensor` weights: copied from the newest
    snapshot used, never combined.

    Attributes:
        sigma_rel: Target relative width(s) in (0, 0.288675); several give one output row each.
        snapshot_sigma_rel: The sigma_rel of each PostHocEMA profile, in the order given to ``PostHocEMA``.
        snapshot_gamma: The same as exponents (``PostHocEMA(gammas=...)``); at most one of the two.
        at_step: Time of the synthesised EMA, in the snapshots' unit (steps; kimg for EDM2); default the newest.
            Snapshots after it are not used.
        normalize: Scale the coefficients to sum to 1 exactly (EDM2); False keeps the raw least-squares solution
            (what ema-pytorch's ``synthesize_ema_model`` uses).
    """

    method: ClassVar[str] = "phema"
    combines_profiles: ClassVar[bool] = True
    summary: ClassVar[str] = "Synthesise any power-function EMA from stored EMA snapshots (EDM2 post-hoc EMA)."
    paper: ClassVar[str] = "arXiv:2312.02696"
    sigma_rel: float | tuple[float, ...] = ()
    snapshot_sigma_rel: tuple[float, ...] = ()
    snapshot_gamma: tuple[float, ...] = ()
    at_step: int | None = None
    normalize: bool = True

    def __post_init__(self) -> None:
        targets = self.targets
        if not targets:
            raise PlanError("phema needs sigma_rel, the relative width of the EMA to synthesise, e.g. 0.1.",
                            params=("sigma_rel",))
        if len(set(targets)) != len(targets):
            raise PlanError(f"sigma_rel names a value twice: {list(targets)}.", params=("sigma_rel",))
        for value in targets:
            _target_gamma("sigma_rel", value)
        if self.snapshot_sigma_rel and self.snapshot_gamma:
            raise PlanError("give snapshot_sigma_rel or snapshot_gamma, not both.",
                            params=("snapshot_sigma_rel", "snapshot_gamma"))
        for value in self.snapshot_sigma_rel:
            _target_gamma("snapshot_sigma_rel", value)
        if any(not isinstance(g, int | float) or isinstance(g, bool) or not 0 <= g < math.inf for g in self.snapshot_gamma):
            raise PlanError(f"snapshot_gamma must be finite numbers >= 0, not {list(self.snapshot_gamma)}.",
                            params=("snapshot_gamma",))
        if self.at_step is not None and (isinstance(self.at_step, bool) or not isinstance(self.at_step, int)
                                         or self.at_step <= 0):
            raise PlanError(f"at_step must be an integer > 0, not {self.at_step!r}.", params=("at_step",))

    @property
    def targets(self) -> tuple[float, ...]:
        """The target sigma_rel values, in the order given."""
        return (self.sigma_rel,) if isinstance(self.sigma_rel, int | float) else tuple(self.sigma_rel)

    def params(self) -> dict[str, Any]:
        targets = self.targets
        return {"sigma_rel": targets[0] if len(targets) == 1 else list(targets),
                "snapshot_sigma_rel": list(self.snapshot_sigma_rel), "snapshot_gamma": list(self.snapshot_gamma),
                "at_step": self.at_step, "normalize": self.normalize}

    def profile(self, entry: Entry) -> tuple[float, str]:
        """The exponent gamma of one snapshot and where it came from."""
        meta, option = entry.meta, self.snapshot_sigma_rel or self.snapshot_gamma
        name = "snapshot_sigma_rel" if self.snapshot_sigma_rel else "snapshot_gamma"
        if meta.ema_index is not None and option:
            if meta.ema_index >= len(option):
                raise PlanError(f"{entry.name} is PostHocEMA profile {meta.ema_index}, but {name} lists only "
                                f"{len(option)} profiles ({list(option)}).", params=(name,))
            value = option[meta.ema_index]
            gamma = sigma_rel_to_gamma(value) if self.snapshot_sigma_rel else float(value)
            return gamma, f"{name}[{meta.ema_index}]"
        if meta.sigma_rel is not None:
            if not 0.0 < meta.sigma_rel < SIGMA_REL_MAX:
                raise PlanError(f"{entry.name}: its profile sigma_rel {meta.sigma_rel} ({meta.profile_source}) is not in "
                                f"(0, {SIGMA_REL_MAX:.6f}), so it is not a power-function EMA snapshot.")
            return sigma_rel_to_gamma(meta.sigma_rel), meta.profile_source or "metadata"
        if meta.gamma is not None:
            return meta.gamma, meta.profile_source or "metadata"
        if meta.ema_index is not None:
            raise PlanError(f"{entry.name} is a snapshot of PostHocEMA profile {meta.ema_index}, whose width is not in "
                            "the file; give snapshot_sigma_rel, the sigma_rel of each profile in the order given to "
                            "PostHocEMA (its default is 0.05,0.28).", params=("snapshot_sigma_rel",))
        raise PlanError(f"the power-EMA profile of {entry.name} is unknown; ckptavg looked in: {'; '.join(PROFILE_PLACES)}. "
                        "phema needs stored EMA snapshots; for raw checkpoints use ema with sigma_rel.",
                        params=("snapshot_sigma_rel", "snapshot_gamma", "sigma_rel"))

    def weights(self, ckpts: Sequence[Entry], data: TensorAccess | None = None) -> WeightMatrix:
        self.check_count(len(ckpts))
        no_step = [c.name for c in ckpts if c.meta.step is None]
        if no_step:
            raise PlanError(f"phema needs the step of every snapshot, but it is unknown for {listing(no_step, 5)}.")
        times = [float(c.meta.step) for c in ckpts if c.meta.step is not None]
        profiles = [self.profile(c) for c in ckpts]
        gammas = [g for g, _ in profiles]
        newest = max(times)
        if self.at_step is not None and self.at_step > newest:
            raise PlanError(f"at_step {self.at_step} is after the newest snapshot (step {newest:g}); "
                            "an EMA can only be synthesised up to it.", params=("at_step",))
        end = newest if self.at_step is None else float(self.at_step)
        seen: dict[tuple[float, float], str] = {}
        for c, t, g in zip(ckpts, times, gammas, strict=True):
            if 0 < t <= end and seen.setdefault((t, g), c.name) != c.name:
                raise PlanError(f"{seen[(t, g)]} and {c.name} are snapshots of the same profile at the same step "
                                f"({t:g}), so the least squares has no unique solution; select one of them.")
        counters = [s.name for s in data.specs if s.averaged and is_counter(s.name)] if data is not None else []
        rows = []
        for target in self.targets:
            x = phema_coefficients(times, gammas, sigma_rel_to_gamma(target), end, normalize=self.normalize)
            rows.append(_copying(Weights(tuple(x), name=f"sigma_rel={target}", params={"sigma_rel": target}), counters))
        details: dict[str, Any] = {
            "at_step": end,
            "snapshots": [{"step": t, "gamma": g, "sigma_rel": gamma_to_sigma_rel(g), "source": src}
                          for t, (g, src) in zip(times, profiles, strict=True)],
            "sum_abs": [math.fsum(abs(v) for v in r.values) for r in rows],
        }
        if counters:
            details["copied"] = {"entries": counters, "why": "counters (step, initted, num_batches_tracked) are copied "
                                 "from the newest snapshot used, not combined"}
        if len(rows) == 1:
            return WeightMatrix((Weights(rows[0].values, by_tensor=rows[0].by_tensor),), details)
        return WeightMatrix(tuple(rows), details)
