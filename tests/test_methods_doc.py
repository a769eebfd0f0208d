"""Every command in docs/METHODS.md runs as written, from the repository root, on the fixtures."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ckptavg.cli.app import app

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "METHODS.md"
COMMANDS = [line for block in re.findall(r"```\n(.*?)```", DOC.read_text(), re.S)
            for line in block.splitlines() if line.startswith("ckptavg ")]


def test_every_method_has_a_section_and_a_command() -> None:
    from ckptavg.methods import PLANS

    text = DOC.read_text()
    for method in PLANS:
        assert f"## {method}:" in text, method
    assert {shlex.split(c)[1] for c in COMMANDS} >= {"swa", "ema", "graft", "linear", "soup", "wsm", "phema", "plan"}


@pytest.mark.parametrize("command", COMMANDS)
def test_the_command_runs(command: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "fixtures").symlink_to(REPO / "fixtures")  # the repository's paths, outputs in tmp_path
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, shlex.split(command)[1:])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip()
