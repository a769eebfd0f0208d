"""The common command-line options (inputs, selection, loading, output, BatchNorm), each written once as an
`Annotated` alias, the choice lists, and the parameter -> flag table; the method options are in
`method_options.py`.

Commands are plain functions whose parameters use these aliases, so `ckptavg ema` and `ckptavg plan ema`
declare `--decay` with the same text, range and panel. Nothing here imports torch: `--help` must stay
fast, so the choice lists are spelled out and `tests/test_cli_commands.py` checks them against the
library's tuples.
"""

from __future__ import annotations

from enum import Enum
from typing import Annotated

import typer

SELECTION, LOADING, OUTPUT, BATCHNORM, METHOD = "Selection", "Loading", "Output", "BatchNorm", "Method"
EVALUATION = "Evaluation"


class Order(str, Enum):
    """`ckptavg.select.ORDERS`."""

    AUTO = "auto"
    STEP = "step"
    EPOCH = "epoch"
    NAME = "name"
    MTIME = "mtime"


class MetricMode(str, Enum):
    """Direction of `--best`."""

    MIN = "min"
    MAX = "max"


class OutDtype(str, Enum):
    """The keys of `ckptavg.layout.OUT_DTYPES`."""

    FLOAT32 = "float32"
    FLOAT16 = "float16"
    BFLOAT16 = "bfloat16"


class AccumDtype(str, Enum):
    """The keys of `ckptavg.layout.ACCUM_DTYPES`."""

    FLOAT64 = "float64"
    FLOAT32 = "float32"


class Format(str, Enum):
    """The keys of `ckptavg.write.options.FORMATS`."""

    SAFETENSORS = "safetensors"
    TORCH = "torch"
    DCP = "dcp"


class LoraMode(str, Enum):
    """`ckptavg.methods.lora.MODES`."""

    SVD = "svd"
    CONCAT = "concat"
    FACTORS = "factors"
    MERGE = "merge"


class Shards(str, Enum):
    """How to shard an output folder."""

    LIKE_INPUT = "like-input"


class Per(str, Enum):
    """What one `--decay` update stands for."""

    CHECKPOINT = "checkpoint"
    STEP = "step"


class Hold(str, Enum):
    """`ckptavg.methods.schedules.HOLDS`."""

    BACKWARD = "backward"
    MIDPOINT = "midpoint"
    FORWARD = "forward"


class Init(str, Enum):
    """`ckptavg.methods.schedules.INITS`."""

    FIRST = "first"
    BIAS_CORRECT = "bias-correct"
    ZERO = "zero"


class GraftMode(str, Enum):
    """`ckptavg.methods.graft.MODES`."""

    PAIRWISE = "pairwise"
    CYCLIC = "cyclic"
    SEQUENTIAL = "sequential"


class GraftGroups(str, Enum):
    """`ckptavg.methods.graft.GROUPINGS`."""

    AUTO = "auto"
    CONV = "conv"


class SoupMode(str, Enum):
    """Direction of a soup's score, and of --eval's (`--eval-mode`)."""

    MAX = "max"
    MIN = "min"


class Keep(str, Enum):
    """Which evaluated outputs to write."""

    BEST = "best"
    ALL = "all"


class Schedule(str, Enum):
    """`ckptavg.methods.wsm.SHAPES`."""

    LINEAR = "linear"
    MINUS_SQRT = "minus-sqrt"
    COSINE = "cosine"
    EXPONENTIAL = "exponential"
    STEP = "step"
    INVERSE_SQRT = "inverse-sqrt"


# ---------------------------------------------------------------- inputs and selection

InputsArg = Annotated[list[str], typer.Argument(
    metavar="INPUTS...", show_default=False,
    help="Checkpoint files, directories or glob patterns (quote a glob to let ckptavg expand it).")]
