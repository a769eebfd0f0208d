"""Hugging Face style output folders: one file or shards with a valid index, sidecars copied, training
state left behind, shards like the input, and nothing new in the folder when anything fails."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from refs import RUNS
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ckptavg.errors import PlanError
from ckptavg.write.hf_folder import parse_size

SHARDED = RUNS / "hf-sharded"


def _read_folder(folder: Path) -> dict[str, torch.Tensor]:
    """Load a folder the way transformers does: through the index when there is one."""
    index = folder / "model.safetensors.index.json"
    if not index.exists():
        return load_file(folder / "model.safetensors")
    body = json.loads(index.read_text())
    out: dict[str, torch.Tensor] = {}
    for name, file in body["weight_map"].items():
        with safe_open(folder / file, "pt") as f:
            out[name] = f.get_tensor(name)
    sizes = sum(t.numel() * t.element_size() for t in out.values())
    assert body["metadata"]["total_size"] == sizes
    for file in set(body["weight_map"].values()):  # every shard holds exactly the tensors the index says
        with safe_open(folder / file, "pt") as f:
            assert set(f.keys()) == {k for k, v in body["weight_map"].items() if v == file}
    return out


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture
def reference(cli, tmp_path: Path) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    out = tmp_path / "ref.safetensors"
    assert cli("swa", SHARDED, "-o", out).exit_code == 0
    return load_file(out)


def test_folder_with_one_file_and_sidecars(cli, tmp_path: Path, reference: dict[str, torch.Tensor]) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "avg"
    r = cli("swa", SHARDED, "-o", f"{out}/", "--json")
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]  # no trainer_state.json
    newest = sorted(SHARDED.iterdir(), key=lambda p: int(p.name.split("-")[1]))[-1]
    assert (out / "config.json").read_bytes() == (newest / "config.json").read_bytes()
    _same(_read_folder(out), reference)
    assert json.loads(r.stdout)["sha256"] is None and len(json.loads(r.stdout)["files"]) == 1


@pytest.mark.parametrize("limit", ["2KB", "3000", "1KiB"])
def test_max_shard_size(cli, tmp_path: Path, reference: dict[str, torch.Tensor], limit: str) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "avg"
    assert cli("swa", SHARDED, "-o", out, "--max-shard-size", limit).exit_code == 0
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 1 and all(p.name.endswith(f"-of-{len(shards):05d}.safetensors") for p in shards)
    largest = max(t.numel() * t.element_size() for t in reference.values())
    for p in shards:  # each shard within the limit, unless it holds one tensor larger than the limit
        data = sum(t.numel() * t.element_size() for t in load_file(p).values())
        assert data <= max(parse_size(limit), largest)
    _same(_read_folder(out), reference)
    for p in shards:  # every shard carries the provenance
        with safe_open(p, "pt") as f:
            meta = f.metadata()
        assert meta["ckptavg_method"] == "swa" and len(json.loads(meta["ckptavg_inputs"])) == 6


def test_shards_like_input(cli, tmp_path: Path, reference: dict[str, torch.Tensor]) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "avg"
    assert cli("swa", SHARDED, "-o", f"{out}/", "--shards", "like-input").exit_code == 0
    first = sorted(SHARDED.iterdir())[0]
    want = json.loads((first / "model.safetensors.index.json").read_text())["weight_map"]
    assert json.loads((out / "model.safetensors.index.json").read_text())["weight_map"] == want
    _same(_read_folder(out), reference)


def test_folder_errors(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "avg"
    assert cli("swa", SHARDED, "-o", out, "--max-shard-size", "2KB").exit_code == 0
    cases = [
        (["-o", out, "--max-shard-size", "2KB"], "pass --force"),
        (["-o", out, "--max-shard-size", "1MB", "--force"], "other weight files"),  # stale shards would mix in
        (["-o", f"{tmp_path / 'x'}/", "--max-shard-size", "5XB"], "give a size such as"),
        (["-o", sorted(SHARDED.iterdir())[0], "--force"], "holds the input"),
    ]
    for args, message in cases:
        r = cli("swa", SHARDED, *args)
        assert r.exit_code == 1 and message in r.output, (args, r.output)
        assert len(r.output.strip().splitlines()) == 1
    r = cli("swa", RUNS / "plain", "-o", f"{tmp_path / 'y'}/", "--shards", "like-input")
    assert r.exit_code == 1 and "not a sharded Hugging Face folder" in r.output


def test_failure_leaves_folder_untouched(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    runs = tmp_path / "runs"
    shutil.copytree(SHARDED, runs)
    victim = sorted(runs.iterdir())[-1] / "model-00002-of-00002.safetensors"
    state = load_file(victim)
    name = sorted(state)[-1]
    state[name] = torch.full_like(state[name], float("nan"))
    save_file(state, victim)
    out = tmp_path / "avg"
    out.mkdir()
    (out / "README.md").write_text("mine")
    r = cli("swa", runs, "-o", out, "--max-shard-size", "2KB")
    assert r.exit_code == 1 and "NaN" in r.output
    assert sorted(p.name for p in out.iterdir()) == ["README.md"]  # no shard, no index, no temp file


def test_parse_size() -> None:
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("500mb") == 500 * 10**6
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("1.5KB") == 1500
    assert parse_size("4096") == 4096
    for bad in ["", "0", "-1GB", "5 XB", "GB"]:
        with pytest.raises(PlanError):
            parse_size(bad)


@pytest.mark.parametrize("folder", [False, True], ids=["file", "folder"])
def test_verify_catches_a_bad_write_before_it_appears(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, folder: bool) -> None:
    import ckptavg
    from ckptavg.errors import OutputError
    from ckptavg.write.safetensors import SafetensorsWriter

    real = SafetensorsWriter.write_part

    def corrupting(self: SafetensorsWriter, block: torch.Tensor) -> None:  # a bug between the checks and the disk
        real(self, torch.full_like(block, float("nan")) if block.is_floating_point() else block)

    monkeypatch.setattr(SafetensorsWriter, "write_part", corrupting)
    kw = {"max_shard_size": "2KB"} if folder else {}
    unchecked, checked = (tmp_path / "a", tmp_path / "b") if folder else (tmp_path / "a.safetensors", tmp_path / "b.safetensors")
    ckptavg.average_checkpoints(str(SHARDED), unchecked, **kw)  # without verify the bad file lands
    assert unchecked.exists()
    with pytest.raises(OutputError, match="NaN or Inf") as info:
        ckptavg.average_checkpoints(str(SHARDED), checked, verify=True, **kw)
    assert str(checked) in str(info.value) and "ckptavg-partial" not in str(info.value)
    assert not checked.exists() or list(checked.iterdir()) == []  # nothing renamed into place, no temp file


def test_every_file_of_an_output_folder_gets_the_usual_mode(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Shards, sidecars and the index are created as hidden 0600 temp files; once renamed, each has the mode
    a plain open() would give it (0666 less the umask), like a single-file output."""
    out = tmp_path / "avg"
    old = os.umask(0o027)
    try:
        assert cli("swa", SHARDED, "-o", out, "--max-shard-size", "2KB").exit_code == 0
    finally:
        os.umask(old)
    names = sorted(p.name for p in out.iterdir())
    assert "config.json" in names and "model.safetensors.index.json" in names and len(names) > 3
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in out.iterdir()} == dict.fromkeys(names, oct(0o640))


@pytest.mark.parametrize("exc", [KeyboardInterrupt, OSError])
def test_an_interrupted_sidecar_or_index_write_leaves_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exc: type[BaseException]
) -> None:
    from ckptavg.errors import OutputError
    from ckptavg.write import hf_folder as folder

    src = tmp_path / "config.json"
    src.write_text("{}")
    out = tmp_path / "out"
    out.mkdir()

    def fail(*a: object) -> None:
        raise exc("stop")

    monkeypatch.setattr(folder, "_seal", fail)
    want = OutputError if exc is OSError else exc
    with pytest.raises(want):
        folder.copy_temp(src, out)
    with pytest.raises(want):
        folder.write_text_temp(out, "model.safetensors.index.json", "{}")
    assert list(out.iterdir()) == []
