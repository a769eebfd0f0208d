"""The Typer command line: flags become one `ckptavg.api` call; errors become one stderr line.

Options shared by several commands are declared once, as groups of parameters, and each command's
signature is composed from the groups it needs, so `swa` and `plan swa` cannot drift apart.
"""

import enum
import gc
import inspect
import json
import os
import signal
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

from .._version import __version__
from ..api import inspect_checkpoint, plan_checkpoints
from ..bn import BatchNormOptions
from ..dist import average_checkpoints
from ..errors import BatchNormError, CkptavgError, CkptavgWarning, one_line
from ..layout import ACCUM_DTYPES, OUT_DTYPES
from ..methods.base import Plan
from ..methods.uniform import Swa
from ..read.checkpoint import LoadOptions
from ..select import ORDERS, Selection, parse_start
from .text import format_inspect, format_plan, format_summary

app = typer.Typer(
    help="Average PyTorch checkpoints after training (SWA, EMA, grafting), streaming tensor by tensor.\n\n"
    "Example: ckptavg swa runs/ --last 5 -o avg.safetensors",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
plan_app = typer.Typer(
    help="Show which checkpoints a method would use, in which order, with which weights. Reads no tensor data.",
    no_args_is_help=True,
)
app.add_typer(plan_app, name="plan")

SEL, LOAD, OUT = "Selection", "Loading", "Output"


def choices(name: str, values: Sequence[str]) -> Any:
    """A str Enum for Typer, built from the very tuple the library validates against."""
    return enum.Enum(name, [(v.replace("-", "_"), v) for v in values], type=str)


Order = choices("Order", ORDERS)
OutDtype = choices("OutDtype", list(OUT_DTYPES))
AccumDtype = choices("AccumDtype", list(ACCUM_DTYPES))
MetricMode = choices("MetricMode", ("min", "max"))
Shards = choices("Shards", ("like-input",))


def _opt(name: str, annotation: Any, default: Any) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation, default=default)


INPUTS = inspect.Parameter(
    "inputs", inspect.Parameter.POSITIONAL_OR_KEYWORD,
    annotation=Annotated[list[str], typer.Argument(
        help="Checkpoint files, directories or glob patterns (quote a glob to let ckptavg expand it).",
        show_default=False)],
)
def select_opts(mode_alias: bool) -> list[inspect.Parameter]:
    """Selection options; `--mode` is an alias of `--metric-mode` unless the method has its own --mode."""
    names = ["--metric-mode", "--mode"] if mode_alias else ["--metric-mode"]
    return [*SELECT_OPTS, _opt("metric_mode", Annotated[MetricMode | None, typer.Option(
        *names, help="With --best: min if lower is better (losses), max if higher is better.",
        rich_help_panel=SEL)], None)]


SELECT_OPTS = [
    _opt("last", Annotated[int | None, typer.Option(min=1, help="Keep the newest K checkpoints.", rich_help_panel=SEL)], None),
    _opt("best", Annotated[int | None, typer.Option(
        min=1, help="Keep the K best checkpoints by --metric (found in the checkpoint, trainer_state.json or the "
        "file name, e.g. val_loss=0.231).", rich_help_panel=SEL)], None),
    _opt("metric", Annotated[str | None, typer.Option(help="Metric name for --best.", rich_help_panel=SEL)], None),
    _opt("start", Annotated[str | None, typer.Option(
        help="Integer: keep checkpoints with epoch (or step, without epochs) >= S. Fraction 0<S<1: drop the "
        "first floor(S*N) checkpoints, like Lightning's swa_epoch_start.", rich_help_panel=SEL)], None),
    _opt("every", Annotated[int | None, typer.Option(min=1, help="Keep every N-th checkpoint.", rich_help_panel=SEL)], None),
    _opt("upto", Annotated[int | None, typer.Option(min=0, help="Keep checkpoints with step <= STEP.", rich_help_panel=SEL)], None),
    _opt("order", Annotated[Order, typer.Option(
        help="Checkpoint order. auto: by step, else epoch, else natural file name.", rich_help_panel=SEL)], Order("auto")),
]
LOAD_OPTS = [
    _opt("key", Annotated[str | None, typer.Option(
        help="Dotted path of the weights in a training checkpoint, e.g. state_dict_ema. "
        "Default: state_dict, model, model_state_dict, module, net, or the top level.", rich_help_panel=LOAD)], None),
    _opt("keep_prefix", Annotated[bool, typer.Option(
        help="Keep a module. (DDP) or _orig_mod. (torch.compile) prefix shared by every key.", rich_help_panel=LOAD)], False),
    _opt("trust_pickle", Annotated[bool, typer.Option(
        help="Allow full unpickling, which can run code from the file. Only for files you trust.", rich_help_panel=LOAD)], False),
]
DTYPE_OPT = _opt("dtype", Annotated[OutDtype | None, typer.Option(
    help="Output dtype of floating tensors. Default: each tensor's input dtype.", rich_help_panel=OUT)], None)