LastOpt = Annotated[int | None, typer.Option(min=1, metavar="K", rich_help_panel=SELECTION, help="Keep the newest K checkpoints.")]
BestOpt = Annotated[int | None, typer.Option(
    min=1, metavar="K", rich_help_panel=SELECTION, help="Keep the K best checkpoints by --metric.")]
MetricOpt = Annotated[str | None, typer.Option(
    metavar="NAME", rich_help_panel=SELECTION,
    help="Metric for --best, from the checkpoint, trainer_state.json or the file name (val_loss=0.231).")]
_METRIC_MODE = "With --best: min if lower is better (losses), max if higher is better."
MetricModeOpt = Annotated[MetricMode | None, typer.Option("--metric-mode", "--mode", rich_help_panel=SELECTION, help=_METRIC_MODE)]
# graft and soup have a --mode of their own
MetricModeOnlyOpt = Annotated[MetricMode | None, typer.Option("--metric-mode", rich_help_panel=SELECTION, help=_METRIC_MODE)]
StartOpt = Annotated[str | None, typer.Option(
    metavar="S", rich_help_panel=SELECTION, help="Integer: keep checkpoints with epoch (or step, without epochs) >= S. "
    "Fraction 0<S<1: drop the first floor(S*N), like Lightning's swa_epoch_start.")]
EveryOpt = Annotated[int | None, typer.Option(min=1, metavar="N", rich_help_panel=SELECTION, help="Keep every N-th checkpoint.")]
UptoOpt = Annotated[int | None, typer.Option(min=0, metavar="STEP", rich_help_panel=SELECTION, help="Keep checkpoints with step <= STEP.")]
OrderOpt = Annotated[Order, typer.Option(
    metavar="ORDER", rich_help_panel=SELECTION,
    help="auto (by step, else epoch, else natural file name), step, epoch, name or mtime.")]

# ---------------------------------------------------------------- loading

KeyOpt = Annotated[str | None, typer.Option(
    metavar="PATH", rich_help_panel=LOADING,
    help="Dotted path of the weights in a training checkpoint, e.g. state_dict_ema. Default: the usual places "
    "(state_dict, model, module, ...).")]
ComponentOpt = Annotated[str | None, typer.Option(
    metavar="NAME", rich_help_panel=LOADING,
    help="The model to average when there are several (model_1, unet_ema).")]
StripPrefixOpt = Annotated[str | None, typer.Option(
    metavar="P", rich_help_panel=LOADING, help="Remove prefix P (e.g. model.) from every name.")]
AddPrefixOpt = Annotated[str | None, typer.Option(
    metavar="P", rich_help_panel=LOADING, help="Put prefix P before every name.")]
KeepPrefixOpt = Annotated[bool, typer.Option(
    "--keep-prefix", rich_help_panel=LOADING,
    help="Keep a module. (DDP) or _orig_mod. (torch.compile) prefix shared by every key.")]
TrustPickleOpt = Annotated[bool, typer.Option(
    "--trust-pickle", rich_help_panel=LOADING,
    help="Allow full unpickling, which can run code from the file. Only for files you trust.")]

# ---------------------------------------------------------------- output

OutputOpt = Annotated[str, typer.Option(
    "--output", "-o", metavar="PATH", show_default=False, rich_help_panel=OUTPUT,
    help="A .safetensors or torch (.pt, .pth, .bin, .ckpt) file, or DIR/ for a folder in the inputs' layout "
    "(Hugging Face, diffusers, PEFT, DCP, Megatron). Several outputs: a template ('ema-{decay}.pt') or a folder.")]
FormatOpt = Annotated[Format | None, typer.Option(
    "--format", metavar="FORMAT", rich_help_panel=OUTPUT,
    help="safetensors, torch (.pt) or dcp (DCP folder). Default: from -o.")]
MaxShardSizeOpt = Annotated[str | None, typer.Option(
    metavar="SIZE", rich_help_panel=OUTPUT,
    help="Write a folder of safetensors shards of at most SIZE (5GB, 500MB, 2GiB) and their index.")]
