"""The `ckptavg` Typer app: its commands, one error style for every failure, and `main()`.

Every failure ends as one line on stderr that starts with `Error: `: a usage error (unknown option, missing
argument, bad choice or number) exits 2, a ckptavg error (bad input) exits 1, an interrupt exits 130.
"""

from __future__ import annotations

import gc
import os
import signal
import sys
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Annotated, Any, Protocol, cast

import typer
from typer.core import TyperCommand, TyperGroup

from .._version import __version__
from ..errors import CkptavgError, CkptavgWarning, one_line
from . import average, plan, posthoc
from .bn import bn
from .inspect import inspect
from .options import PARAM_FLAGS
from .values import lead


class _ClickError(Protocol):
    """What the option parser's errors carry (click's `ClickException`)."""

    exit_code: int

    def format_message(self) -> str: ...


# click's base exception, reached through typer's public `BadParameter`: typer vendors click under a private
# name since 0.2x and depended on click before, and in both the class is click's `ClickException`.
_PARSER_ERROR: type[Exception] = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


class CommandGroup(TyperGroup):
    """The root command group: runs a command and turns each kind of failure into one `Error:` line."""

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, windows_expand_args: bool = True, **extra: Any) -> Any:
        """Parse and run like click's `main`, with the parser's errors printed as one `Error:` line (exit 2)."""
        try:
            code = super().main(args, prog_name, complete_var, False, windows_expand_args, **extra)
        except _PARSER_ERROR as e:
            code = _usage_error(cast(_ClickError, e), getattr(e, "ctx", None))
        except typer.Abort:
            print("Error: aborted.", file=sys.stderr)
            code = 1
        if not standalone_mode:
            return code
        sys.exit(code if isinstance(code, int) else 0)

    def invoke(self, ctx: Any) -> Any:  # click.Context: typer exports only its subclass
        """Run the command: ckptavg errors exit 1, Ctrl-C (or SIGTERM) 130, each with its `Error:` line."""
        with _warnings_as_lines():
            try:
                return super().invoke(ctx)
            except CkptavgError as e:
                if os.environ.get("CKPTAVG_DEBUG") == "1":
                    raise
                if lead():  # under torchrun every rank fails together; rank 0 alone says why
                    print(f"Error: {one_line(e.with_names(PARAM_FLAGS))}", file=sys.stderr)
                raise typer.Exit(1) from None
            except KeyboardInterrupt:
                # "no partial output", not "nothing": a Ctrl-C just after the final rename leaves the complete file
                print("Error: interrupted; no partial output was left behind.", file=sys.stderr)
                raise typer.Exit(130) from None


class Command(TyperCommand):
    """A command whose usage line reads `INPUTS...` for a required argument, not typer's `{INPUTS...}`."""

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        """The pieces of the usage line, without typer's braces around required arguments."""
        pieces: list[str] = super().collect_usage_pieces(ctx)
        return [p[1:-1] if p.startswith("{") and p.endswith("}") else p for p in pieces]


def _usage_error(e: _ClickError, ctx: Any) -> int:
    """Print a parser error as one line, with where to find the right spelling."""
    message = " ".join(line.strip() for line in e.format_message().splitlines() if line.strip())
    if ctx is not None and e.exit_code == 2:
        message = f"{message.rstrip('.')}. See '{ctx.command_path} --help'."
    print(f"Error: {one_line(message)}", file=sys.stderr)
    return e.exit_code


@contextmanager
def _warnings_as_lines() -> Iterator[None]:
    """Show each distinct warning once, as a `Warning:` line on stderr (by rank 0 only, in a torchrun job: every
    rank plans the same run and would say the same)."""
    seen: set[str] = set()

    def show(message: Warning | str, *_: object, **__: object) -> None:
        text = one_line(message.with_names(PARAM_FLAGS) if isinstance(message, CkptavgWarning) else str(message))
        if text not in seen and lead():
            seen.add(text)
            print(f"Warning: {text}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.simplefilter("always", CkptavgWarning)  # ours are part of the output, whatever -W says
        warnings.showwarning = show
        yield


app = typer.Typer(
    name="ckptavg",
    cls=CommandGroup,
    add_completion=False,
    pretty_exceptions_show_locals=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
plan_app = typer.Typer(help=plan.HELP)


def _print_help(ctx: typer.Context) -> None:
    text = ctx.get_help()  # rich help prints itself and returns ""
    if text:
        typer.echo(text)


def _version(value: bool) -> None:
    if value:
        print(f"ckptavg {__version__}")
        raise typer.Exit()


@app.callback(invoke_without_command=True)
def root(
    ctx: typer.Context,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """Average PyTorch checkpoints after training (SWA, EMA, WSM, post-hoc EMA, grafting, soups), streaming tensor
    by tensor.

    Example:
      ckptavg swa runs/ --last 5 -o avg.safetensors

    Without a command, ckptavg prints this help and exits 0.
    """
    if ctx.invoked_subcommand is None:
        _print_help(ctx)


@plan_app.callback(invoke_without_command=True)
def plan_root(ctx: typer.Context) -> None:
    """Without a method: print the help and exit 0."""
    if ctx.invoked_subcommand is None:
        _print_help(ctx)


for _name, _command in (average.COMMANDS | posthoc.COMMANDS).items():
    app.command(_name, cls=Command)(_command)
app.command("bn", cls=Command)(bn)
app.command("inspect", cls=Command)(inspect)
for _name, _command in plan.COMMANDS.items():
    plan_app.command(_name, cls=Command)(_command)
app.add_typer(plan_app, name="plan")


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # unwinds like Ctrl-C, so the writer removes its temp file


def main() -> None:
    """Entry point of the `ckptavg` command."""
    # Freeze what is imported so far; an averaging run freezes again once torch is in (cli/values.py), so
    # the collector never walks torch's ~500k long-lived objects mid-run (bench/RESULTS.md).
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