WRITE_OPTS = [
    _opt("output", Annotated[str, typer.Option("--output", "-o", help="Safetensors file to write, or a folder "
                                                "(DIR/ or an existing directory) for a Hugging Face style folder.",
                                                show_default=False, rich_help_panel=OUT)], inspect.Parameter.empty),
    _opt("max_shard_size", Annotated[str | None, typer.Option(
        help="Write a folder of safetensors shards of at most this size (5GB, 500MB, 2GiB) plus "
        "model.safetensors.index.json.", rich_help_panel=OUT)], None),
    _opt("shards", Annotated[Shards | None, typer.Option(
        help="like-input: shard the output folder exactly like the first input (a sharded Hugging Face folder).",
        rich_help_panel=OUT)], None),
    DTYPE_OPT,
    _opt("accum_dtype", Annotated[AccumDtype, typer.Option(
        help="Accumulator dtype (never narrower than the input: float64 inputs sum in float64).", rich_help_panel=OUT)],
        AccumDtype("float64")),
    _opt("device", Annotated[str, typer.Option(
        help="Where the arithmetic (and the BatchNorm pass) runs: cpu, cuda or cuda:N. Files are read and written "
        "on the host either way.", rich_help_panel=OUT)], "cpu"),
    _opt("allow_nonfinite", Annotated[bool, typer.Option(help="Average NaN/Inf values instead of refusing them.",
                                                         rich_help_panel=OUT)], False),
    _opt("verify", Annotated[bool, typer.Option(help="Re-open the written files and check every tensor's shape, dtype "
                                                "and finiteness before reporting success.", rich_help_panel=OUT)], False),
    _opt("force", Annotated[bool, typer.Option("--force", "-f", help="Overwrite an existing output.", rich_help_panel=OUT)], False),
    _opt("json_out", Annotated[bool, typer.Option("--json", help="Print the summary as JSON.", rich_help_panel=OUT)], False),
    _opt("quiet", Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar and no summary.", rich_help_panel=OUT)], False),
]
BN = "BatchNorm recalibration"


def bn_opts(required: bool) -> list[inspect.Parameter]:
    """The --bn-* options; `ckptavg bn` requires the model and the data, the averaging commands do not."""
    need = ... if required else None
    return [
        _opt("bn_model", Annotated[str | None, typer.Option(
            help="MODULE:FACTORY (or file.py:FACTORY) returning the nn.Module; recompute BatchNorm statistics of "
            "the result with it.", rich_help_panel=BN, show_default=False)], need),
        _opt("bn_data", Annotated[str | None, typer.Option(
            help="MODULE:FACTORY returning an iterable of batches, or a safetensors/torch file holding one input "
            "tensor.", rich_help_panel=BN, show_default=False)], need),
        _opt("bn_batches", Annotated[int | None, typer.Option(min=1, help="Stop after N batches.", rich_help_panel=BN)], None),
        _opt("bn_batch_size", Annotated[int, typer.Option(min=1, help="Batch size for a --bn-data file.", rich_help_panel=BN)], 32),
        _opt("bn_forward", Annotated[str | None, typer.Option(
            help="MODULE:FUNCTION called as fn(model, batch), for models that take dicts or several inputs.",
            rich_help_panel=BN)], None),
    ]


def _bn(kw: dict[str, Any]) -> BatchNormOptions | None:
    if kw["bn_model"] is None and kw["bn_data"] is None:
        return None
    if kw["bn_model"] is None or kw["bn_data"] is None:
        raise BatchNormError("BatchNorm recalibration needs both --bn-model and --bn-data.")
    return BatchNormOptions(kw["bn_model"], kw["bn_data"], kw["bn_batches"], kw["bn_batch_size"], kw["bn_forward"])


JSON_OPT = _opt("json_out", Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")], False)


def _with_signature(fn: Callable[..., None], params: list[inspect.Parameter]) -> Callable[..., None]:
    fn.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    fn.__annotations__ = {p.name: p.annotation for p in params}
    return fn


# Library parameter -> the flag that sets it: library messages name parameters, the command line shows flags.
PARAM_FLAGS = {
    "values": "--weights", "evaluate": "--eval", "shards_like_input": "--shards like-input",
    "bn": "the --bn-* options", "bn.model": "--bn-model", "bn.data": "--bn-data", "bn.batches": "--bn-batches",
    "bn.batch_size": "--bn-batch-size", "bn.forward": "--bn-forward", "select.mode": "--metric-mode",
} | {name: "--" + name.replace("_", "-") for name in (
    "decay", "step_decay", "sigma_rel", "warmup", "warmup_gamma", "warmup_power", "min_decay", "update_after_step",
    "hold", "init", "a", "c", "bins", "mode", "groups", "round_digits", "normalize", "uniform", "strict",
    "best", "metric", "order", "every", "last", "upto", "start", "key", "keep_prefix", "trust_pickle", "dtype",
    "accum_dtype", "device", "allow_nonfinite", "verify", "force", "max_shard_size",
)}


@contextmanager
def _errors() -> Iterator[None]:
    """Turn ckptavg errors into one `Error:` line and exit 1; warnings into `Warning:` lines."""
    seen: set[str] = set()

    def show(message: Warning | str, *_: Any, **__: Any) -> None:
        text = message.with_names(PARAM_FLAGS) if isinstance(message, CkptavgWarning) else str(message)
        if text not in seen:
            seen.add(text)
            print(f"Warning: {text}", file=sys.stderr)

    old = warnings.showwarning
    warnings.showwarning = show
    try:
        yield
    except CkptavgError as e:
        if os.environ.get("CKPTAVG_DEBUG") == "1":
            raise
        if _lead():  # under torchrun every rank fails together; rank 0 alone says why
            print(f"Error: {one_line(e.with_names(PARAM_FLAGS))}", file=sys.stderr)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        # "no partial output", not "nothing": a Ctrl-C just after the final rename leaves the complete file
        print("Error: interrupted; no partial output was left behind.", file=sys.stderr)
        raise typer.Exit(130) from None
    finally:
        warnings.showwarning = old


def _lead() -> bool:
    """False on the ranks other than 0 of a torchrun job, which print nothing."""
    return os.environ.get("RANK", "0") == "0"


def _selection(kw: dict[str, Any]) -> Selection:
    start = parse_start(kw["start"]) if kw["start"] is not None else None
    mode = kw["metric_mode"].value if kw["metric_mode"] else None
    return Selection(order=kw["order"].value, upto=kw["upto"], start=start, every=kw["every"], best=kw["best"],
                     metric=kw["metric"], mode=mode, last=kw["last"])


def _load(kw: dict[str, Any]) -> LoadOptions:
    return LoadOptions(key=kw["key"], keep_prefix=kw["keep_prefix"], trust_pickle=kw["trust_pickle"])


def _average(plan: Plan, kw: dict[str, Any], select: Selection | None = None) -> None:
    """Run one average from the parsed options and print the summary."""
    bar = _progress_bar(kw["quiet"])
    try:
        result = average_checkpoints(
            kw["inputs"], kw["output"], plan, select=select or _selection(kw), load=_load(kw),
            dtype=kw["dtype"].value if kw["dtype"] else None, accum_dtype=kw["accum_dtype"].value,
            allow_nonfinite=kw["allow_nonfinite"], force=kw["force"], progress=bar, bn=_bn(kw), device=kw["device"],
            max_shard_size=kw["max_shard_size"], shards_like_input=kw["shards"] is not None, verify=kw["verify"],
        )
    finally:
        if bar:
            bar.close()
    if not kw["quiet"] and _lead():
        print(json.dumps(result.to_json()) if kw["json_out"] else format_summary(result))


def add_method(name: str, build: Callable[..., Plan], params: list[inspect.Parameter], help: str) -> None:
    """Register `ckptavg NAME` (average) and `ckptavg plan NAME` (weights only) for one method."""
    own = [p.name for p in params]
    selection = select_opts(mode_alias="mode" not in own)

    def run(**kw: Any) -> None:
        with _errors():
            _average(build(**{k: kw[k] for k in own}), kw)

    def plan_only(**kw: Any) -> None:
        with _errors():
            report = plan_checkpoints(
                kw["inputs"], build(**{k: kw[k] for k in own}), select=_selection(kw), load=_load(kw),
                dtype=kw["dtype"].value if kw["dtype"] else None,
            )
            print(json.dumps(report.to_json(), indent=2) if kw["json_out"] else format_plan(report))

    app.command(name, help=help)(_with_signature(run, [INPUTS, *params, *selection, *LOAD_OPTS, *WRITE_OPTS, *bn_opts(required=False)]))
    plan_app.command(name, help=f"Weights of `ckptavg {name}`, without doing the work.")(
        _with_signature(plan_only, [INPUTS, *params, *selection, *LOAD_OPTS, DTYPE_OPT, JSON_OPT])
    )


class _Bar:
    """A tqdm bar on stderr fed with (done, total) byte counts."""

    def __init__(self) -> None:
        from tqdm import tqdm

        self._bar = tqdm(total=0, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr, desc="averaging")

    def __call__(self, done: int, total: int) -> None:
        self._bar.total = total
        self._bar.update(done - self._bar.n)

    def close(self) -> None:
        self._bar.close()


def _progress_bar(quiet: bool) -> _Bar | None:
    return None if quiet or not sys.stderr.isatty() or not _lead() else _Bar()



def bn_cmd(**kw: Any) -> None:
    with _errors():
        if len(kw["inputs"]) != 1:
            raise BatchNormError(f"ckptavg bn takes one weights file or checkpoint, not {len(kw['inputs'])}.")
        kw["inputs"] = kw["inputs"][:1]
        _average(Swa(), kw, select=Selection())


app.command("bn", help="Recompute the BatchNorm statistics of existing weights (torch.optim.swa_utils.update_bn "
            "semantics).\n\nExample: ckptavg bn avg.safetensors -o avg-bn.safetensors --bn-model models.py:build "
            "--bn-data data.py:loader")(
    _with_signature(bn_cmd, [INPUTS, *LOAD_OPTS, *WRITE_OPTS, *bn_opts(required=True)])
)


@app.command("inspect")
def inspect_cmd(
    path: Annotated[Path, typer.Argument(help="A checkpoint file or Hugging Face checkpoint folder.", show_default=False)],
    key: Annotated[str | None, typer.Option(help="Dotted path of the weights inside the checkpoint.")] = None,
    keep_prefix: Annotated[bool, typer.Option(help="Keep a module./_orig_mod. prefix.")] = False,
    trust_pickle: Annotated[bool, typer.Option(help="Allow full unpickling (can run code).")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Show a checkpoint's format, where its weights were found, its metadata and its tensors."""
    with _errors():
        info = inspect_checkpoint(path, LoadOptions(key=key, keep_prefix=keep_prefix, trust_pickle=trust_pickle))
        print(json.dumps(info, indent=2) if json_out else format_inspect(info))


def _version(value: bool) -> None:
    if value:
        print(f"ckptavg {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")] = False,
) -> None:
    """Average PyTorch checkpoints after training."""


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # unwinds like Ctrl-C, so the writer removes its temp file


def main() -> None:
    """Entry point of the `ckptavg` command."""
    # Everything imported so far (torch's ~500k objects) lives as long as the process: freezing it keeps
    # the collector from walking it again, which cost ~0.08 s per full collection mid-run (bench/RESULTS.md).
    gc.freeze()
    signal.signal(signal.SIGTERM, _terminate)
    for stream in (sys.stdout, sys.stderr):  # a file name that is not valid UTF-8 prints escaped, not as a traceback
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    try:
        app(prog_name="ckptavg")
        code = 0
    except SystemExit as e:  # how click ends every run, success included
        code = _exit_code(e.code)
    _exit_now(code)


def _exit_code(code: object) -> int:
    if code is None or isinstance(code, int):
        return code or 0
    print(code, file=sys.stderr)  # what sys.exit("message") would print
    return 1


def _exit_now(code: int) -> None:
    """End the process without the interpreter's teardown.

    Tearing down the modules of torch takes 0.25-0.4 s here, longer than averaging 8 x 100 MiB
    (bench/RESULTS.md). By now the output is written, fsynced and renamed, and every file is closed;
    only the standard streams still need flushing. A flush that fails (a closed pipe) gives 120, as
    Python's own exit would.
    """
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            code = code or 120
    os._exit(code)


from . import methods  # noqa: E402,F401 - registers the method commands on `app`