ShardsOpt = Annotated[Shards | None, typer.Option(
    metavar="like-input", rich_help_panel=OUTPUT,
    help="Shard the output folder exactly like the first input (a sharded Hugging Face folder).")]
DtypeOpt = Annotated[OutDtype | None, typer.Option(
    metavar="DTYPE", rich_help_panel=OUTPUT,
    help="Output dtype of floating tensors: float32, float16 or bfloat16. Default: each tensor's input dtype.")]
AccumDtypeOpt = Annotated[AccumDtype, typer.Option(
    metavar="DTYPE", rich_help_panel=OUTPUT,
    help="Accumulator: float64 or float32 (never narrower than the input).")]
DeviceOpt = Annotated[str, typer.Option(
    metavar="DEV", rich_help_panel=OUTPUT,
    help="cpu, cuda or cuda:N: where the arithmetic and the BatchNorm pass run (files stay on the host).")]
AllowNonfiniteOpt = Annotated[bool, typer.Option(
    "--allow-nonfinite", rich_help_panel=OUTPUT, help="Average NaN/Inf values instead of refusing them.")]
VerifyOpt = Annotated[bool, typer.Option(
    "--verify", rich_help_panel=OUTPUT,
    help="Re-open the written files and check every tensor before reporting success.")]
ContainerOpt = Annotated[bool, typer.Option(
    "--container", rich_help_panel=OUTPUT,
    help="Copy the newest input's checkpoint, weights averaged.")]
KeepTrainingStateOpt = Annotated[bool, typer.Option(
    "--keep-state", rich_help_panel=OUTPUT, help="--container: keep optimizer, RNG.")]
ForceOpt = Annotated[bool, typer.Option("--force", "-f", rich_help_panel=OUTPUT, help="Overwrite an existing output.")]
LoraOpt = Annotated[LoraMode | None, typer.Option(
    metavar="MODE", rich_help_panel=OUTPUT,
    help="LoRA: svd (default), concat (exact), factors or merge.")]
LoraRankOpt = Annotated[int | None, typer.Option(
    min=1, metavar="N", rich_help_panel=OUTPUT, help="Rank of --lora svd (default: r).")]
BaseOpt = Annotated[str | None, typer.Option(
    metavar="MODEL", rich_help_panel=OUTPUT, help="Base model of --lora merge.")]
JsonOpt = Annotated[bool, typer.Option("--json", rich_help_panel=OUTPUT, help="Print JSON instead of text.")]
QuietOpt = Annotated[bool, typer.Option(
    "--quiet", "-q", rich_help_panel=OUTPUT, help="No progress bar and no summary (warnings and errors still print).")]

# ---------------------------------------------------------------- BatchNorm

_BN_MODEL = "MODULE:FACTORY (or file.py:FACTORY) returning the nn.Module whose BatchNorm statistics to recompute."
_BN_DATA = ("MODULE:FACTORY returning an iterable of batches, or a safetensors/torch file holding one input "
            "tensor.")
BnModelOpt = Annotated[str | None, typer.Option(metavar="MOD:FN", rich_help_panel=BATCHNORM, help=_BN_MODEL)]
BnDataOpt = Annotated[str | None, typer.Option(metavar="SPEC", rich_help_panel=BATCHNORM, help=_BN_DATA)]
BnModelRequiredOpt = Annotated[str, typer.Option(
    metavar="MOD:FN", show_default=False, rich_help_panel=BATCHNORM, help=_BN_MODEL)]  # `ckptavg bn`
BnDataRequiredOpt = Annotated[str, typer.Option(
    metavar="SPEC", show_default=False, rich_help_panel=BATCHNORM, help=_BN_DATA)]
BnBatchesOpt = Annotated[int | None, typer.Option(
    min=1, metavar="N", rich_help_panel=BATCHNORM, help="Stop after N batches.")]
