"""Shared fixtures for the test suite (keep this small: helpers live in the test files)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

REPO = Path(__file__).resolve().parent.parent
RUNS = REPO / "fixtures" / "runs"


@pytest.fixture
def runs() -> Path:
    """The read-only fixture checkpoints (fixtures/runs); never write below it."""
    return RUNS


@pytest.fixture
def cli() -> Callable[..., Result]:
    """Run the `ckptavg` Typer app in-process: ``cli("swa", path, "-o", out, env={...})``.

    CKPTAVG_DEBUG is removed from the environment unless the test sets it.
    """
    from ckptavg.cli.app import app

    runner = CliRunner()

    def invoke(*args: object, env: Mapping[str, str | None] | None = None) -> Result:
        return runner.invoke(app, [str(a) for a in args], env={"CKPTAVG_DEBUG": None, **(env or {})})

    return invoke


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "interop: compares with a training library's own loader; skipped where it is not installed")
