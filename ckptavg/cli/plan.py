"""`ckptavg plan METHOD`: the checkpoints, order and weights an averaging command would use; writes nothing.

Each twin takes the options of its command (`average.py`, `posthoc.py`) that shape the weights (method,
selection, loading, `--window`, `--dtype`) and none that only shape the output, but `--plot`;
`tests/test_cli_commands.py` checks that.
"""

from __future__ import annotations

from collections.abc import Callable

from . import builders
from .method_options import (
    GRAFT_A,
    GRAFT_BINS,
    GRAFT_C,
    GRAFT_GROUPS,
    GRAFT_MODE,
    HOLD,
    INIT,
    MIN_DECAY,
    SCHEDULE,
    UPDATE_AFTER_STEP,
    WARMUP_GAMMA,
    WARMUP_POWER,
    AtStepOpt,
    ByStepOpt,
    DecayOpt,
    EvalOpt,
    FactorOpt,
    FinalOpt,
    GammaOpt,
    GraftAOpt,
    GraftBinsOpt,
    GraftCOpt,
    GraftGroupsOpt,
    GraftModeOpt,
    HoldOpt,
    InitOpt,
    LrHoldOpt,
    LrPowerOpt,
    MilestonesOpt,
    MinDecayOpt,
    NormalizeOpt,
    PerOpt,
    PlotOpt,
    RawOpt,
    ReverseOpt,
    RoundDigitsOpt,
    ScheduleOpt,
    SigmaRelOpt,
    SnapshotGammaOpt,
    SnapshotSigmaRelOpt,
    SoupModeOpt,
    StepDecayOpt,
    StrictOpt,
    StrideOpt,
    TargetSigmaRelOpt,
    TimescaleOpt,
    UniformOpt,
    UpdateAfterStepOpt,
    WarmupGammaOpt,
    WarmupOpt,
    WarmupPowerOpt,
    WeightsOpt,
    WindowOpt,
)
from .options import (
    AddPrefixOpt,
    BaseOpt,
    BestOpt,
    ComponentOpt,
    DtypeOpt,
    EveryOpt,
    InputsArg,
    JsonOpt,
    KeepPrefixOpt,
    KeyOpt,
    LastOpt,
    LoraOpt,
    LoraRankOpt,
    MetricModeOnlyOpt,
    MetricModeOpt,
    MetricOpt,
    Order,
    OrderOpt,
    SoupMode,
    StartOpt,
    StripPrefixOpt,
    TrustPickleOpt,
    UptoOpt,
)
from .values import loading, selection, show_plan

HELP = ("Show which checkpoints a method would use, in which order, with which weights, without writing "
        "anything.\n\nswa, ema, linear, wsm and phema read only metadata (and LoRA adapters' factors, for each "
        "layer's error); graft and soup read tensor data to compute their weights (graft: layer entropies; "
        "soup: your --eval on candidate averages). Several "
        "outputs (comma lists, --window) show as a matrix: one column of weights per output.")


def swa(
    inputs: InputsArg, *,
    last: LastOpt = None, best: BestOpt = None, metric: MetricOpt = None, metric_mode: MetricModeOpt = None,
    start: StartOpt = None, every: EveryOpt = None, upto: UptoOpt = None, order: OrderOpt = Order.AUTO,
    key: KeyOpt = None, component: ComponentOpt = None, strip_prefix: StripPrefixOpt = None,
    add_prefix: AddPrefixOpt = None, keep_prefix: KeepPrefixOpt = False, trust_pickle: TrustPickleOpt = False,
    dtype: DtypeOpt = None, json_out: JsonOpt = False, plot: PlotOpt = None,
    lora: LoraOpt = None, lora_rank: LoraRankOpt = None, base: BaseOpt = None,
    window: WindowOpt = None, stride: StrideOpt = None,
) -> None:
    """Weights of `ckptavg swa`, without doing the work (reads metadata only)."""
    from ..methods.uniform import Swa

    show_plan(inputs, builders.windowed(Swa(), window, stride),
              selection(last, best, metric, metric_mode, start, every, upto, order),
              loading(key, keep_prefix, trust_pickle, component, strip_prefix, add_prefix), dtype, json_out, plot,
              builders.lora_average(lora, lora_rank, base))