BnBatchSizeOpt = Annotated[int, typer.Option(
    min=1, metavar="N", rich_help_panel=BATCHNORM, help="Batch size for a --bn-data file.")]
BnForwardOpt = Annotated[str | None, typer.Option(
    metavar="MOD:FN", rich_help_panel=BATCHNORM,
    help="MODULE:FUNCTION called as fn(model, batch), for models that take dicts or several inputs.")]

PARAM_FLAGS: dict[str, str] = {
    # selection (ckptavg.select.Selection: its `mode` is --metric-mode; graft's and soup's `mode` is --mode)
    "inputs": "INPUTS", "last": "--last", "best": "--best", "metric": "--metric", "metric_mode": "--metric-mode",
    "start": "--start", "every": "--every", "upto": "--upto", "order": "--order", "select.mode": "--metric-mode",
    # loading (LoadOptions)
    "key": "--key", "keep_prefix": "--keep-prefix", "trust_pickle": "--trust-pickle", "component": "--component",
    "strip_prefix": "--strip-prefix", "add_prefix": "--add-prefix",
    # output (average_checkpoints)
    "output": "--output", "format": "--format", "fmt": "--format", "max_shard_size": "--max-shard-size", "shards": "--shards",
    "shards_like_input": "--shards like-input", "dtype": "--dtype", "accum_dtype": "--accum-dtype",
    "device": "--device", "allow_nonfinite": "--allow-nonfinite", "verify": "--verify", "force": "--force",
    "container": "--container", "keep_training_state": "--keep-state",
    "lora": "--lora", "lora.rank": "--lora-rank", "lora_rank": "--lora-rank", "base": "--base",
    # BatchNorm (BatchNormOptions fields, and the command's own names)
    "bn_model": "--bn-model", "bn_data": "--bn-data", "bn_batches": "--bn-batches", "bn_batch_size": "--bn-batch-size",
    "bn_forward": "--bn-forward", "model": "--bn-model", "data": "--bn-data", "batches": "--bn-batches",
    "batch_size": "--bn-batch-size", "forward": "--bn-forward", "bn": "the --bn-* options", "bn.model": "--bn-model",
    "bn.data": "--bn-data", "bn.batches": "--bn-batches", "bn.batch_size": "--bn-batch-size", "bn.forward": "--bn-forward",
    # ema
    "decay": "--decay", "per": "--per", "step_decay": "--step-decay", "sigma_rel": "--sigma-rel", "warmup": "--warmup",
    "warmup_gamma": "--warmup-gamma", "warmup_power": "--warmup-power", "min_decay": "--min-decay",
    "update_after_step": "--update-after-step", "hold": "--hold", "init": "--init",
    # graft
    "a": "--a", "c": "--c", "bins": "--bins", "mode": "--mode", "groups": "--groups", "round_digits": "--round-digits",
    # linear (Linear.values is --weights)
    "weights": "--weights", "values": "--weights", "normalize": "--normalize",
    # soup (Soup.evaluate is --eval)
    "eval": "--eval", "evaluate": "--eval", "uniform": "--uniform", "strict": "--strict",
    # wsm
    "schedule": "--schedule", "final": "--final", "factor": "--factor", "milestones": "--milestones",
    "gamma": "--gamma", "timescale": "--timescale", "reverse": "--reverse", "by_step": "--by-step",
    # linear --weights lr (LrWeighted)
    "lr_power": "--lr-power",
    # phema (Phema.normalize is the opposite of --raw)
    "snapshot_sigma_rel": "--snapshot-sigma-rel", "snapshot_gamma": "--snapshot-gamma", "at_step": "--at-step",
    "raw": "--raw",
    # windows, evaluation of the outputs (RowEvaluation), plan --plot
    "window": "--window", "stride": "--stride", "eval_mode": "--eval-mode", "keep": "--keep", "plot": "--plot",
}
"""Library parameter name -> the flag that sets it; error messages name parameters, the CLI shows flags."""
