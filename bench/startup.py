"""Start-up cost of the command line: wall time and peak RSS of short runs, optionally against another source tree.

    python bench/startup.py                      # this tree
    python bench/startup.py --old /path/to/tree  # and an older checkout, runs alternating

Each command runs --reps times (alternating between trees), with cached bytecode; the table gives the median
and the best wall time and the median peak RSS (wait4's rusage) of each.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RUNS = HERE.parent / "fixtures" / "runs"
COMMANDS = {
    "ckptavg --help": ["-m", "ckptavg", "--help"],
    "ckptavg swa --help": ["-m", "ckptavg", "swa", "--help"],
    "import ckptavg": ["-c", "import ckptavg"],
    "plan swa plain": ["-m", "ckptavg", "plan", "swa", str(RUNS / "plain")],
    "swa plain": ["-m", "ckptavg", "swa", str(RUNS / "plain"), "-q", "-f", "-o"],
}


def _run(tree: Path, args: list[str], out: Path) -> tuple[float, float]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"} | {"PYTHONPATH": str(tree)}
    argv = [sys.executable, *args] + ([str(out)] if args[-1] == "-o" else [])
    start = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tree)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(argv)} failed in {tree}")
    return wall, usage.ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--old", type=Path, help="another source tree to compare with (its root holds ckptavg/)")
    ap.add_argument("--reps", type=int, default=7)
    a = ap.parse_args()
    trees = {"new": HERE.parent} | ({"old": a.old.resolve()} if a.old else {})
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "avg.safetensors"
        for tree in trees.values():  # warm the page cache and write the bytecode
            for args in COMMANDS.values():
                _run(tree, args, out)
        print("| command | " + " | ".join(f"{t} median s | {t} best s | {t} RSS MiB" for t in trees) + " |")
        print("|---|" + "---|" * 3 * len(trees))
        for name, args in COMMANDS.items():
            got: dict[str, list[tuple[float, float]]] = {t: [] for t in trees}
            for _ in range(a.reps):
                for t, tree in trees.items():
                    got[t].append(_run(tree, args, out))
            cells = []
            for t in trees:
                walls, rss = [w for w, _ in got[t]], [r for _, r in got[t]]
                cells += [f"{statistics.median(walls):.3f}", f"{min(walls):.3f}", f"{statistics.median(rss):.1f}"]
            print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
