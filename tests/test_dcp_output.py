"""DCP folder outputs (issue 16): averages written as PyTorch Distributed Checkpoints, read back by torch's own
readers (`dcp_to_torch_save`, `dcp.load`), megatron-core's `dist_checkpointing.load` (-m interop) and ckptavg's.

References: the Megatron fixture's `expected/` state dicts (megatron's own loader), and for the DCP recipe the
tensors that `dcp.save` was given. Never ckptavg's reader alone.
"""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from test_cli import TEMP_GLOB, stderr_lines
from test_megatron import ITERS, RUN, expected
from torch.distributed.checkpoint.filesystem import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from torch.distributed.checkpoint.state_dict_loader import load as dcp_load
from torch.distributed.checkpoint.state_dict_saver import save as dcp_save
from typer.testing import CliRunner, Result

from ckptavg import CkptavgWarning, OutputError, PlanError
from ckptavg.api import average
from ckptavg.cli.app import app
from ckptavg.read.layouts import open_checkpoint
from ckptavg.write.dcp_writer import DcpWriter
from ckptavg.write.options import WriteOptions

REPO = Path(__file__).resolve().parent.parent
NEWEST = RUN / ITERS[-1]


def cli(*args: object) -> Result:
    return CliRunner().invoke(app, [str(a) for a in args])


def quiet_average(*args: Any, **kw: Any) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CkptavgWarning)
        return average(*args, **kw)


def torch_view(folder: Path, tmp: Path) -> dict[str, Any]:
    """The folder as torch's own converter sees it: dcp_to_torch_save, then torch.load."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no process group: loading as a single process"
        dcp_to_torch_save(folder, tmp / "converted.pt")
    state: dict[str, Any] = torch.load(tmp / "converted.pt", weights_only=False)
    return state


def mean_of(refs: list[dict[str, torch.Tensor]], key: str) -> torch.Tensor:
    return (sum(r[key].double() for r in refs) / len(refs)).to(refs[0][key].dtype)  # type: ignore[union-attr]


def exact(got: torch.Tensor, want: torch.Tensor, key: str) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape, key
    assert torch.equal(got.reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8)), key


# ---------------------------------------------------------------- Megatron torch_dist


def test_megatron_run_to_a_run_folder_that_torch_reads_as_the_exact_mean(tmp_path: Path) -> None:
    out = tmp_path / "avg"
    result = cli("swa", RUN, "-o", f"{out}/", "--verify")
    assert result.exit_code == 0, result.output
    iteration = out / "iter_0000009"
    assert sorted(p.name for p in out.iterdir()) == ["iter_0000009", "latest_checkpointed_iteration.txt"]
    assert (out / "latest_checkpointed_iteration.txt").read_text() == "9"  # as Megatron writes it
    assert sorted(p.name for p in iteration.iterdir()) == [".metadata", "__0_0.distcp", "ckptavg.json", "common.pt", "metadata.json"]
    for name in ("common.pt", "metadata.json"):  # copied byte for byte from the newest iteration
        assert (iteration / name).read_bytes() == (NEWEST / name).read_bytes()
    state, refs = torch_view(iteration, tmp_path), [expected(n) for n in ITERS]
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    assert set(tensors) == set(refs[0])  # Megatron's stored names, stacked layers with their global shapes
    for key in refs[0]:
        exact(tensors[key], mean_of(refs, key), key)
    assert tensors["decoder.layers.mlp.linear_fc1.weight"].shape == (2, 32, 16)
    extra = sorted(k for k in state if "_extra_state" in k)
    assert len(extra) == 4 and all("/shard_" in k for k in extra)
    # the one note: what is copied as it is and what is not written (no listing of the files on every run)
    notes = [ln for ln in result.stderr.splitlines() if ln.startswith("Warning: DCP output")]
    assert len(notes) == 1 and "common.pt" in notes[0] and "optimizer and RNG state are not written" in notes[0], notes


def test_megatron_extra_state_is_carried_byte_for_byte_from_the_newest(tmp_path: Path) -> None:
    quiet_average(RUN, f"{tmp_path / 'avg'}/")
    written = FileSystemReader(tmp_path / "avg" / "iter_0000009").read_metadata()
    source = FileSystemReader(NEWEST).read_metadata()

    def raw(md: Any, folder: Path, fqn: str) -> bytes:
        info = next(v for k, v in md.storage_data.items() if k.fqn == fqn)
        with open(folder / info.relative_path, "rb") as f:
            f.seek(info.offset)
            return f.read(info.length)

    extra = [k for k in source.state_dict_metadata if "_extra_state" in k]
    assert len(extra) == 4
    for fqn in extra:
        assert raw(written, tmp_path / "avg" / "iter_0000009", fqn) == raw(source, NEWEST, fqn), fqn


def test_an_iteration_folder_output_has_no_tracker(tmp_path: Path) -> None:
    """-o DIR/iter_N/ (or release/) writes just that folder: the run folder above it is the user's."""
    out = tmp_path / "run" / "iter_0000042"
    (tmp_path / "run").mkdir()
    quiet_average([RUN / n for n in ITERS], f"{out}/")
    assert sorted(p.name for p in out.iterdir()) == [".metadata", "__0_0.distcp", "ckptavg.json", "common.pt", "metadata.json"]
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["iter_0000042"]


