"""Distributed averaging: `torchrun --nproc-per-node 2 -m ckptavg ...` on the CPU (gloo) gives the same
tensors as one process; a failure on any rank stops all of them with one message and leaves no file."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from refs import RUNS
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ckptavg.write.hf_folder import balance


def _torchrun(*args: object, nproc: int = 2) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "CKPTAVG_DEBUG")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "ckptavg", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=180)


def _read_folder(folder: Path) -> dict[str, torch.Tensor]:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    out = {}
    for name, file in index["weight_map"].items():
        with safe_open(folder / file, "pt") as f:
            out[name] = f.get_tensor(name)
    return out


@pytest.mark.parametrize("extra", [[], ["--max-shard-size", "3KB"]], ids=["one-shard-per-rank", "max-shard-size"])
def test_two_ranks_equal_one_process(cli, tmp_path: Path, extra: list[str]) -> None:  # type: ignore[no-untyped-def]
    single = tmp_path / "single.safetensors"
    assert cli("ema", RUNS / "lightning", "--decay", "0.8", "-o", single).exit_code == 0
    out = tmp_path / "dist"
    r = _torchrun("ema", RUNS / "lightning", "--decay", "0.8", "-o", f"{out}/", "--json", *extra)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout.strip().splitlines()[-1])  # rank 0 alone prints
    assert r.stdout.count('"output"') == 1
    want = load_file(single)
    got = _read_folder(out)
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) >= 2 and [Path(f["path"]).name for f in summary["files"]] == [p.name for p in shards]


def test_failure_on_one_rank_stops_all(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    shutil.copytree(RUNS / "safetensors", runs)
    victim = sorted(runs.iterdir())[-1]
    state = load_file(victim)
    name = max(state, key=lambda k: state[k].numel())  # the largest tensor: a shard of its own, one rank's
    state[name] = torch.full_like(state[name], float("nan"))
    save_file(state, victim)
    out = tmp_path / "dist"
    r = _torchrun("swa", runs, "-o", f"{out}/")
    assert r.returncode != 0
    errors = [line for line in r.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and victim.name in errors[0] and name in errors[0], r.stderr
    assert not out.exists() or list(out.iterdir()) == []  # no shard, no index, no temp file


def test_balance_is_size_balanced_and_deterministic() -> None:
    sizes = [100, 1, 50, 50, 3, 2, 90, 10]
    owner = balance(sizes, 3)
    loads = [sum(s for s, o in zip(sizes, owner, strict=True) if o == b) for b in range(3)]
    assert max(loads) - min(loads) <= max(sizes)  # greedy largest-first bound
    assert sorted(loads) == [101, 102, 103]  # 100+3, 90+10+2, 50+50+1
    assert owner == balance(sizes, 3)
    assert balance([5, 5], 4) == [0, 1]


def test_two_ranks_average_lora_adapters_as_one_process(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """--lora svd (the default) under torchrun: the same factors as one process, and each warning said once, by
    rank 0, naming what sharded the adapter folder (the job, not an option the user did not give)."""
    run = Path(__file__).resolve().parent.parent / "fixtures" / "real" / "peft" / "lora-trainer"
    assert cli("swa", run, "-o", f"{tmp_path / 'single'}/", "-q").exit_code == 0
    r = _torchrun("swa", run, "-o", f"{tmp_path / 'dist'}/")
    assert r.returncode == 0, r.stderr
    warned = [line for line in r.stderr.splitlines() if line.startswith("Warning: ")]
    assert len(warned) == len(set(warned)) == 2, warned  # the final model left out; the sharded adapter folder
    assert "a torchrun job of 2 processes writes one shard each" in warned[1] and "--max-shard-size" not in warned[1]
    want = load_file(tmp_path / "single" / "adapter_model.safetensors")
    index = json.loads((tmp_path / "dist" / "adapter_model.safetensors.index.json").read_text())
    got = {}
    for name, file in index["weight_map"].items():
        with safe_open(tmp_path / "dist" / file, "pt") as f:
            got[name] = f.get_tensor(name)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