def ema(
    inputs: InputsArg, *,
    last: LastOpt = None, best: BestOpt = None, metric: MetricOpt = None, metric_mode: MetricModeOpt = None,
    start: StartOpt = None, every: EveryOpt = None, upto: UptoOpt = None, order: OrderOpt = Order.AUTO,
    key: KeyOpt = None, component: ComponentOpt = None, strip_prefix: StripPrefixOpt = None,
    add_prefix: AddPrefixOpt = None, keep_prefix: KeepPrefixOpt = False, trust_pickle: TrustPickleOpt = False,
    dtype: DtypeOpt = None, json_out: JsonOpt = False, plot: PlotOpt = None,
    lora: LoraOpt = None, lora_rank: LoraRankOpt = None, base: BaseOpt = None,
    decay: DecayOpt = None, per: PerOpt = None, step_decay: StepDecayOpt = None, sigma_rel: SigmaRelOpt = None,
    warmup: WarmupOpt = False, warmup_gamma: WarmupGammaOpt = WARMUP_GAMMA,
    warmup_power: WarmupPowerOpt = WARMUP_POWER, min_decay: MinDecayOpt = MIN_DECAY,
    update_after_step: UpdateAfterStepOpt = UPDATE_AFTER_STEP, hold: HoldOpt = HOLD,
    init: InitOpt = INIT, window: WindowOpt = None, stride: StrideOpt = None,
) -> None:
    """Weights of `ckptavg ema`, without doing the work (reads metadata only)."""
    plan = builders.ema_plan(decay, per, step_decay, sigma_rel, warmup, warmup_gamma, warmup_power, min_decay,
                             update_after_step, hold, init)
    show_plan(inputs, builders.windowed(plan, window, stride),
              selection(last, best, metric, metric_mode, start, every, upto, order),
              loading(key, keep_prefix, trust_pickle, component, strip_prefix, add_prefix), dtype, json_out, plot,
              builders.lora_average(lora, lora_rank, base))


def graft(
    inputs: InputsArg, *,
    last: LastOpt = None, best: BestOpt = None, metric: MetricOpt = None, metric_mode: MetricModeOnlyOpt = None,
    start: StartOpt = None, every: EveryOpt = None, upto: UptoOpt = None, order: OrderOpt = Order.AUTO,
    key: KeyOpt = None, component: ComponentOpt = None, strip_prefix: StripPrefixOpt = None,
    add_prefix: AddPrefixOpt = None, keep_prefix: KeepPrefixOpt = False, trust_pickle: TrustPickleOpt = False,
    dtype: DtypeOpt = None, json_out: JsonOpt = False, plot: PlotOpt = None,
    lora: LoraOpt = None, lora_rank: LoraRankOpt = None, base: BaseOpt = None,
    a: GraftAOpt = GRAFT_A, c: GraftCOpt = GRAFT_C, bins: GraftBinsOpt = GRAFT_BINS,
    mode: GraftModeOpt = GRAFT_MODE, groups: GraftGroupsOpt = GRAFT_GROUPS, round_digits: RoundDigitsOpt = "2",
    window: WindowOpt = None, stride: StrideOpt = None,
) -> None:
    """Weights of `ckptavg graft`, without writing anything (reads every tensor for its entropy)."""
    show_plan(inputs, builders.windowed(builders.graft_plan(a, c, bins, mode, groups, round_digits), window, stride),
              selection(last, best, metric, metric_mode, start, every, upto, order),
              loading(key, keep_prefix, trust_pickle, component, strip_prefix, add_prefix), dtype, json_out, plot,
              builders.lora_average(lora, lora_rank, base))


def linear(
    inputs: InputsArg, *,
    last: LastOpt = None, best: BestOpt = None, metric: MetricOpt = None, metric_mode: MetricModeOpt = None,
    start: StartOpt = None, every: EveryOpt = None, upto: UptoOpt = None, order: OrderOpt = Order.AUTO,
    key: KeyOpt = None, component: ComponentOpt = None, strip_prefix: StripPrefixOpt = None,
    add_prefix: AddPrefixOpt = None, keep_prefix: KeepPrefixOpt = False, trust_pickle: TrustPickleOpt = False,
    dtype: DtypeOpt = None, json_out: JsonOpt = False, plot: PlotOpt = None,
    lora: LoraOpt = None, lora_rank: LoraRankOpt = None, base: BaseOpt = None,
    weights: WeightsOpt, normalize: NormalizeOpt = False, lr_power: LrPowerOpt = None, hold: LrHoldOpt = None,
    window: WindowOpt = None, stride: StrideOpt = None,
) -> None:
    """Weights of `ckptavg linear` (with --weights lr: each checkpoint's learning rate and its source), without
    doing the work (reads metadata only)."""
    show_plan(inputs, builders.windowed(builders.linear_plan(weights, normalize, lr_power, hold), window, stride),
              selection(last, best, metric, metric_mode, start, every, upto, order),
              loading(key, keep_prefix, trust_pickle, component, strip_prefix, add_prefix), dtype, json_out, plot,
              builders.lora_average(lora, lora_rank, base))