def test_our_reader_reads_the_output_as_a_megatron_iteration(tmp_path: Path) -> None:
    quiet_average(RUN, f"{tmp_path / 'avg'}/")
    ckpt = open_checkpoint(tmp_path / "avg" / "iter_0000009")
    refs = [expected(n) for n in ITERS]
    assert set(ckpt.tensors) == set(refs[0]) and ckpt.meta.step == 9 and len(ckpt.extra_state) == 4
    for key, lazy in ckpt.tensors.items():
        exact(lazy.load(), mean_of(refs, key), key)


def test_inspect_shows_the_provenance(tmp_path: Path) -> None:
    from ckptavg.api import inspect_checkpoint

    quiet_average(RUN, f"{tmp_path / 'avg'}/")
    info = inspect_checkpoint(tmp_path / "avg" / "iter_0000009")
    assert info["ckptavg"]["method"] == "swa" and len(info["ckptavg"]["inputs"]) == 3, info["ckptavg"]


def test_the_output_is_byte_deterministic(tmp_path: Path) -> None:
    for name in ("a", "b"):
        quiet_average(RUN, f"{tmp_path / name}/")
    for rel in ("iter_0000009/__0_0.distcp", "iter_0000009/.metadata"):
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel


@pytest.mark.interop
def test_interop_megatron_core_loads_the_average(tmp_path: Path) -> None:
    """megatron-core's own dist_checkpointing.load, with the fixture model's sharded state dict (in a process of
    its own: megatron keeps process-wide state), gives the exact mean of its own loads of the inputs."""
    pytest.importorskip("megatron.core")
    quiet_average(RUN, f"{tmp_path / 'avg'}/")
    script = tmp_path / "load.py"
    script.write_text(MCORE_LOAD)
    loaded = tmp_path / "loaded.safetensors"
    run = subprocess.run([sys.executable, str(script), str(tmp_path / "avg" / "iter_0000009"), str(loaded)],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": str(REPO / "fixtures" / "real")})
    assert run.returncode == 0, run.stderr[-3000:]
    assert "missing <All keys matched successfully>" in run.stdout and "iteration 9" in run.stdout
    got = load_file(loaded)
    refs = [load_file(REPO / "fixtures" / "real" / "megatron" / "expected" / f"{n}.safetensors") for n in ITERS]
    assert set(got) == set(refs[0])
    for key in refs[0]:
        exact(got[key], mean_of(refs, key), key)


MCORE_LOAD = """
import os, socket, sys, warnings
warnings.simplefilter("ignore")
import torch, torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state
from safetensors.torch import save_file
from make_real import _megatron_gpt
s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
dist.init_process_group("gloo")
parallel_state.initialize_model_parallel(1, 1)
model = _megatron_gpt()
loaded = dist_checkpointing.load({"model": model.sharded_state_dict()}, sys.argv[1])
print("missing", model.load_state_dict(loaded["model"], strict=False))
print("iteration", dist_checkpointing.load_common_state_dict(sys.argv[1])["iteration"])
save_file({k: v.contiguous() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}, sys.argv[2])
dist.destroy_process_group()
"""


# ---------------------------------------------------------------- the PyTorch DCP recipe


def model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3), torch.nn.Linear(3, 2, dtype=torch.bfloat16))


