"""Runs CLI cases in-process, one after another, in a child process that tests/test_hostile2.py starts with
an address-space cap: a case that allocates gigabytes fails with MemoryError (its own result) instead of
taking the machine, and one process start serves every case.

    python tests/hostile_driver.py CASES.json RESULTS.json

CASES.json: {id: [argv...]}. RESULTS.json: {id: {"exit": int, "stderr": str, "stdout": str, "exception":
repr or null, "seconds": float, "rss_growth": bytes the process's peak RSS grew during the case}}.
"""

from __future__ import annotations

import json
import resource
import signal
import sys
import time
import warnings
from pathlib import Path
from types import FrameType

CASE_SECONDS = 15


class CaseTimeout(BaseException):
    """Raised by the alarm in a case that runs too long; a BaseException, so no handler of ckptavg takes it."""


def _alarm(signum: int, frame: FrameType | None) -> None:
    raise CaseTimeout(f"the case ran more than {CASE_SECONDS} s")


def main() -> None:
    cases: dict[str, list[str]] = json.loads(Path(sys.argv[1]).read_text())
    from typer.testing import CliRunner

    from ckptavg.cli.app import app

    runner = CliRunner()
    results: dict[str, dict[str, object]] = {}
    signal.signal(signal.SIGALRM, _alarm)
    for case_id, argv in cases.items():
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        started = time.monotonic()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            signal.setitimer(signal.ITIMER_REAL, CASE_SECONDS)
            try:
                result = runner.invoke(app, argv, env={"CKPTAVG_DEBUG": None, "COLUMNS": "200"})
            except CaseTimeout as e:
                results[case_id] = {"exit": None, "stdout": "", "stderr": "", "exception": repr(e),
                                    "seconds": time.monotonic() - started, "rss_growth": 0}
                continue
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
        exc = result.exception
        results[case_id] = {
            "exit": result.exit_code, "stdout": result.stdout, "stderr": result.stderr,
            "exception": None if exc is None or isinstance(exc, SystemExit) else repr(exc)[:500],
            "seconds": time.monotonic() - started,
            "rss_growth": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before,
        }
        Path(sys.argv[2]).write_text(json.dumps(results))  # what is done survives a crash of a later case
    results["__peak__"] = {"rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    Path(sys.argv[2]).write_text(json.dumps(results))


if __name__ == "__main__":
    main()
