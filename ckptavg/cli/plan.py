"""`ckptavg plan METHOD`: the checkpoints, order and weights an averaging command would use; writes nothing.

Each twin takes the options of its command in `average.py` that shape the weights (method, selection,
loading, `--dtype`) and none that only shape the output; `tests/test_cli_commands.py` checks that.
"""

from __future__ import annotations

from collections.abc import Callable

from .average import ema_plan, graft_plan, soup_plan
from .options import (
    AddPrefixOpt,
    BestOpt,
    ComponentOpt,
    DecayOpt,
    DtypeOpt,
    EvalOpt,
    EveryOpt,
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
    MetricModeOnlyOpt,
    MetricModeOpt,
    MetricOpt,
    MinDecayOpt,
    NormalizeOpt,
    Order,
    OrderOpt,
    PerOpt,
    RoundDigitsOpt,
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
    WarmupGammaOpt,
    WarmupOpt,
    WarmupPowerOpt,
    WeightsOpt,
)
from .values import loading, selection, show_plan

HELP = ("Show which checkpoints a method would use, in which order, with which weights, without writing "
        "anything.\n\nswa, ema and linear read only metadata; graft and soup read tensor data to compute "
        "their weights (graft: layer entropies; soup: your --eval on candidate averages).")


def swa(
    inputs: InputsArg, *,
    last: LastOpt = None, best: BestOpt = None, metric: MetricOpt = None, metric_mode: MetricModeOpt = None,
    start: StartOpt = None, every: EveryOpt = None, upto: UptoOpt = None, order: OrderOpt = Order.AUTO,
    key: KeyOpt = None, component: ComponentOpt = None, strip_prefix: StripPrefixOpt = None,
    add_prefix: AddPrefixOpt = None, keep_prefix: KeepPrefixOpt = False, trust_pickle: TrustPickleOpt = False,
    dtype: DtypeOpt = None, json_out: JsonOpt = False,
) -> None:
    """Weights of `ckptavg swa`, without doing the work (reads metadata only)."""
    from ..methods.uniform import Swa

    show_plan(inputs, Swa(), selection(last, best, metric, metric_mode, start, every, upto, order),
              loading(key, keep_prefix, trust_pickle, component, strip_prefix, add_prefix), dtype, json_out)


def ema(
    inputs: InputsArg, *,
    last: LastOpt = None, best: BestOpt = None, metric: MetricOpt = None, metric_mode: MetricModeOpt = None,
    start: StartOpt = None, every: EveryOpt = None, upto: UptoOpt = None, order: OrderOpt = Order.AUTO,
    key: KeyOpt = None, component: ComponentOpt = None, strip_prefix: StripPrefixOpt = None,
    add_prefix: AddPrefixOpt = None, keep_prefix: KeepPrefixOpt = False, trust_pickle: TrustPickleOpt = False,
    dtype: DtypeOpt = None, json_out: JsonOpt = False,
    decay: DecayOpt = None, per: PerOpt = None, step_decay: StepDecayOpt = None, sigma_rel: SigmaRelOpt = None,
    warmup: WarmupOpt = False, warmup_gamma: WarmupGammaOpt = 1.0, warmup_power: WarmupPowerOpt = 2 / 3,
    min_decay: MinDecayOpt = 0.0, update_after_step: UpdateAfterStepOpt = 0, hold: HoldOpt = Hold.BACKWARD,
    init: InitOpt = Init.FIRST,
) -> None:
    """Weights of `ckptavg ema`, without doing the work (reads metadata only)."""
    plan = ema_plan(decay, per, step_decay, sigma_rel, warmup, warmup_gamma, warmup_power, min_decay,
                    update_after_step, hold, init)
    show_plan(inputs, plan, selection(last, best, metric, metric_mode, start, every, upto, order),
              loading(key, keep_prefix, trust_pickle, component, strip_prefix, add_prefix), dtype, json_out)


def graft(
    inputs: InputsArg, *,
    last: LastOpt = None, best: BestOpt = None, metric: MetricOpt = None, metric_mode: MetricModeOnlyOpt = None,
    start: StartOpt = None, every: EveryOpt = None, upto: UptoOpt = None, order: OrderOpt = Order.AUTO,
    key: KeyOpt = None, component: ComponentOpt = None, strip_prefix: StripPrefixOpt = None,
    add_prefix: AddPrefixOpt = None, keep_prefix: KeepPrefixOpt = False, trust_pickle: TrustPickleOpt = False,
    dtype: DtypeOpt = None, json_out: JsonOpt = False,
    a: GraftAOpt = 0.4, c: GraftCOpt = 500.0, bins: GraftBinsOpt = 10, mode: GraftModeOpt = GraftMode.PAIRWISE,
    groups: GraftGroupsOpt = GraftGroups.AUTO, round_digits: RoundDigitsOpt = "2",
) -> None:
    """Weights of `ckptavg graft`, without writing anything (reads every tensor for its entropy)."""
    show_plan(inputs, graft_plan(a, c, bins, mode, groups, round_digits),
              selection(last, best, metric, metric_mode, start, every, upto, order),
              loading(key, keep_prefix, trust_pickle, component, strip_prefix, add_prefix), dtype, json_out)


def linear(
    inputs: InputsArg, *,
    last: LastOpt = None, best: BestOpt = None, metric: MetricOpt = None, metric_mode: MetricModeOpt = None,
    start: StartOpt = None, every: EveryOpt = None, upto: UptoOpt = None, order: OrderOpt = Order.AUTO,
    key: KeyOpt = None, component: ComponentOpt = None, strip_prefix: StripPrefixOpt = None,
    add_prefix: AddPrefixOpt = None, keep_prefix: KeepPrefixOpt = False, trust_pickle: TrustPickleOpt = False,
    dtype: DtypeOpt = None, json_out: JsonOpt = False,
    weights: WeightsOpt, normalize: NormalizeOpt = False,
) -> None:
    """Weights of `ckptavg linear`, without doing the work (reads metadata only)."""
    from ..methods.linear import Linear, parse_weights

    show_plan(inputs, Linear(parse_weights(weights), normalize),
              selection(last, best, metric, metric_mode, start, every, upto, order),
              loading(key, keep_prefix, trust_pickle, component, strip_prefix, add_prefix), dtype, json_out)


def soup(
    inputs: InputsArg, *,
    last: LastOpt = None, best: BestOpt = None, metric: MetricOpt = None, metric_mode: MetricModeOnlyOpt = None,
    start: StartOpt = None, every: EveryOpt = None, upto: UptoOpt = None, order: OrderOpt = Order.AUTO,
    key: KeyOpt = None, component: ComponentOpt = None, strip_prefix: StripPrefixOpt = None,
    add_prefix: AddPrefixOpt = None, keep_prefix: KeepPrefixOpt = False, trust_pickle: TrustPickleOpt = False,
    dtype: DtypeOpt = None, json_out: JsonOpt = False,
    eval: EvalOpt = None, mode: SoupModeOpt = SoupMode.MAX, uniform: UniformOpt = False, strict: StrictOpt = False,
) -> None:
    """Weights of `ckptavg soup`, without writing anything (runs --eval on the candidate averages)."""
    show_plan(inputs, soup_plan(eval, mode, uniform, strict),
              selection(last, best, metric, metric_mode, start, every, upto, order),
              loading(key, keep_prefix, trust_pickle, component, strip_prefix, add_prefix), dtype, json_out)


COMMANDS: dict[str, Callable[..., None]] = {"swa": swa, "ema": ema, "graft": graft, "linear": linear, "soup": soup}
"""The `plan` twin of each averaging command in `average.COMMANDS`."""