def recipe_run(root: Path, n: int = 3) -> list[dict[str, torch.Tensor]]:
    """What the PyTorch DCP recipe saves: {"app": {"model", "optim"}} (and a plain-int step), by dcp.save."""
    states = []
    for i in range(n):
        torch.manual_seed(i)
        m = model()
        opt = torch.optim.Adam(m.parameters())
        m[:2](torch.randn(5, 4)).sum().backward()
        opt.step()
        states.append({k: v.clone() for k, v in m.state_dict().items()})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp_save({"app": {"model": m.state_dict(), "optim": opt.state_dict()}, "step": 10 * (i + 1)},
                     storage_writer=FileSystemWriter(root / f"step-{i}"))
    return states


def test_recipe_average_loads_with_dcp_load_and_holds_no_optimizer(tmp_path: Path) -> None:
    states = recipe_run(tmp_path / "run")
    out = tmp_path / "avg"
    result = cli("swa", tmp_path / "run", "-o", f"{out}/", "--verify")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == [".metadata", "__0_0.distcp", "ckptavg.json"]
    md = FileSystemReader(out).read_metadata()
    assert not any("optim" in k for k in md.state_dict_metadata)
    assert set(md.state_dict_metadata) == {f"app.model.{k}" for k in states[0]} | {"step"}
    fresh = model()
    target = {"app": {"model": fresh.state_dict()}, "step": 0}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp_load(target, checkpoint_id=out, no_dist=True)
    fresh.load_state_dict(target["app"]["model"])
    for key, t in fresh.state_dict().items():
        want = states[-1][key] if key.endswith("num_batches_tracked") else mean_of(states, key)
        exact(t, want, key)
    assert target["step"] == 30  # carried from the newest checkpoint
    converted = torch_view(out, tmp_path)
    assert set(converted) == {"app", "step"} and set(converted["app"]) == {"model"}


def test_max_shard_size_gives_files_of_at_most_that_size(tmp_path: Path) -> None:
    recipe_run(tmp_path / "run")
    out = tmp_path / "avg"
    quiet_average(tmp_path / "run", f"{out}/", write=WriteOptions(max_shard_size="1500B", verify=True))
    files = sorted(out.glob("*.distcp"))
    assert len(files) > 2 and all(f.stat().st_size <= 1500 or len(_items(out, f.name)) == 1 for f in files)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp_to_torch_save(out, tmp_path / "all.pt")


def _items(folder: Path, name: str) -> list[Any]:
    md = FileSystemReader(folder).read_metadata()
    return [k for k, v in md.storage_data.items() if v.relative_path == name]


