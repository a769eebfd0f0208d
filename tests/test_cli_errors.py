"""One error style: every failure is one `Error:` line on stderr (usage 2, bad input 1, interrupt 130), in
process and as a real process; no arguments print the help; the progress bar waits for the fast checks
and counts in binary units."""

from __future__ import annotations

import fcntl
import io
import os
import pty
import re
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ckptavg.cli.app import app
from ckptavg.cli.progress import ProgressBar

REPO = Path(__file__).resolve().parent.parent
RUNS = "fixtures/runs"
GiB = 1 << 30

USAGE_ERRORS = [
    pytest.param(["swa", f"{RUNS}/plain", "-o", "{out}", "--bogus"], "--bogus", id="unknown-option"),
    pytest.param(["swa", f"{RUNS}/plain", "-o", "{out}", "--lst", "2"], "--last", id="misspelt-option"),
    pytest.param(["swa"], "INPUTS", id="missing-argument"),
    pytest.param(["swa", f"{RUNS}/plain"], "--output", id="missing-option"),
    pytest.param(["swa", f"{RUNS}/plain", "-o"], "-o", id="option-without-value"),
    pytest.param(["swa", f"{RUNS}/plain", "-o", "{out}", "--order", "bogus"], "--order", id="bad-choice"),
    pytest.param(["swa", f"{RUNS}/plain", "-o", "{out}", "--last", "abc"], "--last", id="not-a-number"),
    pytest.param(["ema", f"{RUNS}/plain", "-o", "{out}", "--decay", "1.5"], "--decay", id="number-out-of-range"),
    pytest.param(["plan", "ema", f"{RUNS}/plain", "--hold", "sideways"], "--hold", id="plan-bad-choice"),
    pytest.param(["nosuch"], "nosuch", id="unknown-command"),
    pytest.param(["plan", "nosuch"], "nosuch", id="unknown-plan-method"),
    pytest.param(["--bogus"], "--bogus", id="unknown-root-option"),
]


def _args(args: list[str], tmp_path: Path) -> list[str]:
    return [a.format(out=tmp_path / "out.safetensors") for a in args]


def _one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), stderr
    assert "Traceback" not in stderr and "Usage:" not in stderr and "╭" not in stderr, stderr
    return lines[0]


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ckptavg", *args], capture_output=True, text=True, timeout=120,
                          cwd=REPO, env={**os.environ, "CKPTAVG_DEBUG": "", **(env or {})})


@pytest.mark.parametrize(("args", "names"), USAGE_ERRORS)
def test_usage_error_is_one_line_exit_2(args: list[str], names: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    result = CliRunner().invoke(app, _args(args, tmp_path))
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit)
    assert result.stdout == ""
    assert names in _one_error_line(result.stderr)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("args", "names"), USAGE_ERRORS[::3])
def test_usage_error_in_a_real_process(args: list[str], names: str, tmp_path: Path) -> None:
    proc = _run(*_args(args, tmp_path))
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    assert names in _one_error_line(proc.stderr)


def test_usage_error_names_where_to_look() -> None:
    result = CliRunner().invoke(app, ["plan", "ema", "x", "--bogus"])
    assert _one_error_line(result.stderr).endswith("See 'ckptavg plan ema --help'.")


def test_input_error_is_one_line_exit_1(tmp_path: Path) -> None:
    args = ["swa", str(tmp_path / "nope.safetensors"), "-o", str(tmp_path / "out.safetensors")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1 and result.stdout == ""
    assert "nope.safetensors" in _one_error_line(result.stderr)
    proc = _run(*args)
    assert proc.returncode == 1 and proc.stdout == ""
    assert "nope.safetensors" in _one_error_line(proc.stderr)


def test_interrupt_is_one_line_exit_130(monkeypatch: pytest.MonkeyPatch) -> None:
    """In process; the real Ctrl-C and SIGTERM of a running average are in test_crash.py."""
    import ckptavg.api

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(ckptavg.api, "plan_checkpoints", interrupted)
    result = CliRunner().invoke(app, ["plan", "swa", f"{REPO}/{RUNS}/plain"])
    assert result.exit_code == 130
    assert "interrupted" in _one_error_line(result.stderr)


@pytest.mark.parametrize("args", [[], ["plan"]], ids=["ckptavg", "ckptavg-plan"])
def test_no_command_prints_the_help_and_exits_0(args: list[str]) -> None:
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "Usage: ckptavg" in result.stdout and "swa" in result.stdout
    assert result.stderr == ""
    proc = _run(*args)
    assert proc.returncode == 0 and "Usage: ckptavg" in proc.stdout and proc.stderr == ""


def test_version() -> None:
    import ckptavg

    proc = _run("--version")
    assert proc.returncode == 0 and proc.stdout == f"ckptavg {ckptavg.__version__}\n"


# ---------------------------------------------------------------- progress


def test_bar_is_drawn_on_the_first_report_in_binary_units() -> None:
    out = io.StringIO()
    bar = ProgressBar(out)
    assert out.getvalue() == "" and not bar.drawn
    bar(0, 3 * GiB)
    time.sleep(0.6)  # the rate shows from 0.5 s on
    bar(GiB, 3 * GiB)
    bar.close()
    text = out.getvalue()
    assert "1.0 GiB of 3.0 GiB" in text and re.search(r"\d (KiB|MiB|GiB)/s", text), text
    assert not re.search(r"\d ?[kKMG]B\b|[kMG]B/s", text), text


def _stderr_on_a_tty(*args: str) -> tuple[int, str]:
    """Run ckptavg with stderr on a pseudo-terminal (where the bar is drawn); return the code and stderr."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a new pty is 0 columns wide
    proc = subprocess.Popen([sys.executable, "-m", "ckptavg", *args], stdout=subprocess.DEVNULL, stderr=slave,
                            cwd=REPO, env={**os.environ, "CKPTAVG_DEBUG": ""})
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 4096)
        except OSError:  # the process closed its end
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    return proc.wait(timeout=120), b"".join(chunks).decode(errors="replace")


def test_no_bar_before_a_fast_error(tmp_path: Path) -> None:
    out = tmp_path / "exists.safetensors"
    out.write_bytes(b"keep me")
    code, stderr = _stderr_on_a_tty("swa", f"{RUNS}/safetensors", "-o", str(out))
    assert code == 1
    assert "averaging" not in stderr and "%" not in stderr, stderr
    assert "already exists" in _one_error_line(stderr.replace("\r", ""))


def test_bar_of_a_run_on_a_tty(tmp_path: Path) -> None:
    code, stderr = _stderr_on_a_tty("swa", f"{RUNS}/safetensors", "-o", str(tmp_path / "avg.safetensors"))
    assert code == 0, stderr
    assert "averaging: 100%" in stderr and "KiB of" in stderr, stderr
    assert not re.search(r"\d ?[kKMG]B\b|[kMG]B/s", stderr), stderr


def test_flag_names_never_rewrite_a_path(tmp_path: Path) -> None:
    """Parameters are shown as flags in the CLI, but a path that happens to hold a parameter's name (a folder
    `best/`, a file `last.pth.tar`, `.../base/...`) is printed as it is."""
    from ckptavg.errors import SelectionError

    e = SelectionError("best/checkpoint-4.pth.tar and best/last.pth.tar are one checkpoint; pass last or best, "
                       "not /x/base/m.safetensors base.", params=("best", "last", "base"))
    assert e.with_names({"best": "--best", "last": "--last", "base": "--base"}) == (
        "best/checkpoint-4.pth.tar and best/last.pth.tar are one checkpoint; pass --last or --best, "
        "not /x/base/m.safetensors --base.")
