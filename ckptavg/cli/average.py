"""The averaging commands (`swa`, `ema`, `graft`, `linear`, `soup`) and the builders of their plans.

Each method has a builder from its own options to its plan value, used by the command here and by its
twin in `plan.py`; `tests/test_cli_commands.py` keeps every pair's options in step, and checks that the
first paragraph of each command's help is the plan's `summary` in the registry.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from .options import (
    AccumDtype,
    AccumDtypeOpt,
    AddPrefixOpt,
    AllowNonfiniteOpt,
    BestOpt,
    BnBatchesOpt,
    BnBatchSizeOpt,
    BnDataOpt,
    BnForwardOpt,
    BnModelOpt,
    ComponentOpt,
    DecayOpt,
    DeviceOpt,
    DtypeOpt,
    EvalOpt,
    EveryOpt,
    ForceOpt,
    GraftAOpt,
    GraftBinsOpt,
    GraftCOpt,
    GraftGroups,
    GraftGroupsOpt,
    GraftMode,
    GraftModeOpt,
    Hold,
    HoldOpt,
    Init,
    InitOpt,
    InputsArg,
    JsonOpt,
    KeepPrefixOpt,
    KeyOpt,
    LastOpt,
    MaxShardSizeOpt,
    MetricModeOnlyOpt,
    MetricModeOpt,
    MetricOpt,
    MinDecayOpt,
    NormalizeOpt,
    Order,
    OrderOpt,
    OutputOpt,
    Per,
    PerOpt,
    QuietOpt,
    RoundDigitsOpt,
    ShardsOpt,
    SigmaRelOpt,
    SoupMode,
    SoupModeOpt,
    StartOpt,
    StepDecayOpt,
    StrictOpt,
    StripPrefixOpt,
    TrustPickleOpt,
    UniformOpt,
    UpdateAfterStepOpt,
    UptoOpt,
    VerifyOpt,
    WarmupGammaOpt,
    WarmupOpt,
    WarmupPowerOpt,
    WeightsOpt,
)
from .values import Destination, average, batchnorm, loading, selection

if TYPE_CHECKING:
    from ..methods.ema import Ema
    from ..methods.graft import Graft
    from ..methods.soup import Soup

# ---------------------------------------------------------------- plan builders (the library is imported late)


def ema_plan(decay: float | None, per: Per | None, step_decay: float | None, sigma_rel: float | None, warmup: bool,
             warmup_gamma: float, warmup_power: float, min_decay: float, update_after_step: int, hold: Hold,
             init: Init) -> Ema:
    """The `Ema` of the ema options, with `--decay B --per step` read as `--step-decay B`.

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
    return Ema(decay=decay, step_decay=step_decay, sigma_rel=sigma_rel, warmup=warmup, warmup_gamma=warmup_gamma,
               warmup_power=warmup_power, min_decay=min_decay, update_after_step=update_after_step,
               hold=hold.value, init=init.value)


def graft_plan(a: float, c: float, bins: int, mode: GraftMode, groups: GraftGroups, round_digits: str) -> Graft:
    """The `Graft` of the graft options; `--round-digits none` keeps every digit."""
    from ..errors import PlanError
    from ..methods.graft import Graft

    digits: int | None = None
    if round_digits.lower() != "none":
        try:
            digits = int(round_digits)
        except ValueError:
            raise PlanError(f"--round-digits must be an integer >= 0 or 'none', not {round_digits!r}.") from None
    return Graft(a=a, c=c, bins=bins, mode=mode.value, groups=groups.value, round_digits=digits)


def soup_plan(eval: str | None, mode: SoupMode, uniform: bool, strict: bool) -> Soup:
    """The `Soup` of the soup options, with the --eval function imported."""
    from ..errors import PlanError
    from ..methods.soup import Soup
    from ..userfn import load_callable

    fn = load_callable(eval, "evaluate", PlanError) if eval else None
    return Soup(evaluate=fn, mode=mode.value, uniform=uniform, strict=strict, name=eval)


