"""A legacy Megatron run (`iter_N/mp_rank_XX/model_optim_rng.pt`, made here with torch.save in Megatron's layout)
averaged rank by rank into a folder Megatron's `--load` reads: `iter_<newest>/mp_rank_XX/model_optim_rng.pt` for
every rank, each a copy of that rank's newest file with `model` replaced by the rank's float64 mean, and
`latest_checkpointed_iteration.txt`. References are read with torch.load alone.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from test_container import assert_same, load, run
from test_megatron import make_legacy
from typer.testing import Result

from ckptavg import CkptavgWarning, NonFiniteError
from ckptavg.api import average, plan_checkpoints
from ckptavg.write.options import WriteOptions

TRAINING = ("optimizer", "opt_param_scheduler", "rng_state")


def error_line(result: Result) -> str:
    """The one Error line (the warnings about the inputs' _extra_state and ranks come first)."""
    assert result.exit_code == 1, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith("Warning: ")]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    return lines[0]


def quiet_average(*args: Any, **kwargs: Any) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CkptavgWarning)
        return average(*args, **kwargs)


def rank_mean(models: dict[tuple[int, int], Any], rank: int, iterations: tuple[int, ...]) -> dict[str, torch.Tensor]:
    states = [{k: v for k, v in models[(it, rank)].items() if isinstance(v, torch.Tensor)} for it in iterations]
    return {k: (sum(s[k].double() for s in states) / len(states)).to(t.dtype) for k, t in states[-1].items()}


@pytest.mark.parametrize("keep", [False, True])
def test_every_rank_is_its_own_mean_in_a_copy_of_its_newest_file(tmp_path: Path, keep: bool) -> None:
    run_dir = tmp_path / "run"
    models = make_legacy(run_dir, (10, 20, 30), ranks=2)
    out = tmp_path / "avg"
    quiet_average(run_dir, f"{out}/", write=WriteOptions(verify=True, keep_training_state=keep))
    assert (out / "latest_checkpointed_iteration.txt").read_text() == "30"
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == [
        "iter_0000030/mp_rank_00/model_optim_rng.pt", "iter_0000030/mp_rank_01/model_optim_rng.pt",
        "latest_checkpointed_iteration.txt"]
    for rank in (0, 1):
        got = load(out / "iter_0000030" / f"mp_rank_{rank:02d}" / "model_optim_rng.pt")
        src = load(run_dir / "iter_0000030" / f"mp_rank_{rank:02d}" / "model_optim_rng.pt")
        assert list(got) == [k for k in src if keep or k not in TRAINING]
        want = rank_mean(models, rank, (10, 20, 30))
        for k, v in got["model"].items():
            assert_same(v, want.get(k, src["model"][k]), k)  # _extra_state (BytesIO, None): the newest's
        for k in got:
            if k != "model":
                assert_same(got[k], src[k], k)


def test_plan_names_the_ranks(tmp_path: Path) -> None:
    make_legacy(tmp_path / "run")
    with pytest.warns(CkptavgWarning, match=r"2 model-parallel rank\(s\) \(mp_rank_00, mp_rank_01\): averaged rank by"):
        report = plan_checkpoints(tmp_path / "run")
    assert {s.name.split("/")[0] for s in report.specs} == {"mp_rank_00", "mp_rank_01"}


def test_one_failing_rank_writes_nothing(tmp_path: Path) -> None:
    models = make_legacy(tmp_path / "run")
    models[(10, 1)]["embedding.word_embeddings.weight"][0, 0] = float("nan")
    bad = tmp_path / "run" / "iter_0000010" / "mp_rank_01" / "model_optim_rng.pt"
    obj = torch.load(bad, weights_only=False)
    obj["model"] = models[(10, 1)]
    torch.save(obj, bad)
    with pytest.raises(NonFiniteError):
        quiet_average(tmp_path / "run", f"{tmp_path / 'avg'}/")
    assert not (tmp_path / "avg").exists()


def test_a_file_output_is_refused_with_the_way_out(tmp_path: Path) -> None:
    make_legacy(tmp_path / "run")
    line = error_line(run("swa", tmp_path / "run", "-o", tmp_path / "avg.safetensors"))
    assert "rank by rank" in line and "DIR/" in line and "mp_rank_00" in line
    assert not (tmp_path / "avg.safetensors").exists()


def test_the_run_folder_itself_is_refused(tmp_path: Path) -> None:
    make_legacy(tmp_path / "run")
    line = error_line(run("swa", tmp_path / "run", "-o", f"{tmp_path / 'run'}/", "--force"))
    assert "holds the input" in line


