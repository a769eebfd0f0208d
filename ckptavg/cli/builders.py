"""From the method options to the library's plans, shared by each command and its `plan` twin.

An option given a comma list makes a sweep (`ckptavg.methods.windows.sweep`): one output per value. One
parameter may vary per run, beside the values a plan takes itself (`wsm --schedule`, `phema --sigma-rel`);
`--window` then repeats every output over windows of checkpoints. The library is imported late: `--help`
must not import torch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from .lists import Floats, Ints, Names
from .options import Keep, LoraMode, Per, SoupMode

if TYPE_CHECKING:
    from ..methods.base import Plan
    from ..methods.lora import LoraAverage
    from ..results import RowEvaluation


def _first(values: Sequence[Any] | None) -> Any:
    return None if values is None else values[0]


def swept(plan: Plan, lists: Mapping[str, Sequence[Any] | None]) -> Plan:
    """`plan` (built from the first value of each list) swept over the one parameter given several values.

    Raises:
        PlanError: when more than one parameter lists several values.
    """
    from ..errors import PlanError
    from ..methods.windows import sweep

    varying = [(name, values) for name, values in lists.items() if values is not None and len(values) > 1]
    if len(varying) > 1:
        names = tuple(name for name, _ in varying)
        raise PlanError(f"{' and '.join(names)} each list several values; a run sweeps one parameter (one output "
                        "per value): give the others one value each.", params=names)
    if not varying:
        return plan
    name, values = varying[0]
    return sweep(plan, name, list(values))


def windowed(plan: Plan, window: int | None, stride: int | None) -> Plan:
    """`plan` filling each window of `window` checkpoints (`stride` apart), or `plan` itself without --window."""
    from ..errors import PlanError
    from ..methods.windows import Windows

    if window is None:
        if stride is not None:
            raise PlanError("stride goes with window: give window K too.", params=("stride", "window"))
        return plan
    return Windows(plan, window, stride or 1)


def lora_average(lora: LoraMode | None, lora_rank: int | None, base: str | None) -> LoraAverage | None:
    """The `LoraAverage` of --lora, --lora-rank and --base (a rank alone means svd, a base merge); None for the
    default."""
    from ..methods.lora import LoraAverage

    if lora is None and lora_rank is None and base is None:
        return None
    return LoraAverage(lora.value if lora else "merge" if base is not None else "svd", lora_rank, base)


def evaluation(eval: str | None, eval_mode: SoupMode, keep: Keep | None) -> RowEvaluation | None:
    """The `RowEvaluation` of --eval, --eval-mode and --keep; None without --eval."""
    from ..errors import PlanError
    from ..results import RowEvaluation
    from ..userfn import load_callable

    if eval is None:
        if keep is not None or eval_mode is not SoupMode.MAX:
            raise PlanError("keep and eval_mode go with eval, the function that scores each output.",
                            params=("keep", "eval_mode", "eval"))
        return None
    fn = load_callable(eval, "eval", PlanError)
    return RowEvaluation(fn, mode=eval_mode.value, keep=(keep or Keep.BEST).value, name=eval)


def soup_evaluation(eval: str | None, mode: SoupMode, keep: Keep | None) -> RowEvaluation | None:
    """A soup's outputs scored by its own --eval and --mode, when --keep asks for it."""
    from ..errors import PlanError
    from ..results import RowEvaluation
    from ..userfn import load_callable

    if keep is None:
        return None
    if eval is None:
        raise PlanError("keep scores each soup with eval: give eval too.", params=("keep", "eval"))
    return RowEvaluation(load_callable(eval, "eval", PlanError), mode=mode.value, keep=keep.value, name=eval)


def ema_plan(decay: Floats | None, per: Per | None, step_decay: Floats | None, sigma_rel: Floats | None,
             warmup: bool, warmup_gamma: Floats, warmup_power: Floats, min_decay: Floats, update_after_step: Ints,
             hold: Names, init: Names) -> Plan:
    """The `Ema` (or sweep of them) of the ema options, with `--decay B --per step` read as `--step-decay B`.

    The other two modes already say what one update is, so there `--per` may only repeat it. Two modes
    at once are left for `Ema` to refuse.
    """
    from ..errors import PlanError
    from ..methods.ema import Ema

    alone = [v is not None for v in (decay, step_decay, sigma_rel)].count(True) == 1
    if per is Per.STEP and decay is not None and alone:
        decay, step_decay = None, decay
    elif per is Per.CHECKPOINT and decay is None and alone:
        given = "--step-decay" if step_decay is not None else "--sigma-rel"
        raise PlanError(f"--per checkpoint goes with --decay; {given} is per optimizer step "
                        "(use --decay B --per checkpoint, or drop --per).")
    lists: dict[str, Sequence[Any] | None] = {
        "decay": decay, "step_decay": step_decay, "sigma_rel": sigma_rel, "warmup_gamma": warmup_gamma,
        "warmup_power": warmup_power, "min_decay": min_decay, "update_after_step": update_after_step, "hold": hold,
        "init": init}
    plan = Ema(warmup=warmup, **{k: _first(v) for k, v in lists.items()})
    return swept(plan, lists)


