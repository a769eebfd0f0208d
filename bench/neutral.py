"""Prove a refactor behaviour-neutral: run every averaging command on every fixture and hash the outputs.

    python bench/neutral.py snapshot before.json     # on the old code
    python bench/neutral.py snapshot after.json      # on the new code
    python bench/neutral.py compare before.json after.json

Each command runs in process through the CLI (typer's CliRunner) into a fresh folder; the snapshot maps
the command to the sha256 of every file it wrote (whole files: tensors, header and provenance metadata)
and to its exit code and first output line, so an error message that changed shows up too.
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RUNS = REPO / "fixtures" / "runs"
FOLDERS = ["plain", "legacy", "ddp", "lightning", "safetensors", "hf", "hf-sharded", "hf-bin", "timm"]
METHODS = [
    ["swa"],
    ["swa", "--last", "3"],
    ["ema", "--decay", "0.9"],
    ["ema", "--decay", "0.99", "--per", "step", "--warmup"],
    ["ema", "--sigma-rel", "0.1"],
    ["ema", "--decay", "0.9", "--init", "zero"],
    ["graft"],
    ["graft", "--mode", "sequential", "--round-digits", "none"],
    ["linear", "--weights", "1,2,3", "--normalize", "--last", "3"],
    ["soup", "--uniform"],
    ["soup", "--eval", str(REPO / "fixtures" / "model.py") + ":accuracy"],
]
EXTRA = [
    ["swa", str(RUNS / "plain"), "--dtype", "bfloat16"],
    ["swa", str(RUNS / "hf-sharded"), "--shards", "like-input"],
    ["swa", str(RUNS / "hf"), "--max-shard-size", "4KiB"],
    ["swa", str(RUNS / "timm"), "--key", "state_dict_ema"],
    ["ema", str(RUNS / "hf"), "--step-decay", "0.9", "--hold", "midpoint"],
    ["swa", str(RUNS / "plain"), "--accum-dtype", "float32"],
    ["swa", str(RUNS / "ddp"), "--best", "2", "--metric", "val_loss", "--metric-mode", "min"],
    ["swa", str(RUNS / "plain"), "--bn-model", str(REPO / "fixtures" / "model.py") + ":build",
     "--bn-data", str(REPO / "fixtures" / "model.py") + ":bn_loader"],
]


def _commands() -> list[list[str]]:
    out = [m[:1] + [str(RUNS / f)] + m[1:] for f in FOLDERS for m in METHODS]
    return out + EXTRA


def _hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def snapshot(path: Path) -> None:
    from typer.testing import CliRunner

    from ckptavg.cli.app import app

    runner = CliRunner()
    result: dict[str, object] = {}
    for args in _commands():
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / "out"
            folder.mkdir()
            target = folder / ("avg/" if any(a in args for a in ("--shards", "--max-shard-size")) else "avg.safetensors")
            run = runner.invoke(app, [*args, "-o", str(target), "-q"])
            text = (run.output or "").strip().splitlines()
            result[" ".join(a.replace(str(REPO) + "/", "") for a in args)] = {
                "exit": run.exit_code, "first_line": text[0] if text else "", "files": _hashes(folder)}
    path.write_text(json.dumps(result, indent=1, sort_keys=True))
    print(f"{len(result)} commands -> {path}")


def compare(a: Path, b: Path) -> int:
    old, new = json.loads(a.read_text()), json.loads(b.read_text())
    bad = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    for k in bad:
        print(f"DIFFERS: {k}\n  before: {old.get(k)}\n  after:  {new.get(k)}")
    ok = sum(1 for v in new.values() if v["exit"] == 0)
    print(f"{len(old)} commands, {ok} wrote output, {len(bad)} differ")
    return 1 if bad else 0


if __name__ == "__main__":
    if sys.argv[1] == "snapshot":
        snapshot(Path(sys.argv[2]))
    else:
        sys.exit(compare(Path(sys.argv[2]), Path(sys.argv[3])))