def test_safetensors_inputs_to_dcp_only_when_asked(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    (tmp_path / "in").mkdir()
    for i in range(2):
        save_file({"w": torch.full((3, 2), float(i)), "b": torch.arange(2.0) * i}, tmp_path / "in" / f"c{i}.safetensors")
    assert cli("swa", tmp_path / "in", "-o", f"{tmp_path / 'hf'}/").exit_code == 0
    assert (tmp_path / "hf" / "model.safetensors").is_file()  # a folder from non-DCP inputs stays Hugging Face
    result = cli("swa", tmp_path / "in", "-o", f"{tmp_path / 'dcp'}/", "--format", "dcp", "--verify")
    assert result.exit_code == 0, result.output
    state = torch_view(tmp_path / "dcp", tmp_path)
    assert set(state) == {"w", "b"} and torch.equal(state["w"], torch.full((3, 2), 0.5))


@pytest.mark.parametrize(("args", "words"), [
    (["-o", "avg.pt", "--format", "dcp"], "writes a folder"),
    (["-o", "{out}/", "--format", "dcp", "--shards", "like-input"], "--shards"),
    (["-o", "{out}/", "--format", "torch"], "format torch writes one file"),
])
def test_refusals_are_one_error_line(tmp_path: Path, args: list[str], words: str) -> None:
    recipe_run(tmp_path / "run", 2)
    result = cli("swa", tmp_path / "run", *[a.replace("{out}", str(tmp_path / "avg")) for a in args])
    assert result.exit_code == 1, result.output
    lines = stderr_lines(result)
    assert len(lines) == 1 and lines[0].startswith("Error: ") and words in lines[0], result.stderr
    assert not (tmp_path / "avg").exists() and not (tmp_path / "avg.pt").exists()


def test_library_refusal_names_the_parameters(tmp_path: Path) -> None:
    recipe_run(tmp_path / "run", 2)
    with pytest.raises(PlanError) as info:
        quiet_average(tmp_path / "run", tmp_path / "avg.pt", write=WriteOptions(format="dcp"))
    assert set(info.value.params) >= {"output", "format"}


# ---------------------------------------------------------------- crash safety and --verify


def test_failure_mid_write_leaves_nothing(tmp_path: Path) -> None:
    calls = 0

    def progress(done: int, total: int) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:  # the first block read: the output's temp files are open (the run reads in one batch)
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        quiet_average(RUN, f"{tmp_path / 'avg'}/", progress=progress)
    assert calls == 1
    assert list(tmp_path.iterdir()) == []  # neither folder, nor temp file, nor tracker


def test_failure_at_the_last_rename_takes_back_what_was_placed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The tracker is renamed last; if that fails, the iteration folder placed before it is removed again."""
    import ckptavg.write.output as output

    real = output.place

    def fail_on_tracker(temp: Path, final: Path, force: bool) -> None:
        if final.name == "latest_checkpointed_iteration.txt":
            raise OutputError(f"{final}: cannot finish writing (test).")
        real(temp, final, force)

    monkeypatch.setattr(output, "place", fail_on_tracker)
    with pytest.raises(OutputError, match="test"):
        quiet_average(RUN, f"{tmp_path / 'avg'}/")
    assert list(tmp_path.iterdir()) == []


def test_verify_catches_a_corrupted_write_before_it_appears(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = DcpWriter._data

    def flipping(self: DcpWriter, file: Any, data: memoryview) -> None:  # a bug between the CRC and the disk
        damaged = bytearray(data)
        damaged[len(damaged) // 2] ^= 0x01
        real(self, file, memoryview(damaged))

    monkeypatch.setattr(DcpWriter, "_data", flipping)
    quiet_average(RUN, f"{tmp_path / 'unchecked'}/")  # without --verify the damage lands
    assert (tmp_path / "unchecked" / "iter_0000009" / ".metadata").is_file()
    result = cli("swa", RUN, "-o", f"{tmp_path / 'checked'}/", "--verify")
    assert result.exit_code == 1, result.output
    lines = stderr_lines(result)
    assert len(lines) == 1 and "does not hold the values written" in lines[0], result.stderr
    assert str(tmp_path / "checked") in lines[0] and ".ckptavg-verify" not in lines[0]
    assert not (tmp_path / "checked").exists() and not list(tmp_path.rglob(TEMP_GLOB))


def test_verify_catches_nan_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = DcpWriter.write_part

    def poisoned(self: DcpWriter, block: torch.Tensor) -> None:
        real(self, torch.full_like(block, float("nan")) if block.is_floating_point() else block)

    monkeypatch.setattr(DcpWriter, "write_part", poisoned)
    with pytest.raises(OutputError, match="NaN or Inf"):
        quiet_average(RUN, f"{tmp_path / 'avg'}/", write=WriteOptions(verify=True))
    assert list(tmp_path.iterdir()) == []


def test_verify_catches_a_metadata_torch_cannot_use(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A .metadata that names a tensor's chunk at the wrong place: torch's load must fail, so verify does."""
    from ckptavg.write import dcp_folder

    real = dcp_folder.metadata_pickle

    def shifted(*args: Any) -> bytes:
        md = pickle.loads(real(*args))
        for info in md.storage_data.values():
            info.offset += 1
        return pickle.dumps(md)

    monkeypatch.setattr(dcp_folder, "metadata_pickle", shifted)
    with pytest.raises(OutputError, match="Nothing was written"):
        quiet_average(RUN, f"{tmp_path / 'avg'}/", write=WriteOptions(verify=True))
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_force_and_stale_data_files_are_refused(tmp_path: Path) -> None:
    quiet_average(RUN, f"{tmp_path / 'avg'}/")
    result = cli("swa", RUN, "-o", f"{tmp_path / 'avg'}/")
    assert result.exit_code == 1 and "--force" in stderr_lines(result)[0], result.output
    assert cli("swa", RUN, "-o", f"{tmp_path / 'avg'}/", "--force").exit_code == 0
    shutil.copy(tmp_path / "avg" / "iter_0000009" / "__0_0.distcp", tmp_path / "avg" / "iter_0000009" / "__1_0.distcp")
    result = cli("swa", RUN, "-o", f"{tmp_path / 'avg'}/", "--force")
    assert result.exit_code == 1 and "__1_0.distcp" in stderr_lines(result)[0], result.output


def test_output_into_the_input_run_is_refused(tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(RUN, run)
    result = cli("swa", run, "-o", f"{run}/", "--force")
    assert result.exit_code == 1 and "input" in stderr_lines(result)[0], result.output
    assert sorted(p.name for p in run.iterdir()) == sorted(p.name for p in RUN.iterdir())


def test_a_torchrun_job_writes_safetensors_shards_unless_dcp_is_asked(tmp_path: Path) -> None:
    """A DCP output is written by one process: under torchrun (parts > 1) the default stays a safetensors folder,
    and an explicit format dcp is refused before any work."""
    from ckptavg.api import prepare
    from ckptavg.methods.uniform import Swa
    from ckptavg.read.checkpoint import LoadOptions
    from ckptavg.select import Selection
    from ckptavg.write.dcp_folder import DcpOutput

    def job(fmt: str | None, parts: int) -> Any:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CkptavgWarning)
            return prepare(RUN, f"{tmp_path / 'avg'}/", Swa(), select=Selection(), load=LoadOptions(),
                           write=WriteOptions(format=fmt), bn=None, parts=parts)

    assert isinstance(job(None, 1).output, DcpOutput)
    shards = job(None, 2).output
    assert not isinstance(shards, DcpOutput) and all(sh.name.endswith(".safetensors") for sh in shards.shards)
    with pytest.raises(PlanError, match="torchrun"):
        job("dcp", 2)


def test_every_dtype_and_odd_shape_reads_back_in_torch(tmp_path: Path) -> None:
    """float8 and uint16 (pickled through untyped storages), bool, float16, a 0-d and an empty tensor."""
    from safetensors.torch import save_file

    (tmp_path / "in").mkdir()
    states = [{"f8": torch.full((3,), float(i)).to(torch.float8_e4m3fn), "u16": torch.arange(4).to(torch.uint16) * (i + 1),
               "empty": torch.zeros(0, 3), "scalar": torch.tensor(float(i)), "b": torch.tensor([True, False]),
               "h": torch.full((2, 2), 1.5 * i, dtype=torch.float16)} for i in range(2)]
    for i, st in enumerate(states):
        save_file(st, tmp_path / "in" / f"c{i}.safetensors")
    result = cli("swa", tmp_path / "in", "-o", f"{tmp_path / 'out'}/", "--format", "dcp", "--verify")
    assert result.exit_code == 0, result.output
    got = torch_view(tmp_path / "out", tmp_path)
    assert set(got) == set(states[0])
    for key in ("f8", "empty", "scalar", "h"):
        exact(got[key], mean_of(states, key), key)
    exact(got["u16"], states[-1]["u16"], "u16")  # integers are copied from the newest
    exact(got["b"], states[-1]["b"], "b")