# ---------------------------------------------------------------- swa


def swa(
    inputs: InputsArg, *,
    last: LastOpt = None, best: BestOpt = None, metric: MetricOpt = None, metric_mode: MetricModeOpt = None,
    start: StartOpt = None, every: EveryOpt = None, upto: UptoOpt = None, order: OrderOpt = Order.AUTO,
    key: KeyOpt = None, component: ComponentOpt = None, strip_prefix: StripPrefixOpt = None,
    add_prefix: AddPrefixOpt = None, keep_prefix: KeepPrefixOpt = False, trust_pickle: TrustPickleOpt = False,
    output: OutputOpt, max_shard_size: MaxShardSizeOpt = None, shards: ShardsOpt = None, dtype: DtypeOpt = None,
    accum_dtype: AccumDtypeOpt = AccumDtype.FLOAT64, device: DeviceOpt = "cpu", allow_nonfinite: AllowNonfiniteOpt = False,
    verify: VerifyOpt = False, force: ForceOpt = False, json_out: JsonOpt = False, quiet: QuietOpt = False,
    bn_model: BnModelOpt = None, bn_data: BnDataOpt = None, bn_batches: BnBatchesOpt = None,
    bn_batch_size: BnBatchSizeOpt = 32, bn_forward: BnForwardOpt = None,
) -> None:
    """Uniform average of the selected checkpoints (stochastic weight averaging).

    Example:
      ckptavg swa runs/ --last 5 -o avg.safetensors

    Paper: arXiv:1803.05407
    """
    from ..methods.uniform import Swa

    average(inputs, Swa(), selection(last, best, metric, metric_mode, start, every, upto, order),
            loading(key, keep_prefix, trust_pickle, component, strip_prefix, add_prefix),
            Destination(output, max_shard_size, shards, dtype, accum_dtype, device, allow_nonfinite=allow_nonfinite,
                        verify=verify, force=force, json_out=json_out, quiet=quiet),
            batchnorm(bn_model, bn_data, bn_batches, bn_batch_size, bn_forward))


# ---------------------------------------------------------------- ema


def ema(
    inputs: InputsArg, *,
    last: LastOpt = None, best: BestOpt = None, metric: MetricOpt = None, metric_mode: MetricModeOpt = None,
    start: StartOpt = None, every: EveryOpt = None, upto: UptoOpt = None, order: OrderOpt = Order.AUTO,
    key: KeyOpt = None, component: ComponentOpt = None, strip_prefix: StripPrefixOpt = None,
    add_prefix: AddPrefixOpt = None, keep_prefix: KeepPrefixOpt = False, trust_pickle: TrustPickleOpt = False,
    output: OutputOpt, max_shard_size: MaxShardSizeOpt = None, shards: ShardsOpt = None, dtype: DtypeOpt = None,
    accum_dtype: AccumDtypeOpt = AccumDtype.FLOAT64, device: DeviceOpt = "cpu", allow_nonfinite: AllowNonfiniteOpt = False,
    verify: VerifyOpt = False, force: ForceOpt = False, json_out: JsonOpt = False, quiet: QuietOpt = False,
    bn_model: BnModelOpt = None, bn_data: BnDataOpt = None, bn_batches: BnBatchesOpt = None,
    bn_batch_size: BnBatchSizeOpt = 32, bn_forward: BnForwardOpt = None,
    decay: DecayOpt = None, per: PerOpt = None, step_decay: StepDecayOpt = None, sigma_rel: SigmaRelOpt = None,
    warmup: WarmupOpt = False, warmup_gamma: WarmupGammaOpt = 1.0, warmup_power: WarmupPowerOpt = 2 / 3,
    min_decay: MinDecayOpt = 0.0, update_after_step: UpdateAfterStepOpt = 0, hold: HoldOpt = Hold.BACKWARD,
    init: InitOpt = Init.FIRST,
) -> None:
    """Exponential moving average weights over checkpoints, computed in closed form.

    Examples:
      ckptavg ema runs/ --decay 0.9 -o ema.safetensors
      ckptavg ema runs/ --decay 0.999 --per step --warmup -o ema.safetensors
      ckptavg ema runs/ --sigma-rel 0.1 -o ema.safetensors

    Paper: arXiv:2312.02696 (power-function EMA); timm ModelEmaV3 (per-step EMA)
    """
    plan = ema_plan(decay, per, step_decay, sigma_rel, warmup, warmup_gamma, warmup_power, min_decay,
                    update_after_step, hold, init)
    average(inputs, plan, selection(last, best, metric, metric_mode, start, every, upto, order),
            loading(key, keep_prefix, trust_pickle, component, strip_prefix, add_prefix),
            Destination(output, max_shard_size, shards, dtype, accum_dtype, device, allow_nonfinite=allow_nonfinite,
                        verify=verify, force=force, json_out=json_out, quiet=quiet),
            batchnorm(bn_model, bn_data, bn_batches, bn_batch_size, bn_forward))