def test_an_existing_output_needs_force(tmp_path: Path) -> None:
    make_legacy(tmp_path / "run")
    out = f"{tmp_path / 'avg'}/"
    quiet_average(tmp_path / "run", out)
    line = error_line(run("swa", tmp_path / "run", "-o", out))
    assert "--force" in line
    quiet_average(tmp_path / "run", out, write=WriteOptions(force=True))


def test_one_rank_files_still_average_to_a_weights_file(tmp_path: Path) -> None:
    models = make_legacy(tmp_path / "run")
    files = sorted((tmp_path / "run").glob("iter_*/mp_rank_01/model_optim_rng.pt"))
    quiet_average(files, tmp_path / "avg.pt")
    got = torch.load(tmp_path / "avg.pt", weights_only=True)
    for k, t in rank_mean(models, 1, (10, 20)).items():
        assert_same(got[k], t, k)


@pytest.mark.parametrize("fmt", ["dcp", "safetensors"])
def test_a_format_other_than_torch_is_refused(tmp_path: Path, fmt: str) -> None:
    """--format was ignored: torch rank files were written under any format."""
    make_legacy(tmp_path / "run")
    line = error_line(run("swa", tmp_path / "run", "--format", fmt, "-o", f"{tmp_path / 'avg'}/"))
    assert line == (f"Error: output {tmp_path / 'avg'}/: a legacy Megatron run is written as a Megatron folder of rank "
                    f"files (iter_N/mp_rank_XX/model_optim_rng.pt, torch files), not {fmt}; leave out --format, or average "
                    "one rank's files (iter_*/mp_rank_00/model_optim_rng.pt) to a .safetensors file.")
    assert not (tmp_path / "avg").exists()


@pytest.mark.parametrize("flags", [["--format", "torch"], ["--container"], []])
def test_format_torch_and_container_write_the_same_rank_files(tmp_path: Path, flags: list[str]) -> None:
    """A legacy run's folder output is a copy of every rank's file: --container asks for what it does anyway."""
    make_legacy(tmp_path / "run")
    result = run("swa", tmp_path / "run", *flags, "-o", f"{tmp_path / 'avg'}/", "-q")
    assert result.exit_code == 0, result.output
    assert sorted(p.relative_to(tmp_path / "avg").as_posix() for p in (tmp_path / "avg").rglob("*.pt")) == [
        "iter_0000020/mp_rank_00/model_optim_rng.pt", "iter_0000020/mp_rank_01/model_optim_rng.pt"]


@pytest.mark.parametrize("flags", [["--add-prefix", "m."], ["--keep-prefix"], ["--container", "--add-prefix", "m."]])
def test_prefix_options_are_refused(tmp_path: Path, flags: list[str]) -> None:
    make_legacy(tmp_path / "run")
    line = error_line(run("swa", tmp_path / "run", *flags, "-o", f"{tmp_path / 'avg'}/"))
    assert line == ("Error: a legacy Megatron run is written as copies of its rank files, which keep their own tensor "
                    f"names; leave out {flags[-2] if flags[-1] == 'm.' else flags[-1]}.")
    assert not (tmp_path / "avg").exists()


@pytest.mark.parametrize("keep", [False, True])
def test_keep_state_copies_the_distributed_optimizer_state(tmp_path: Path, keep: bool) -> None:
    """distrib_optim.pt (Megatron's --use-distributed-optimizer state) is training state beside each rank's file:
    copied byte for byte from the newest iteration with --keep-state, left out without."""
    run_dir = tmp_path / "run"
    make_legacy(run_dir)
    for it in (10, 20):
        for rank in (0, 1):
            (run_dir / f"iter_{it:07d}" / f"mp_rank_{rank:02d}" / "distrib_optim.pt").write_bytes(bytes([it, rank]) * 50)
    out = tmp_path / "avg"
    quiet_average(run_dir, f"{out}/", write=WriteOptions(verify=True, keep_training_state=keep))
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("distrib_optim.pt"))
    assert files == (["iter_0000020/mp_rank_00/distrib_optim.pt", "iter_0000020/mp_rank_01/distrib_optim.pt"] if keep
                     else [])
    for rank in (0, 1) if keep else ():
        name = f"iter_0000020/mp_rank_{rank:02d}/distrib_optim.pt"
        assert (out / name).read_bytes() == (run_dir / name).read_bytes()
    assert not [p for p in out.rglob("*") if p.name.startswith(".")]  # no temp file left behind
