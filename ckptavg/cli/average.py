"""The averaging commands `swa`, `ema`, `graft`, `linear` (and `linear --weights lr`) and `soup`.

Each builds its plan with `builders.py`, as its twin in `plan.py` does; `tests/test_cli_commands.py` keeps
every pair's options in step, and checks that the first paragraph of each command's help is the plan's
`summary` in the registry. Every command takes `--window` and `--eval`/`--keep` for several outputs.
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
    UPDATE_AFTER_STEP,
    WARMUP_GAMMA,
    WARMUP_POWER,
    DecayOpt,
    EvalModeOpt,
    EvalOpt,
    GraftAOpt,
    GraftBinsOpt,
    GraftCOpt,
    GraftGroupsOpt,
    GraftModeOpt,
    HoldOpt,
    InitOpt,
    KeepOpt,
    LrHoldOpt,
    LrPowerOpt,
    MinDecayOpt,
    NormalizeOpt,
    PerOpt,
    RoundDigitsOpt,
    RowEvalOpt,
    SigmaRelOpt,
    SoupKeepOpt,
    SoupModeOpt,
    StepDecayOpt,
    StrictOpt,
    StrideOpt,
    UniformOpt,
    UpdateAfterStepOpt,
    WarmupGammaOpt,
    WarmupOpt,
    WarmupPowerOpt,
    WeightsOpt,
    WindowOpt,
)
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
    ContainerOpt,
    DeviceOpt,
    DtypeOpt,
    EveryOpt,
    ForceOpt,
    FormatOpt,
    InputsArg,
    JsonOpt,
    KeepPrefixOpt,
    KeepTrainingStateOpt,
    KeyOpt,
    LastOpt,
    MaxShardSizeOpt,
    MetricModeOnlyOpt,
    MetricModeOpt,
    MetricOpt,
    Order,
    OrderOpt,
    OutputOpt,
    QuietOpt,
    ShardsOpt,
    SoupMode,
    StartOpt,
    StripPrefixOpt,
    TrustPickleOpt,
    UptoOpt,
    VerifyOpt,
)
from .values import Destination, average, batchnorm, loading, selection


def swa(
    inputs: InputsArg, *,
    last: LastOpt = None, best: BestOpt = None, metric: MetricOpt = None, metric_mode: MetricModeOpt = None,
    start: StartOpt = None, every: EveryOpt = None, upto: UptoOpt = None, order: OrderOpt = Order.AUTO,
    key: KeyOpt = None, component: ComponentOpt = None, strip_prefix: StripPrefixOpt = None,
    add_prefix: AddPrefixOpt = None, keep_prefix: KeepPrefixOpt = False, trust_pickle: TrustPickleOpt = False,
    output: OutputOpt, fmt: FormatOpt = None, max_shard_size: MaxShardSizeOpt = None, shards: ShardsOpt = None,
    dtype: DtypeOpt = None,
    accum_dtype: AccumDtypeOpt = AccumDtype.FLOAT64, device: DeviceOpt = "cpu", allow_nonfinite: AllowNonfiniteOpt = False,
    verify: VerifyOpt = False, force: ForceOpt = False, json_out: JsonOpt = False, quiet: QuietOpt = False,
    container: ContainerOpt = False, keep_training_state: KeepTrainingStateOpt = False,
    bn_model: BnModelOpt = None, bn_data: BnDataOpt = None, bn_batches: BnBatchesOpt = None,
    bn_batch_size: BnBatchSizeOpt = 32, bn_forward: BnForwardOpt = None,
    window: WindowOpt = None, stride: StrideOpt = None,
    eval: RowEvalOpt = None, eval_mode: EvalModeOpt = SoupMode.MAX, keep: KeepOpt = None,
) -> None:
    """Uniform average of the selected checkpoints (stochastic weight averaging).

    Examples:
      ckptavg swa runs/ --last 5 -o avg.safetensors
      ckptavg swa runs/ --window 5 -o 'lawa-{step}.safetensors'

    Paper: arXiv:1803.05407
    """
    from ..methods.uniform import Swa

    average(inputs, builders.windowed(Swa(), window, stride), selection(last, best, metric, metric_mode, start, every,
                                                                           upto, order),
            loading(key, keep_prefix, trust_pickle, component, strip_prefix, add_prefix),
            Destination(output, max_shard_size, shards, dtype, accum_dtype, device, allow_nonfinite=allow_nonfinite,
                        verify=verify, force=force, json_out=json_out, quiet=quiet, fmt=fmt,
                        container=container, keep_training_state=keep_training_state),
            batchnorm(bn_model, bn_data, bn_batches, bn_batch_size, bn_forward), builders.evaluation(eval, eval_mode, keep))


def ema(
    inputs: InputsArg, *,
    last: LastOpt = None, best: BestOpt = None, metric: MetricOpt = None, metric_mode: MetricModeOpt = None,
    start: StartOpt = None, every: EveryOpt = None, upto: UptoOpt = None, order: OrderOpt = Order.AUTO,
    key: KeyOpt = None, component: ComponentOpt = None, strip_prefix: StripPrefixOpt = None,
    add_prefix: AddPrefixOpt = None, keep_prefix: KeepPrefixOpt = False, trust_pickle: TrustPickleOpt = False,
    output: OutputOpt, fmt: FormatOpt = None, max_shard_size: MaxShardSizeOpt = None, shards: ShardsOpt = None,
    dtype: DtypeOpt = None,
    accum_dtype: AccumDtypeOpt = AccumDtype.FLOAT64, device: DeviceOpt = "cpu", allow_nonfinite: AllowNonfiniteOpt = False,
    verify: VerifyOpt = False, force: ForceOpt = False, json_out: JsonOpt = False, quiet: QuietOpt = False,
    container: ContainerOpt = False, keep_training_state: KeepTrainingStateOpt = False,
    bn_model: BnModelOpt = None, bn_data: BnDataOpt = None, bn_batches: BnBatchesOpt = None,
    bn_batch_size: BnBatchSizeOpt = 32, bn_forward: BnForwardOpt = None,
    decay: DecayOpt = None, per: PerOpt = None, step_decay: StepDecayOpt = None, sigma_rel: SigmaRelOpt = None,
    warmup: WarmupOpt = False, warmup_gamma: WarmupGammaOpt = WARMUP_GAMMA,
    warmup_power: WarmupPowerOpt = WARMUP_POWER, min_decay: MinDecayOpt = MIN_DECAY,
    update_after_step: UpdateAfterStepOpt = UPDATE_AFTER_STEP, hold: HoldOpt = HOLD,
    init: InitOpt = INIT, window: WindowOpt = None, stride: StrideOpt = None,
    eval: RowEvalOpt = None, eval_mode: EvalModeOpt = SoupMode.MAX, keep: KeepOpt = None,
) -> None:
    """Exponential moving average weights over checkpoints, computed in closed form.

    Number and name options take comma lists: one output per value, from one read.

    Examples:
      ckptavg ema runs/ --decay 0.9 -o ema.safetensors
      ckptavg ema runs/ --decay 0.999 --per step --warmup -o ema.safetensors
      ckptavg ema runs/ --sigma-rel 0.05,0.1 -o 'ema-{sigma_rel}.safetensors'

    Paper: arXiv:2312.02696 (power-function EMA); timm ModelEmaV3 (per-step EMA)
    """
    plan = builders.ema_plan(decay, per, step_decay, sigma_rel, warmup, warmup_gamma, warmup_power, min_decay,
                             update_after_step, hold, init)
    average(inputs, builders.windowed(plan, window, stride),
            selection(last, best, metric, metric_mode, start, every, upto, order),
            loading(key, keep_prefix, trust_pickle, component, strip_prefix, add_prefix),
            Destination(output, max_shard_size, shards, dtype, accum_dtype, device, allow_nonfinite=allow_nonfinite,
                        verify=verify, force=force, json_out=json_out, quiet=quiet, fmt=fmt,
                        container=container, keep_training_state=keep_training_state),
            batchnorm(bn_model, bn_data, bn_batches, bn_batch_size, bn_forward), builders.evaluation(eval, eval_mode, keep))


def graft(
    inputs: InputsArg, *,
    last: LastOpt = None, best: BestOpt = None, metric: MetricOpt = None, metric_mode: MetricModeOnlyOpt = None,
    start: StartOpt = None, every: EveryOpt = None, upto: UptoOpt = None, order: OrderOpt = Order.AUTO,
    key: KeyOpt = None, component: ComponentOpt = None, strip_prefix: StripPrefixOpt = None,
    add_prefix: AddPrefixOpt = None, keep_prefix: KeepPrefixOpt = False, trust_pickle: TrustPickleOpt = False,
    output: OutputOpt, fmt: FormatOpt = None, max_shard_size: MaxShardSizeOpt = None, shards: ShardsOpt = None,
    dtype: DtypeOpt = None,
    accum_dtype: AccumDtypeOpt = AccumDtype.FLOAT64, device: DeviceOpt = "cpu", allow_nonfinite: AllowNonfiniteOpt = False,
    verify: VerifyOpt = False, force: ForceOpt = False, json_out: JsonOpt = False, quiet: QuietOpt = False,
    container: ContainerOpt = False, keep_training_state: KeepTrainingStateOpt = False,
    bn_model: BnModelOpt = None, bn_data: BnDataOpt = None, bn_batches: BnBatchesOpt = None,
    bn_batch_size: BnBatchSizeOpt = 32, bn_forward: BnForwardOpt = None,
    a: GraftAOpt = GRAFT_A, c: GraftCOpt = GRAFT_C, bins: GraftBinsOpt = GRAFT_BINS,
    mode: GraftModeOpt = GRAFT_MODE, groups: GraftGroupsOpt = GRAFT_GROUPS, round_digits: RoundDigitsOpt = "2",
    window: WindowOpt = None, stride: StrideOpt = None,
    eval: RowEvalOpt = None, eval_mode: EvalModeOpt = SoupMode.MAX, keep: KeepOpt = None,
) -> None:
    """Entropy-weighted filter grafting: each layer weighted by the information its weights carry.

    Number and name options take comma lists: one output per value, from one read.

    Example:
      ckptavg graft a.pt b.pt -o grafted.safetensors

    Paper: arXiv:2001.05868
    """
    plan = builders.graft_plan(a, c, bins, mode, groups, round_digits)
    average(inputs, builders.windowed(plan, window, stride),
            selection(last, best, metric, metric_mode, start, every, upto, order),
            loading(key, keep_prefix, trust_pickle, component, strip_prefix, add_prefix),
            Destination(output, max_shard_size, shards, dtype, accum_dtype, device, allow_nonfinite=allow_nonfinite,
                        verify=verify, force=force, json_out=json_out, quiet=quiet, fmt=fmt,
                        container=container, keep_training_state=keep_training_state),
            batchnorm(bn_model, bn_data, bn_batches, bn_batch_size, bn_forward), builders.evaluation(eval, eval_mode, keep))


def linear(
    inputs: InputsArg, *,
    last: LastOpt = None, best: BestOpt = None, metric: MetricOpt = None, metric_mode: MetricModeOpt = None,
    start: StartOpt = None, every: EveryOpt = None, upto: UptoOpt = None, order: OrderOpt = Order.AUTO,
    key: KeyOpt = None, component: ComponentOpt = None, strip_prefix: StripPrefixOpt = None,
    add_prefix: AddPrefixOpt = None, keep_prefix: KeepPrefixOpt = False, trust_pickle: TrustPickleOpt = False,
    output: OutputOpt, fmt: FormatOpt = None, max_shard_size: MaxShardSizeOpt = None, shards: ShardsOpt = None,
    dtype: DtypeOpt = None,
    accum_dtype: AccumDtypeOpt = AccumDtype.FLOAT64, device: DeviceOpt = "cpu", allow_nonfinite: AllowNonfiniteOpt = False,
    verify: VerifyOpt = False, force: ForceOpt = False, json_out: JsonOpt = False, quiet: QuietOpt = False,
    container: ContainerOpt = False, keep_training_state: KeepTrainingStateOpt = False,
    bn_model: BnModelOpt = None, bn_data: BnDataOpt = None, bn_batches: BnBatchesOpt = None,
    bn_batch_size: BnBatchSizeOpt = 32, bn_forward: BnForwardOpt = None,
    weights: WeightsOpt, normalize: NormalizeOpt = False, lr_power: LrPowerOpt = None, hold: LrHoldOpt = None,
    window: WindowOpt = None, stride: StrideOpt = None,
    eval: RowEvalOpt = None, eval_mode: EvalModeOpt = SoupMode.MAX, keep: KeepOpt = None,
) -> None:
    """Average with your own weights, one per selected checkpoint.

    With --weights lr: Average weighted by each checkpoint's learning rate, summed over its block of steps. The
    rates come from trainer_state.json's log, or the optimizer or scheduler state; `ckptavg plan linear
    --weights lr` shows each and its source.

    Examples:
      ckptavg linear a.pt b.pt c.pt --weights 0.2,0.3,0.5 -o out.safetensors
      ckptavg linear runs/ --weights lr --lr-power 2 -o lr2.safetensors

    Paper: Nemirovski et al. 2009 (step-size-weighted averaging); arXiv:2405.15682 (schedule-free, lr^2)
    """
    plan = builders.linear_plan(weights, normalize, lr_power, hold)
    average(inputs, builders.windowed(plan, window, stride),
            selection(last, best, metric, metric_mode, start, every, upto, order),
            loading(key, keep_prefix, trust_pickle, component, strip_prefix, add_prefix),
            Destination(output, max_shard_size, shards, dtype, accum_dtype, device, allow_nonfinite=allow_nonfinite,
                        verify=verify, force=force, json_out=json_out, quiet=quiet, fmt=fmt,
                        container=container, keep_training_state=keep_training_state),
            batchnorm(bn_model, bn_data, bn_batches, bn_batch_size, bn_forward), builders.evaluation(eval, eval_mode, keep))


def soup(
    inputs: InputsArg, *,
    last: LastOpt = None, best: BestOpt = None, metric: MetricOpt = None, metric_mode: MetricModeOnlyOpt = None,
    start: StartOpt = None, every: EveryOpt = None, upto: UptoOpt = None, order: OrderOpt = Order.AUTO,
    key: KeyOpt = None, component: ComponentOpt = None, strip_prefix: StripPrefixOpt = None,
    add_prefix: AddPrefixOpt = None, keep_prefix: KeepPrefixOpt = False, trust_pickle: TrustPickleOpt = False,
    output: OutputOpt, fmt: FormatOpt = None, max_shard_size: MaxShardSizeOpt = None, shards: ShardsOpt = None,
    dtype: DtypeOpt = None,
    accum_dtype: AccumDtypeOpt = AccumDtype.FLOAT64, device: DeviceOpt = "cpu", allow_nonfinite: AllowNonfiniteOpt = False,
    verify: VerifyOpt = False, force: ForceOpt = False, json_out: JsonOpt = False, quiet: QuietOpt = False,
    container: ContainerOpt = False, keep_training_state: KeepTrainingStateOpt = False,
    bn_model: BnModelOpt = None, bn_data: BnDataOpt = None, bn_batches: BnBatchesOpt = None,
    bn_batch_size: BnBatchSizeOpt = 32, bn_forward: BnForwardOpt = None,
    eval: EvalOpt = None, mode: SoupModeOpt = SoupMode.MAX, uniform: UniformOpt = False, strict: StrictOpt = False,
    window: WindowOpt = None, stride: StrideOpt = None, keep: SoupKeepOpt = None,
) -> None:
    """Model soup: greedy (keep a checkpoint only if the average scores no worse) or uniform.

    Example:
      ckptavg soup runs/ --eval evals.py:accuracy -o soup.safetensors

    Paper: arXiv:2203.05482
    """
    plan = builders.soup_plan(eval, mode, uniform, strict)
    average(inputs, builders.windowed(plan, window, stride),
            selection(last, best, metric, metric_mode, start, every, upto, order),
            loading(key, keep_prefix, trust_pickle, component, strip_prefix, add_prefix),
            Destination(output, max_shard_size, shards, dtype, accum_dtype, device, allow_nonfinite=allow_nonfinite,
                        verify=verify, force=force, json_out=json_out, quiet=quiet, fmt=fmt,
                        container=container, keep_training_state=keep_training_state),
            batchnorm(bn_model, bn_data, bn_batches, bn_batch_size, bn_forward), builders.soup_evaluation(eval, mode, keep))


COMMANDS: dict[str, Callable[..., None]] = {"swa": swa, "ema": ema, "graft": graft, "linear": linear, "soup": soup}
"""The averaging commands of this module; `posthoc.py` has wsm and phema (`ckptavg.methods.PLANS`: a plan's
`command` says which command reaches it when it has none of its own)."""