# ---------------------------------------------------------------- graft


def graft(
    inputs: InputsArg, *,
    last: LastOpt = None, best: BestOpt = None, metric: MetricOpt = None, metric_mode: MetricModeOnlyOpt = None,
    start: StartOpt = None, every: EveryOpt = None, upto: UptoOpt = None, order: OrderOpt = Order.AUTO,
    key: KeyOpt = None, component: ComponentOpt = None, strip_prefix: StripPrefixOpt = None,
    add_prefix: AddPrefixOpt = None, keep_prefix: KeepPrefixOpt = False, trust_pickle: TrustPickleOpt = False,
    output: OutputOpt, max_shard_size: MaxShardSizeOpt = None, shards: ShardsOpt = None, dtype: DtypeOpt = None,
    accum_dtype: AccumDtypeOpt = AccumDtype.FLOAT64, device: DeviceOpt = "cpu", allow_nonfinite: AllowNonfiniteOpt = False,
    verify: VerifyOpt = False, force: ForceOpt = False, json_out: JsonOpt = False, quiet: QuietOpt = False,
    bn_model: BnModelOpt = None, bn_data: BnDataOpt = None, bn_batches: BnBatchesOpt = None,
    bn_batch_size: BnBatchSizeOpt = 32, bn_forward: BnForwardOpt = None,
    a: GraftAOpt = 0.4, c: GraftCOpt = 500.0, bins: GraftBinsOpt = 10, mode: GraftModeOpt = GraftMode.PAIRWISE,
    groups: GraftGroupsOpt = GraftGroups.AUTO, round_digits: RoundDigitsOpt = "2",
) -> None:
    """Entropy-weighted filter grafting: each layer weighted by the information its weights carry.

    Example:
      ckptavg graft a.pt b.pt -o grafted.safetensors

    Paper: arXiv:2001.05868
    """
    plan = graft_plan(a, c, bins, mode, groups, round_digits)
    average(inputs, plan, selection(last, best, metric, metric_mode, start, every, upto, order),
            loading(key, keep_prefix, trust_pickle, component, strip_prefix, add_prefix),
            Destination(output, max_shard_size, shards, dtype, accum_dtype, device, allow_nonfinite=allow_nonfinite,
                        verify=verify, force=force, json_out=json_out, quiet=quiet),
            batchnorm(bn_model, bn_data, bn_batches, bn_batch_size, bn_forward))


# ---------------------------------------------------------------- linear


