"""`ckptavg bn`: recompute the BatchNorm statistics of existing weights."""

from __future__ import annotations

from typing import Annotated

import typer

from .options import (
    AccumDtype,
    AccumDtypeOpt,
    AddPrefixOpt,
    AllowNonfiniteOpt,
    BnBatchesOpt,
    BnBatchSizeOpt,
    BnDataRequiredOpt,
    BnForwardOpt,
    BnModelRequiredOpt,
    ComponentOpt,
    DeviceOpt,
    DtypeOpt,
    ForceOpt,
    FormatOpt,
    JsonOpt,
    KeepPrefixOpt,
    KeyOpt,
    MaxShardSizeOpt,
    OutputOpt,
    QuietOpt,
    ShardsOpt,
    StripPrefixOpt,
    TrustPickleOpt,
    VerifyOpt,
)
from .values import Destination, average, batchnorm, loading

WeightsArg = Annotated[list[str], typer.Argument(
    metavar="WEIGHTS", show_default=False, help="One weights file or checkpoint (a file, folder or glob matching one).")]


def bn(
    inputs: WeightsArg, *,
    key: KeyOpt = None, component: ComponentOpt = None, strip_prefix: StripPrefixOpt = None,
    add_prefix: AddPrefixOpt = None, keep_prefix: KeepPrefixOpt = False, trust_pickle: TrustPickleOpt = False,
    output: OutputOpt, fmt: FormatOpt = None, max_shard_size: MaxShardSizeOpt = None, shards: ShardsOpt = None,
    dtype: DtypeOpt = None,
    accum_dtype: AccumDtypeOpt = AccumDtype.FLOAT64, device: DeviceOpt = "cpu", allow_nonfinite: AllowNonfiniteOpt = False,
    verify: VerifyOpt = False, force: ForceOpt = False, json_out: JsonOpt = False, quiet: QuietOpt = False,
    bn_model: BnModelRequiredOpt, bn_data: BnDataRequiredOpt, bn_batches: BnBatchesOpt = None,
    bn_batch_size: BnBatchSizeOpt = 32, bn_forward: BnForwardOpt = None,
) -> None:
    """Recompute the BatchNorm statistics of existing weights (torch.optim.swa_utils.update_bn semantics).

    Example:
      ckptavg bn avg.safetensors -o avg-bn.safetensors --bn-model models.py:build --bn-data data.py:loader
    """
    from ..errors import BatchNormError
    from ..methods.uniform import Copy
    from ..select import Selection

    if len(inputs) != 1:
        raise BatchNormError(f"ckptavg bn takes one weights file or checkpoint, not {len(inputs)}.")
    average(inputs, Copy(), Selection(), loading(key, keep_prefix, trust_pickle, component, strip_prefix, add_prefix),
            Destination(output, max_shard_size, shards, dtype, accum_dtype, device, allow_nonfinite=allow_nonfinite,
                        verify=verify, force=force, json_out=json_out, quiet=quiet, fmt=fmt),
            batchnorm(bn_model, bn_data, bn_batches, bn_batch_size, bn_forward))
