"""The command line's shape: a command and a `plan` twin for every registered method, with the same options;
choice lists equal to the library's; every option in the parameter -> flag table, and library errors shown
with flags."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Any

import pytest
import typer.main
from typer.testing import CliRunner

from ckptavg.cli import options
from ckptavg.cli.app import app
from ckptavg.cli.options import PARAM_FLAGS
from ckptavg.errors import PlanError, SelectionError
from ckptavg.methods import PLANS

RUNS = Path(__file__).resolve().parent.parent / "fixtures" / "runs"
ROOT = typer.main.get_command(app)
SHAPING = {options.SELECTION, options.LOADING, options.METHOD}  # the panels of options that change the weights
CLI_ONLY = {"json_out", "quiet", "help", "version"}  # options no library call takes, so no message names them


def _command(*path: str) -> Any:
    command = ROOT
    for name in path:
        command = command.commands[name]  # type: ignore[attr-defined]
    return command


def _options(*path: str, panels: set[str] | None = None) -> dict[str, tuple[Any, ...]]:
    """Each option of a command by its flags, with what a user sees of it (type, default, help, panel)."""
    found = {}
    for p in _command(*path).params:
        panel = getattr(p, "rich_help_panel", None)
        if p.param_type_name == "option" and p.name != "help" and (panels is None or panel in panels):
            found[" ".join(p.opts)] = (p.type.name, repr(p.default), p.help, panel, p.required, p.metavar)
    return found


def _reached_by(method: str) -> str:
    """The command of a registered method: its own, or the one its plan names (lr: `linear --weights lr`)."""
    return PLANS[method].command or method


OWN = sorted(m for m in PLANS if not PLANS[m].command)  # the methods with a command of their own


@pytest.mark.parametrize("method", sorted(PLANS))
def test_every_registered_plan_has_a_command_and_a_plan_twin(method: str) -> None:
    assert _reached_by(method) in ROOT.commands  # type: ignore[attr-defined]
    assert _reached_by(method) in _command("plan").commands


def test_every_method_command_is_registered() -> None:
    commands = set(ROOT.commands) - {"bn", "inspect", "plan"}  # type: ignore[attr-defined]
    assert commands == set(OWN) == set(_command("plan").commands)
    assert {_reached_by(m) for m in PLANS} == commands


@pytest.mark.parametrize("method", sorted(PLANS))
def test_help_comes_from_the_registry(method: str) -> None:
    """A command's first paragraph is its plan's summary; a method reached through another command (lr) has
    its summary in that command's help, after the option that reaches it."""
    plan = PLANS[method]
    help_text = _command(_reached_by(method)).help
    if plan.command:
        assert f"With --weights {method}: {plan.summary}" in " ".join(help_text.split())
    else:
        assert help_text.split("\n\n")[0] == plan.summary
    if plan.paper:
        assert f"Paper: {plan.paper}" in help_text


def test_linear_weights_lr_reaches_the_lr_plan() -> None:
    import json

    result = CliRunner().invoke(app, ["plan", "linear", str(RUNS / "hf"), "--weights", "lr", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["method"] == "lr"


@pytest.mark.parametrize("method", OWN)
def test_method_command_and_plan_twin_take_the_same_options(method: str) -> None:
    """Selection, loading and method options are identical (flags, type, default, help); the twin adds only
    --dtype (which the command has too, for the output), --json and --plot."""
    shaping = _options(method, panels=SHAPING)
    assert shaping == _options("plan", method, panels=SHAPING)
    assert {o.split()[0] for o in shaping} >= {"--last", "--best", "--metric", "--order", "--key", "--trust-pickle",
                                               "--window", "--stride"}
    rest = set(_options("plan", method)) - set(shaping)
    assert rest == {"--dtype", "--json", "--plot", "--lora", "--lora-rank", "--base"}
    for flag in ("--dtype", "--lora", "--lora-rank", "--base"):  # output options that the plan shows too
        assert _options("plan", method)[flag] == _options(method)[flag]
    evaluation = set(_options(method, panels={options.EVALUATION}))
    assert evaluation == ({"--keep"} if method == "soup" else {"--eval", "--eval-mode", "--keep"})
    arguments = [[(p.name, p.nargs, p.required) for p in c.params if p.param_type_name == "argument"]
                 for c in (_command(method), _command("plan", method))]
    assert arguments[0] == arguments[1] == [("inputs", -1, True)]


@pytest.mark.parametrize(("choices", "library"), [
    (options.Order, "ckptavg.select:ORDERS"),
    (options.Hold, "ckptavg.methods.schedules:HOLDS"),
    (options.Init, "ckptavg.methods.schedules:INITS"),
    (options.GraftMode, "ckptavg.methods.graft:MODES"),
    (options.GraftGroups, "ckptavg.methods.graft:GROUPINGS"),
    (options.Schedule, "ckptavg.methods.wsm:SHAPES"),
    (options.OutDtype, "ckptavg.layout:OUT_DTYPES"),
    (options.Format, "ckptavg.write.options:FORMATS"),
    (options.AccumDtype, "ckptavg.layout:ACCUM_DTYPES"),
    (options.LoraMode, "ckptavg.methods.lora:MODES"),
])
def test_choices_equal_the_librarys(choices: type[Enum], library: str) -> None:
    """The CLI spells its choice lists out (so `--help` needs no torch); they must be the library's, in order."""
    import importlib

    module, name = library.split(":")
    assert [c.value for c in choices] == list(getattr(importlib.import_module(module), name))


def _all_commands() -> list[tuple[str, ...]]:
    return [(name,) for name in ROOT.commands if name != "plan"] + [("plan", name) for name in _command("plan").commands]  # type: ignore[attr-defined]


@pytest.mark.parametrize("path", _all_commands(), ids=" ".join)
def test_every_option_is_in_the_flag_table(path: tuple[str, ...]) -> None:
    for p in _command(*path).params:
        if p.param_type_name == "option" and p.name not in CLI_ONLY:
            assert p.name in PARAM_FLAGS, f"{' '.join(path)}: {p.name} is not in PARAM_FLAGS"
            assert PARAM_FLAGS[p.name].split()[0] in p.opts, (p.name, PARAM_FLAGS[p.name], p.opts)


@pytest.mark.parametrize(("error", "shown"), [
    (PlanError("step_decay must be between 0 and 1, not 1.5.", params=("step_decay",)),
     "Error: --step-decay must be between 0 and 1, not 1.5."),
    (PlanError("give max_shard_size or shards_like_input, not both.", params=("max_shard_size", "shards_like_input")),
     "Error: give --max-shard-size or --shards like-input, not both."),
    (SelectionError("best needs metric_mode min or max.", params=("best", "metric_mode")),
     "Error: --best needs --metric-mode min or max."),
    # a message that still names the flag (the library's older style) prints unchanged
    (PlanError("--decay must be between 0 and 1, not 1.5.", params=("decay",)),
     "Error: --decay must be between 0 and 1, not 1.5."),
    (PlanError("weights has 2 values\nbut 6 checkpoints", params=("weights",)),
     "Error: --weights has 2 values\\nbut 6 checkpoints"),
])
def test_library_errors_show_flags(monkeypatch: pytest.MonkeyPatch, error: PlanError, shown: str) -> None:
    """Library messages name parameters; the CLI prints them as flags, once, on one line."""
    import ckptavg.api

    def fail(*args: object, **kwargs: object) -> None:
        raise error

    monkeypatch.setattr(ckptavg.api, "plan_checkpoints", fail)
    result = CliRunner().invoke(app, ["plan", "swa", str(RUNS / "plain")])
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [shown]
