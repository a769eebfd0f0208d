"""The output format follows -o (issue 16): .safetensors is safetensors, .pt/.pth/.bin/.ckpt/.tar a torch.save
state dict that torch.load(weights_only=True) reads; format= overrides; an unknown name is refused."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import Result

import ckptavg
from ckptavg import PlanError, WriteOptions, average
from ckptavg.errors import CkptavgWarning
from ckptavg.read.layouts import open_checkpoint

RUNS = Path(__file__).resolve().parent.parent / "fixtures" / "runs"


@pytest.mark.parametrize("name", ["avg.pt", "avg.pth", "avg.bin", "avg.ckpt", "avg.pth.tar"])
def test_torch_names_give_a_torch_file_equal_to_the_safetensors_output(tmp_path: Path, name: str) -> None:
    reference = tmp_path / "avg.safetensors"
    average(RUNS / "plain", reference)
    out = tmp_path / name
    result = average(RUNS / "plain", out, write=WriteOptions(verify=True))
    loaded = torch.load(out, weights_only=True)
    want = load_file(reference)
    assert list(loaded) == list(open_checkpoint(RUNS / "plain" / "epoch=0.pt").tensors)  # the state dict's order
    for k, t in want.items():
        assert loaded[k].dtype == t.dtype and torch.equal(loaded[k], t), k
    assert result.sha256 is not None and result.files[0].path == out
    info = ckptavg.inspect_checkpoint(out)  # the provenance travels in the torch file too
    assert info["ckptavg"]["method"] == "swa" and len(info["ckptavg"]["inputs"]) == 6


def test_format_overrides_the_extension(tmp_path: Path) -> None:
    out = tmp_path / "weights.data"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a name that says nothing: no note
        average(RUNS / "plain", out, write=WriteOptions(format="torch"))
    assert set(torch.load(out, weights_only=True)) == set(load_file(_sft(tmp_path)))
    out2 = tmp_path / "weights.pt"
    with pytest.warns(CkptavgWarning, match=r"weights.pt: written as safetensors, as format asks, but its name says "
                                            r"torch, and loaders go by the name"):
        average(RUNS / "plain", out2, write=WriteOptions(format="safetensors"))
    assert set(load_file(out2)) == set(load_file(_sft(tmp_path)))


def test_rows_in_a_folder_take_the_formats_extension(cli: Callable[..., Result], tmp_path: Path) -> None:
    """A sweep into a folder with --format torch writes .pt files (a torch file named .safetensors would be
    handed to safetensors by torch.load)."""
    r = cli("ema", RUNS / "plain", "--decay", "0.5,0.9", "--format", "torch", "-o", f"{tmp_path / 'sweep'}/", "-q")
    assert r.exit_code == 0, r.output
    files = sorted(p.name for p in (tmp_path / "sweep").iterdir())
    assert files == ["decay=0.5.pt", "decay=0.9.pt"]
    assert all(torch.load(tmp_path / "sweep" / f, weights_only=True) for f in files)
    r = cli("swa", RUNS / "plain", "--format", "torch", "-o", tmp_path / "x.safetensors", "-q")
    assert r.exit_code == 0 and "Warning: " in r.stderr and "--format" in r.stderr  # said, in flags


def _sft(tmp_path: Path) -> Path:
    path = tmp_path / "ref.safetensors"
    if not path.exists():
        average(RUNS / "plain", path)
    return path


@pytest.mark.parametrize("write, output, message", [
    (WriteOptions(), "avg.weights", "cannot tell the format from the name"),
    (WriteOptions(), "avg", "cannot tell the format from the name"),
    (WriteOptions(format="torch"), "out/", "format torch writes one file"),
])
def test_bad_combinations_are_refused_before_any_work(tmp_path: Path, write: WriteOptions, output: str,
                                                      message: str) -> None:
    with pytest.raises(PlanError, match=message) as info:
        average(RUNS / "plain", f"{tmp_path}/{output}", write=write)
    assert "format" in info.value.params
    assert list(tmp_path.iterdir()) == []


def test_torch_format_with_shards_is_refused() -> None:
    with pytest.raises(PlanError, match="format torch writes one file") as info:
        WriteOptions(format="torch", max_shard_size="1GB")
    assert {"format", "max_shard_size"} <= set(info.value.params)


def test_the_command_line_writes_what_the_name_or_format_says(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from ckptavg.cli.app import app

    runner = CliRunner()
    result = runner.invoke(app, ["swa", str(RUNS / "plain"), "-o", str(tmp_path / "avg.pt"), "-q"])
    assert result.exit_code == 0, result.output
    assert set(torch.load(tmp_path / "avg.pt", weights_only=True)) == set(load_file(_sft(tmp_path)))
    result = runner.invoke(app, ["swa", str(RUNS / "plain"), "-o", str(tmp_path / "w.data"), "--format", "torch", "-q"])
    assert result.exit_code == 0 and torch.load(tmp_path / "w.data", weights_only=True)
    result = runner.invoke(app, ["swa", str(RUNS / "plain"), "-o", str(tmp_path / "w.weights")])
    assert result.exit_code == 1 and "or pass --format" in result.stderr
    result = runner.invoke(app, ["swa", str(RUNS / "plain"), "-o", str(tmp_path / "x.pt"), "--format", "torch",
                                 "--max-shard-size", "1KB"])
    assert result.exit_code == 1 and "--format torch writes one file" in result.stderr