def graft_plan(a: Floats, c: Floats, bins: Ints, mode: Names, groups: Names, round_digits: str) -> Plan:
    """The `Graft` (or sweep) of the graft options; `--round-digits none` keeps every digit."""
    from ..errors import PlanError
    from ..methods.graft import Graft

    digits: list[int | None] = []
    for part in round_digits.split(","):
        if part.strip().lower() == "none":
            digits.append(None)
            continue
        try:
            digits.append(int(part))
        except ValueError:
            raise PlanError(f"--round-digits must be an integer >= 0 or 'none', not {round_digits!r}.") from None
    lists: dict[str, Sequence[Any]] = {"a": a, "c": c, "bins": bins, "mode": mode, "groups": groups,
                                       "round_digits": digits}
    return swept(Graft(**{k: v[0] for k, v in lists.items()}), lists)


def soup_plan(eval: str | None, mode: SoupMode, uniform: bool, strict: bool) -> Plan:
    """The `Soup` of the soup options, with the --eval function imported."""
    from ..errors import PlanError
    from ..methods.soup import Soup
    from ..userfn import load_callable

    fn = load_callable(eval, "evaluate", PlanError) if eval else None
    return Soup(evaluate=fn, mode=mode.value, uniform=uniform, strict=strict, name=eval)


def linear_plan(weights: str, normalize: bool, lr_power: Floats | None, hold: Names | None) -> Plan:
    """`Linear` of --weights W,W,...; or with `--weights lr`, `LrWeighted` (or a sweep of --lr-power or --hold)."""
    from ..errors import PlanError
    from ..methods.linear import Linear, parse_weights
    from ..methods.lr import LrWeighted

    if weights.strip().lower() != "lr":
        given = [name for name, v in (("lr_power", lr_power), ("hold", hold)) if v is not None]
        if given:
            raise PlanError(f"{' and '.join(given)} go with weights lr (learning-rate weights), not with "
                            "weights given as numbers.", params=(*given, "weights"))
        return Linear(parse_weights(weights), normalize)
    if normalize:
        raise PlanError("weights lr are normalised already; drop normalize.", params=("normalize", "weights"))
    powers, holds = lr_power or Floats((1.0,)), hold or Names(("backward",))
    return swept(LrWeighted(powers[0], holds[0]), {"lr_power": powers, "hold": holds})


def wsm_plan(schedule: Names, final: Floats | None, factor: Floats | None, milestones: Floats | None,
             gamma: Floats | None, timescale: Floats | None, reverse: bool, by_step: bool) -> Plan:
    """The `Wsm` of the wsm options: several shapes are its own rows; a list of another parameter, a sweep."""
    from ..methods.wsm import Wsm

    lists: dict[str, Sequence[Any] | None] = {"final": final, "factor": factor, "gamma": gamma, "timescale": timescale}
    shapes: str | tuple[str, ...] = schedule[0] if len(schedule) == 1 else tuple(schedule)
    plan = Wsm(schedule=shapes, milestones=tuple(milestones or ()), reverse=reverse, by_step=by_step,
               **{k: _first(v) for k, v in lists.items()})
    return swept(plan, lists)


def phema_plan(sigma_rel: Floats, snapshot_sigma_rel: Floats | None, snapshot_gamma: Floats | None,
               at_step: Ints | None, raw: bool) -> Plan:
    """The `Phema` of the phema options: several --sigma-rel are its own rows; several --at-step, a sweep."""
    from ..methods.phema import Phema

    targets: float | tuple[float, ...] = sigma_rel[0] if len(sigma_rel) == 1 else tuple(sigma_rel)
    plan = Phema(sigma_rel=targets, snapshot_sigma_rel=tuple(snapshot_sigma_rel or ()),
                 snapshot_gamma=tuple(snapshot_gamma or ()), at_step=_first(at_step), normalize=not raw)
    return swept(plan, {"at_step": at_step})