def linear(
    inputs: InputsArg, *,
    last: LastOpt = None, best: BestOpt = None, metric: MetricOpt = None, metric_mode: MetricModeOpt = None,
    start: StartOpt = None, every: EveryOpt = None, upto: UptoOpt = None, order: OrderOpt = Order.AUTO,
    key: KeyOpt = None, component: ComponentOpt = None, strip_prefix: StripPrefixOpt = None,
    add_prefix: AddPrefixOpt = None, keep_prefix: KeepPrefixOpt = False, trust_pickle: TrustPickleOpt = False,
    output: OutputOpt, max_shard_size: MaxShardSizeOpt = None, shards: ShardsOpt = None, dtype: DtypeOpt = None,
    accum_dtype: AccumDtypeOpt = AccumDtype.FLOAT64, device: DeviceOpt = "cpu", allow_nonfinite: AllowNonfiniteOpt = False,
    verify: VerifyOpt = False, force: ForceOpt = False, json_out: JsonOpt = False, quiet: QuietOpt = False,
    bn_model: BnModelOpt = None, bn_data: BnDataOpt = None, bn_batches: BnBatchesOpt = None,
    bn_batch_size: BnBatchSizeOpt = 32, bn_forward: BnForwardOpt = None,
    weights: WeightsOpt, normalize: NormalizeOpt = False,
) -> None:
    """Average with your own weights, one per selected checkpoint.

    Example:
      ckptavg linear a.pt b.pt c.pt --weights 0.2,0.3,0.5 -o out.safetensors
    """
    from ..methods.linear import Linear, parse_weights

    plan = Linear(parse_weights(weights), normalize)
    average(inputs, plan, selection(last, best, metric, metric_mode, start, every, upto, order),
            loading(key, keep_prefix, trust_pickle, component, strip_prefix, add_prefix),
            Destination(output, max_shard_size, shards, dtype, accum_dtype, device, allow_nonfinite=allow_nonfinite,
                        verify=verify, force=force, json_out=json_out, quiet=quiet),
            batchnorm(bn_model, bn_data, bn_batches, bn_batch_size, bn_forward))


# ---------------------------------------------------------------- soup


def soup(
    inputs: InputsArg, *,
    last: LastOpt = None, best: BestOpt = None, metric: MetricOpt = None, metric_mode: MetricModeOnlyOpt = None,
    start: StartOpt = None, every: EveryOpt = None, upto: UptoOpt = None, order: OrderOpt = Order.AUTO,
    key: KeyOpt = None, component: ComponentOpt = None, strip_prefix: StripPrefixOpt = None,
    add_prefix: AddPrefixOpt = None, keep_prefix: KeepPrefixOpt = False, trust_pickle: TrustPickleOpt = False,
    output: OutputOpt, max_shard_size: MaxShardSizeOpt = None, shards: ShardsOpt = None, dtype: DtypeOpt = None,
    accum_dtype: AccumDtypeOpt = AccumDtype.FLOAT64, device: DeviceOpt = "cpu", allow_nonfinite: AllowNonfiniteOpt = False,
    verify: VerifyOpt = False, force: ForceOpt = False, json_out: JsonOpt = False, quiet: QuietOpt = False,
    bn_model: BnModelOpt = None, bn_data: BnDataOpt = None, bn_batches: BnBatchesOpt = None,
    bn_batch_size: BnBatchSizeOpt = 32, bn_forward: BnForwardOpt = None,
    eval: EvalOpt = None, mode: SoupModeOpt = SoupMode.MAX, uniform: UniformOpt = False, strict: StrictOpt = False,
) -> None:
    """Model soup: greedy (keep a checkpoint only if the average scores no worse) or uniform.

    Example:
      ckptavg soup runs/ --eval evals.py:accuracy -o soup.safetensors

    Paper: arXiv:2203.05482
    """
    plan = soup_plan(eval, mode, uniform, strict)
    average(inputs, plan, selection(last, best, metric, metric_mode, start, every, upto, order),
            loading(key, keep_prefix, trust_pickle, component, strip_prefix, add_prefix),
            Destination(output, max_shard_size, shards, dtype, accum_dtype, device, allow_nonfinite=allow_nonfinite,
                        verify=verify, force=force, json_out=json_out, quiet=quiet),
            batchnorm(bn_model, bn_data, bn_batches, bn_batch_size, bn_forward))


COMMANDS: dict[str, Callable[..., None]] = {"swa": swa, "ema": ema, "graft": graft, "linear": linear, "soup": soup}
"""The averaging command of each method in the registry (`ckptavg.methods.PLANS`)."""
