"""The averaging commands of schedules and snapshots: `wsm` (merge weights that emulate a learning-rate decay)
and `phema` (EDM2 post-hoc EMA from stored EMA snapshots). Their `plan` twins are in `plan.py`."""

from __future__ import annotations

from collections.abc import Callable

from . import builders
from .method_options import (
    SCHEDULE,
    AtStepOpt,
    ByStepOpt,
    EvalModeOpt,
    FactorOpt,
    FinalOpt,
    GammaOpt,
    KeepOpt,
    MilestonesOpt,
    RawOpt,
    ReverseOpt,
    RowEvalOpt,
    ScheduleOpt,
    SnapshotGammaOpt,
    SnapshotSigmaRelOpt,
    StrideOpt,
    TargetSigmaRelOpt,
    TimescaleOpt,
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


def wsm(
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
    schedule: ScheduleOpt = SCHEDULE, final: FinalOpt = None, factor: FactorOpt = None,
    milestones: MilestonesOpt = None, gamma: GammaOpt = None, timescale: TimescaleOpt = None,
    reverse: ReverseOpt = False, by_step: ByStepOpt = False, window: WindowOpt = None, stride: StrideOpt = None,
    eval: RowEvalOpt = None, eval_mode: EvalModeOpt = SoupMode.MAX, keep: KeepOpt = None,
) -> None:
    """Merge weights that emulate a learning-rate decay over the checkpoints (WSM).

    The shape f is evaluated at x_i = i/n (or step fractions with --by-step) and turned into coefficients as
    Megatron-LM's schedule_to_merge_coefficients: c_i = f(x_i) - f(x_i+1), the newest gets f(x_n-1), the
    oldest the rest. Number and name options take comma lists: one output per value.

    Examples:
      ckptavg wsm runs/ --last 8 --schedule minus-sqrt -o wsm.safetensors
      ckptavg wsm runs/ --schedule cosine --final 0.1 -o wsm.safetensors

    Paper: arXiv:2507.17634 (WSM); Megatron-LM tools/checkpoint/weighted_merge.py
    """
    plan = builders.wsm_plan(schedule, final, factor, milestones, gamma, timescale, reverse, by_step)
    average(inputs, builders.windowed(plan, window, stride),
            selection(last, best, metric, metric_mode, start, every, upto, order),
            loading(key, keep_prefix, trust_pickle, component, strip_prefix, add_prefix),
            Destination(output, max_shard_size, shards, dtype, accum_dtype, device, allow_nonfinite=allow_nonfinite,
                        verify=verify, force=force, json_out=json_out, quiet=quiet, fmt=fmt,
                        container=container, keep_training_state=keep_training_state),
            batchnorm(bn_model, bn_data, bn_batches, bn_batch_size, bn_forward), builders.evaluation(eval, eval_mode, keep))


def phema(
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
    sigma_rel: TargetSigmaRelOpt, snapshot_sigma_rel: SnapshotSigmaRelOpt = None,
    snapshot_gamma: SnapshotGammaOpt = None, at_step: AtStepOpt = None, raw: RawOpt = False,
    window: WindowOpt = None, stride: StrideOpt = None,
    eval: RowEvalOpt = None, eval_mode: EvalModeOpt = SoupMode.MAX, keep: KeepOpt = None,
) -> None:
    """Synthesise any power-function EMA from stored EMA snapshots (EDM2 post-hoc EMA).

    Inputs are snapshots of power-function EMAs (EDM2 files, or ema-pytorch PostHocEMA's {index}.{step}.pt
    with --snapshot-sigma-rel); the weights solve EDM2's least squares and may be negative. Counters
    (step, initted, num_batches_tracked) are copied from the newest snapshot used, never combined.
    PostHocEMA stores float16: add --dtype float32 for its float32 result.

    Examples:
      ckptavg phema posthoc/ --snapshot-sigma-rel 0.05,0.28 --sigma-rel 0.15 -o ema15.safetensors
      ckptavg phema snapshots/ --sigma-rel 0.05,0.1 -o 'phema-{sigma_rel}.safetensors'

    Paper: arXiv:2312.02696
    """
    plan = builders.phema_plan(sigma_rel, snapshot_sigma_rel, snapshot_gamma, at_step, raw)
    average(inputs, builders.windowed(plan, window, stride),
            selection(last, best, metric, metric_mode, start, every, upto, order),
            loading(key, keep_prefix, trust_pickle, component, strip_prefix, add_prefix),
            Destination(output, max_shard_size, shards, dtype, accum_dtype, device, allow_nonfinite=allow_nonfinite,
                        verify=verify, force=force, json_out=json_out, quiet=quiet, fmt=fmt,
                        container=container, keep_training_state=keep_training_state),
            batchnorm(bn_model, bn_data, bn_batches, bn_batch_size, bn_forward), builders.evaluation(eval, eval_mode, keep))


COMMANDS: dict[str, Callable[..., None]] = {"wsm": wsm, "phema": phema}
"""The averaging commands of this module."""