def soup(
    inputs: InputsArg, *,
    last: LastOpt = None, best: BestOpt = None, metric: MetricOpt = None, metric_mode: MetricModeOnlyOpt = None,
    start: StartOpt = None, every: EveryOpt = None, upto: UptoOpt = None, order: OrderOpt = Order.AUTO,
    key: KeyOpt = None, component: ComponentOpt = None, strip_prefix: StripPrefixOpt = None,
    add_prefix: AddPrefixOpt = None, keep_prefix: KeepPrefixOpt = False, trust_pickle: TrustPickleOpt = False,
    dtype: DtypeOpt = None, json_out: JsonOpt = False, plot: PlotOpt = None,
    lora: LoraOpt = None, lora_rank: LoraRankOpt = None, base: BaseOpt = None,
    eval: EvalOpt = None, mode: SoupModeOpt = SoupMode.MAX, uniform: UniformOpt = False, strict: StrictOpt = False,
    window: WindowOpt = None, stride: StrideOpt = None,
) -> None:
    """Weights of `ckptavg soup`, without writing anything (runs --eval on the candidate averages)."""
    show_plan(inputs, builders.windowed(builders.soup_plan(eval, mode, uniform, strict), window, stride),
              selection(last, best, metric, metric_mode, start, every, upto, order),
              loading(key, keep_prefix, trust_pickle, component, strip_prefix, add_prefix), dtype, json_out, plot,
              builders.lora_average(lora, lora_rank, base))


def wsm(
    inputs: InputsArg, *,
    last: LastOpt = None, best: BestOpt = None, metric: MetricOpt = None, metric_mode: MetricModeOpt = None,
    start: StartOpt = None, every: EveryOpt = None, upto: UptoOpt = None, order: OrderOpt = Order.AUTO,
    key: KeyOpt = None, component: ComponentOpt = None, strip_prefix: StripPrefixOpt = None,
    add_prefix: AddPrefixOpt = None, keep_prefix: KeepPrefixOpt = False, trust_pickle: TrustPickleOpt = False,
    dtype: DtypeOpt = None, json_out: JsonOpt = False, plot: PlotOpt = None,
    lora: LoraOpt = None, lora_rank: LoraRankOpt = None, base: BaseOpt = None,
    schedule: ScheduleOpt = SCHEDULE, final: FinalOpt = None, factor: FactorOpt = None,
    milestones: MilestonesOpt = None, gamma: GammaOpt = None, timescale: TimescaleOpt = None,
    reverse: ReverseOpt = False, by_step: ByStepOpt = False, window: WindowOpt = None, stride: StrideOpt = None,
) -> None:
    """Weights of `ckptavg wsm`, and the positions its shape is evaluated at, without doing the work (reads
    metadata only)."""
    plan = builders.wsm_plan(schedule, final, factor, milestones, gamma, timescale, reverse, by_step)
    show_plan(inputs, builders.windowed(plan, window, stride),
              selection(last, best, metric, metric_mode, start, every, upto, order),
              loading(key, keep_prefix, trust_pickle, component, strip_prefix, add_prefix), dtype, json_out, plot,
              builders.lora_average(lora, lora_rank, base))


def phema(
    inputs: InputsArg, *,
    last: LastOpt = None, best: BestOpt = None, metric: MetricOpt = None, metric_mode: MetricModeOpt = None,
    start: StartOpt = None, every: EveryOpt = None, upto: UptoOpt = None, order: OrderOpt = Order.AUTO,
    key: KeyOpt = None, component: ComponentOpt = None, strip_prefix: StripPrefixOpt = None,
    add_prefix: AddPrefixOpt = None, keep_prefix: KeepPrefixOpt = False, trust_pickle: TrustPickleOpt = False,
    dtype: DtypeOpt = None, json_out: JsonOpt = False, plot: PlotOpt = None,
    lora: LoraOpt = None, lora_rank: LoraRankOpt = None, base: BaseOpt = None,
    sigma_rel: TargetSigmaRelOpt, snapshot_sigma_rel: SnapshotSigmaRelOpt = None,
    snapshot_gamma: SnapshotGammaOpt = None, at_step: AtStepOpt = None, raw: RawOpt = False,
    window: WindowOpt = None, stride: StrideOpt = None,
) -> None:
    """Weights of `ckptavg phema`, and each snapshot's profile and its source, without doing the work (reads
    metadata only)."""
    plan = builders.phema_plan(sigma_rel, snapshot_sigma_rel, snapshot_gamma, at_step, raw)
    show_plan(inputs, builders.windowed(plan, window, stride),
              selection(last, best, metric, metric_mode, start, every, upto, order),
              loading(key, keep_prefix, trust_pickle, component, strip_prefix, add_prefix), dtype, json_out, plot,
              builders.lora_average(lora, lora_rank, base))


COMMANDS: dict[str, Callable[..., None]] = {"swa": swa, "ema": ema, "graft": graft, "linear": linear, "soup": soup,
                                            "wsm": wsm, "phema": phema}
"""The `plan` twin of each averaging command in `average.COMMANDS` and `posthoc.COMMANDS`."""
