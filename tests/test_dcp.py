"""PyTorch Distributed Checkpoint folders as inputs: written here with torch.distributed.checkpoint.save in
one process (no process group), read back by ckptavg without torch.distributed.

References are the saved tensors themselves and torch.distributed.checkpoint.load, never ckptavg.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import shlex
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from refs import ranged_bytes
from safetensors.torch import load_file
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.filesystem import FileSystemWriter, SerializationFormat
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex
from torch.distributed.checkpoint.planner import SavePlan, TensorWriteData, WriteItem, WriteItemType
from torch.distributed.checkpoint.state_dict_loader import load as dcp_load
from torch.distributed.checkpoint.state_dict_saver import save as dcp_save
from typer.testing import Result

from ckptavg import CheckpointFormatError
from ckptavg.read.checkpoint import LoadOptions
from ckptavg.read.dcp import DcpTensor, assemble
from ckptavg.read.discover import find_checkpoints
from ckptavg.read.layouts import open_checkpoint

Cli = Callable[..., Result]


# ---------------------------------------------------------------- helpers


def save(state: dict[str, Any], folder: Path, **writer: Any) -> Path:
    """torch.distributed.checkpoint.save in this process; extra arguments go to FileSystemWriter."""
    planner = writer.pop("planner", None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no process group: saving as a single process"
        dcp_save(state, storage_writer=FileSystemWriter(folder, **writer), planner=planner)
    return folder


def weights(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "conv.weight": torch.randn(4, 2, 3, 3, generator=g),
        "conv.bias": torch.randn(4, generator=g),
        "head.weight": torch.randn(3, 4, generator=g).to(torch.bfloat16),
        "bn.running_var": torch.rand(4, generator=g) + 0.5,
        "bn.num_batches_tracked": torch.tensor(10 * seed),
    }


def training_state(seed: int, step: int | None = None) -> dict[str, Any]:
    """What an FSDP-style loop saves: model and optimizer state side by side, plus a plain-int counter."""
    w = weights(seed)
    state: dict[str, Any] = {
        "model": w,
        "optim": {
            "state": {0: {"exp_avg": torch.ones(4, 2, 3, 3) * seed, "step": torch.tensor(float(seed))}},
            "param_groups": [{"lr": 0.1, "betas": (0.9, 0.999), "params": [0]}],
        },
    }
    if step is not None:
        state["step"] = step
    return state


def assert_same(got: dict[str, Any], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for k, t in want.items():
        g = got[k].load() if isinstance(got[k], DcpTensor) else got[k]
        assert g.dtype == t.dtype and g.shape == t.shape, k
        assert torch.equal(g, t), k


class BlockPlanner(DefaultSavePlanner):
    """Saves `fqn` as a grid of blocks, as several ranks holding parts of it would (e.g. FSDP + TP)."""

    def __init__(self, fqn: str, blocks: list[tuple[tuple[int, int], tuple[int, int]]]) -> None:
        super().__init__()
        self.fqn, self.blocks = fqn, blocks

    def create_local_plan(self) -> SavePlan:
        plan = super().create_local_plan()
        items: list[WriteItem] = []
        for item in plan.items:
            if item.index.fqn != self.fqn or item.tensor_data is None:
                items.append(item)
                continue
            for start, sizes in self.blocks:
                chunk = ChunkStorageMetadata(torch.Size(start), torch.Size(sizes))
                data = TensorWriteData(chunk, item.tensor_data.properties, item.tensor_data.size)
                items.append(WriteItem(MetadataIndex(self.fqn, start), WriteItemType.SHARD, tensor_data=data))
        self.plan = dataclasses.replace(plan, items=items)
        return self.plan

    def resolve_data(self, write_item: WriteItem) -> Any:
        if write_item.index.fqn != self.fqn or write_item.tensor_data is None:
            return super().resolve_data(write_item)
        t = self.state_dict[self.fqn]  # the planner holds the flattened state dict
        chunk = write_item.tensor_data.chunk
        for dim, (o, n) in enumerate(zip(chunk.offsets, chunk.sizes, strict=True)):
            t = t.narrow(dim, o, n)
        return t.contiguous()


GRID = [((0, 0), (2, 3)), ((0, 3), (2, 2)), ((2, 0), (3, 5))]  # uneven blocks of a 5 x 5 tensor
ROWS = [((3, 0), (2, 5)), ((0, 0), (1, 5)), ((1, 0), (2, 5))]  # blocks of whole rows, as ranks split dim 0


def rewrite_metadata(folder: Path, change: Callable[[Any], None]) -> None:
    """Edit a folder's metadata (our own file, so plain pickle is fine here)."""
    md = pickle.loads((folder / ".metadata").read_bytes())
    change(md)
    (folder / ".metadata").write_bytes(pickle.dumps(md))


class _RunsShellCommand:
    """Unpickling this object calls os.system (the classic malicious-pickle payload)."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (self.command,))


def one_error_line(result: Result) -> str:
    assert result.exit_code == 1, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    lines = [ln for ln in result.stderr.splitlines() if ln.strip() and not ln.startswith("Warning: ")]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    return lines[0]


# ---------------------------------------------------------------- reading


def test_model_weights_read_back_tensor_for_tensor(tmp_path: Path) -> None:
    folder = save(training_state(1, step=120), tmp_path / "ckpt")
    ckpt = open_checkpoint(folder)
    assert (ckpt.format, ckpt.location) == ("dcp", "model")
    assert_same(ckpt.tensors, weights(1))  # optimizer state is not among the weights
    assert all(isinstance(t, DcpTensor) and t.streamable for t in ckpt.tensors.values())  # read block by block
    for t in ckpt.tensors.values():
        assert ranged_bytes(t, 5) == t.load().reshape(-1).view(torch.uint8).numpy().tobytes()
    assert sorted(ckpt.other_entries) == ["optim", "step"]
    assert (ckpt.meta.step, ckpt.meta.step_source) == (120, "DCP checkpoint 'step'")


def test_key_reaches_other_parts_and_trust_pickle_reads_the_same(tmp_path: Path) -> None:
    folder = save(training_state(2, step=5), tmp_path / "ckpt")
    optim = open_checkpoint(folder, LoadOptions(key="optim.state"))
    assert_same(optim.tensors, {"0.exp_avg": torch.ones(4, 2, 3, 3) * 2, "0.step": torch.tensor(2.0)})
    trusted = open_checkpoint(folder, LoadOptions(trust_pickle=True))  # real DCP classes instead of stand-ins
    assert_same(trusted.tensors, weights(2))
    with pytest.raises(CheckpointFormatError, match=r"no tensors under 'optimizer'.*model, optim, step.*--key"):
        open_checkpoint(folder, LoadOptions(key="optimizer"))


def test_torchtitan_layout_weights_at_top_level(tmp_path: Path) -> None:
    """torchtitan saves the model's keys at the top level, next to optimizer and train_state. With a
    Hugging Face model those keys start with `model.`, which must not be mistaken for a `model` entry."""
    g = torch.Generator().manual_seed(3)
    w = {"model.embed_tokens.weight": torch.randn(6, 4, generator=g), "model.norm.weight": torch.randn(4, generator=g),
         "lm_head.weight": torch.randn(6, 4, generator=g)}
    state = {**w, "optimizer": {"state.conv.weight.exp_avg": torch.zeros(4, 2, 3, 3)},
             "lr_scheduler": {"last_epoch": 7}, "train_state": {"step": torch.tensor(700, dtype=torch.int32)}}
    ckpt = open_checkpoint(save(state, tmp_path / "step-800"))
    assert ckpt.location == "(top level)"
    assert_same(ckpt.tensors, w)
    assert (ckpt.meta.step, ckpt.meta.step_source) == (700, "DCP 'train_state' 'step'")
    assert sorted(ckpt.other_entries) == ["lr_scheduler", "optimizer", "train_state"]


def test_chunks_from_several_ranks_are_assembled(tmp_path: Path) -> None:
    full = torch.arange(25, dtype=torch.float32).reshape(5, 5) * 1.5
    state = {"model": {"w": full, "b": torch.ones(3)}}
    # one file per item, as if each block came from a different rank
    folder = save(state, tmp_path / "sharded", planner=BlockPlanner("model.w", GRID), single_file_per_rank=False)
    ckpt = open_checkpoint(folder)
    w = ckpt.tensors["w"]
    assert isinstance(w, DcpTensor) and [c.sizes for c in w.chunks] == [(2, 3), (2, 2), (3, 5)]
    assert len({c.stored.file for c in w.chunks}) == 3
    assert torch.equal(w.load(), full)
    reference = {"model": {"w": torch.zeros(5, 5), "b": torch.zeros(3)}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp_load(reference, checkpoint_id=folder)
    assert torch.equal(reference["model"]["w"], full)  # torch reads the same folder the same way


@pytest.mark.parametrize("fmt", [SerializationFormat.TORCH_SAVE, SerializationFormat.SAFETENSORS])
def test_row_blocks_stream_and_other_splits_are_assembled(tmp_path: Path, cli: Cli, fmt: SerializationFormat) -> None:
    """Chunks of whole rows (each rank's part of dim 0) are read block by block straight from the files;
    a split along another dimension is assembled whole. Either way the average is the mean."""
    fulls = [torch.arange(25, dtype=torch.float32).reshape(5, 5) * (i + 0.5) for i in range(3)]
    folders = []
    for i, full in enumerate(fulls):
        blocks = ROWS if i != 1 else GRID  # one checkpoint split otherwise: the tensor is then reduced whole
        folders.append(save({"model": {"w": full}, "step": i}, tmp_path / f"ckpt{i}", planner=BlockPlanner("model.w", blocks),
                            serialization_format=fmt, single_file_per_rank=False))
    rows, grid = open_checkpoint(folders[0]).tensors["w"], open_checkpoint(folders[1]).tensors["w"]
    assert isinstance(rows, DcpTensor) and isinstance(grid, DcpTensor)
    assert rows.streamable and not grid.streamable
    assert len({path for path, _, _ in rows.ranges(0, 25)}) == 3  # three files, one per "rank"
    for block in (1, 4, 7, 25):
        assert ranged_bytes(rows, block) == fulls[0].reshape(-1).view(torch.uint8).numpy().tobytes()
    for name, chosen in (("all", folders), ("rows", folders[::2])):
        out = tmp_path / f"{name}.safetensors"
        r = cli("swa", *chosen, "-o", out)
        assert r.exit_code == 0, r.output
        want = torch.stack([fulls[int(f.name[-1])] for f in chosen]).double().mean(0).float()
        assert torch.equal(load_file(out)["w"], want)


def test_a_chunk_that_cannot_be_located_is_read_whole_and_judged_there(tmp_path: Path) -> None:
    folder = save({"model": weights(1)}, tmp_path / "ckpt")
    (data,) = folder.glob("*.distcp")
    raw = bytearray(data.read_bytes())
    raw[64:72] = b"\xff" * 8  # inside the first item's pickle
    data.write_bytes(raw)
    t = open_checkpoint(folder).tensors["conv.weight"]
    assert isinstance(t, DcpTensor) and not t.streamable
    with pytest.raises(CheckpointFormatError, match="cannot be decoded"):
        t.load()


def test_assemble_places_blocks_and_refuses_overlap_and_gaps() -> None:
    full = torch.arange(30.0).reshape(5, 6)
    blocks = [((0, 0), full[:2, :4]), ((0, 4), full[:2, 4:]), ((2, 0), full[2:])]
    assert torch.equal(assemble("t", (5, 6), torch.float32, blocks), full)
    with pytest.raises(CheckpointFormatError, match="overlap"):
        assemble("t", (5, 6), torch.float32, [((0, 0), full[:3]), ((2, 0), full[2:])])
    with pytest.raises(CheckpointFormatError, match="unwritten"):
        assemble("t", (5, 6), torch.float32, [((0, 0), full[:2]), ((3, 0), full[3:])])
    with pytest.raises(CheckpointFormatError, match="does not fit"):
        assemble("t", (5, 6), torch.float32, [((4, 0), full[:2])])


def test_safetensors_serialization_format(tmp_path: Path) -> None:
    state = training_state(4, step=9)
    state["model"]["tiny"] = torch.tensor([1.5, -2.0, 3.25], dtype=torch.bfloat16)  # 6 bytes: shorter than a header length
    folder = save(state, tmp_path / "st", serialization_format=SerializationFormat.SAFETENSORS)
    ckpt = open_checkpoint(folder)
    assert_same(ckpt.tensors, state["model"])
    assert ckpt.meta.step == 9
    # blocks in files of their own, as several ranks write them
    full = torch.arange(25, dtype=torch.float64).reshape(5, 5)
    folder = save({"model": {"w": full}}, tmp_path / "blocks", planner=BlockPlanner("model.w", GRID),
                  serialization_format=SerializationFormat.SAFETENSORS, single_file_per_rank=False)
    assert_same(open_checkpoint(folder).tensors, {"w": full})


def test_discovery_one_checkpoint_per_folder_ordered_by_step(tmp_path: Path, cli: Cli) -> None:
    runs = tmp_path / "runs"
    for seed, step in ((1, 5), (2, 40), (3, 10)):  # no step inside: the folder name says it
        save(training_state(seed), runs / f"checkpoint-{step}")
    (runs / "notes.txt").write_text("not a checkpoint\n")
    assert find_checkpoints(runs / "checkpoint-40") == [runs / "checkpoint-40"]
    assert sorted(find_checkpoints(runs)) == sorted(runs / f"checkpoint-{s}" for s in (5, 10, 40))
    result = cli("plan", "swa", runs, "--json")
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    assert [(c["step"], c["step_source"], c["format"]) for c in plan["checkpoints"]] == [
        (5, "file name", "dcp"), (10, "file name", "dcp"), (40, "file name", "dcp")
    ]


def test_swa_over_dcp_folders_equals_mean_and_plain_files(tmp_path: Path, cli: Cli) -> None:
    runs, plain = tmp_path / "runs", tmp_path / "plain"
    plain.mkdir()
    for seed in (1, 2, 3):
        save(training_state(seed, step=100 * seed), runs / f"step-{100 * seed}")
        torch.save({"model": weights(seed), "step": 100 * seed}, plain / f"step-{100 * seed}.pt")
    out_dcp, out_pt = tmp_path / "dcp.safetensors", tmp_path / "pt.safetensors"
    for src, out in ((runs, out_dcp), (plain, out_pt)):
        result = cli("swa", src, "-o", out, "-q")
        assert result.exit_code == 0, result.output
    got, from_pt = load_file(out_dcp), load_file(out_pt)
    sds = [weights(s) for s in (1, 2, 3)]
    for k, t in sds[0].items():
        # float64 mean rounded once; integer tensors come from the newest checkpoint
        want = torch.stack([sd[k].double() for sd in sds]).mean(0).to(t.dtype) if t.is_floating_point() else sds[-1][k]
        assert got[k].dtype == t.dtype and torch.equal(got[k], want), k
        assert torch.equal(got[k], from_pt[k]), k
    assert sorted(got) == sorted(sds[0])


# ---------------------------------------------------------------- refusing bad input


@pytest.mark.parametrize("where", ["whole file", "inside real metadata"])
def test_malicious_metadata_is_refused_and_never_runs(tmp_path: Path, cli: Cli, where: str) -> None:
    folder = save(training_state(1), tmp_path / "evil")
    marker = tmp_path / "MARKER"
    payload = _RunsShellCommand(f"touch {shlex.quote(str(marker))}")
    if where == "whole file":
        (folder / ".metadata").write_bytes(pickle.dumps(payload))
    else:
        rewrite_metadata(folder, lambda md: setattr(md, "planner_data", payload))
    with pytest.raises(CheckpointFormatError, match=r"\.metadata: safe loading refused .*system.*--trust-pickle"):
        open_checkpoint(folder)
    line = one_error_line(cli("swa", folder, "-o", tmp_path / "out.safetensors"))
    assert ".metadata" in line and "--trust-pickle" in line
    assert not marker.exists()
    assert not (tmp_path / "out.safetensors").exists()


def test_missing_data_file(tmp_path: Path, cli: Cli) -> None:
    folder = save(training_state(1), tmp_path / "ckpt", single_file_per_rank=False)
    victim = sorted(folder.glob("*.distcp"))[3]
    victim.unlink()
    with pytest.raises(CheckpointFormatError, match=f"data file '{victim.name}' .* is missing; copy the whole"):
        open_checkpoint(folder)
    assert victim.name in one_error_line(cli("inspect", folder))


def test_truncated_data_file(tmp_path: Path, cli: Cli) -> None:
    folder = save(training_state(1), tmp_path / "ckpt")
    (data,) = folder.glob("*.distcp")
    data.write_bytes(data.read_bytes()[:-100])
    with pytest.raises(CheckpointFormatError, match=f"{data.name}: file is truncated .*re-copy"):
        open_checkpoint(folder)
    assert "truncated" in one_error_line(cli("swa", folder, "-o", tmp_path / "o.safetensors"))


@pytest.mark.parametrize(("start", "match"), [(0, "neither a torch.save archive nor safetensors"), (64, "cannot be decoded")])
def test_corrupt_chunk_bytes_are_an_error_on_load(tmp_path: Path, start: int, match: str) -> None:
    folder = save({"model": weights(1)}, tmp_path / "ckpt")
    (data,) = folder.glob("*.distcp")
    raw = bytearray(data.read_bytes())
    raw[start:start + 8] = b"\xff" * 8  # the first item's zip header, or its pickle
    data.write_bytes(raw)
    ckpt = open_checkpoint(folder)
    with pytest.raises(CheckpointFormatError, match=f"{data.name}: 'model.conv.weight' .*{match}.*corrupt"):
        ckpt.tensors["conv.weight"].load()


@pytest.mark.parametrize(("content", "match"), [
    (b"", "corrupt DCP metadata"),
    (b"\x80\x04\x95garbage", "corrupt DCP metadata"),
    (b'{"weight_map": {}}', "HuggingFaceStorageWriter"),
])
def test_corrupt_or_foreign_metadata(tmp_path: Path, content: bytes, match: str) -> None:
    folder = save({"model": weights(1)}, tmp_path / "ckpt")
    (folder / ".metadata").write_bytes(content)
    with pytest.raises(CheckpointFormatError, match=match):
        open_checkpoint(folder)


def test_truncated_metadata(tmp_path: Path) -> None:
    folder = save({"model": weights(1)}, tmp_path / "ckpt")
    raw = (folder / ".metadata").read_bytes()
    (folder / ".metadata").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointFormatError, match=r"\.metadata: corrupt DCP metadata .*re-copy"):
        open_checkpoint(folder)


def test_missing_chunk_and_compressed_chunks(tmp_path: Path) -> None:
    state = {"model": {"w": torch.ones(5, 5)}}
    folder = save(state, tmp_path / "part", planner=BlockPlanner("model.w", GRID))
    rewrite_metadata(folder, lambda md: md.state_dict_metadata["model.w"].chunks.pop())
    with pytest.raises(CheckpointFormatError, match=r"'model.w' hold 10 of its 25 elements; .*incomplete"):
        open_checkpoint(folder)

    folder = save(state, tmp_path / "zstd")

    def compress(md: Any) -> None:
        for info in md.storage_data.values():
            info.transform_descriptors = ["stream.zstd/1"]

    rewrite_metadata(folder, compress)
    with pytest.raises(CheckpointFormatError, match=r"'model.w' is stored through stream.zstd/1 .*without extensions"):
        open_checkpoint(folder).tensors["w"].load()


def test_rank_local_metadata_is_a_clear_error(tmp_path: Path) -> None:
    folder = tmp_path / "local"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp_save({"model": weights(1)}, checkpoint_id=folder, use_collectives=False)
    assert (folder / "__0.metadata").is_file() and not (folder / ".metadata").exists()
    assert find_checkpoints(folder) == [folder]
    with pytest.raises(CheckpointFormatError, match="rank-local metadata .*use_collectives=True"):
        open_checkpoint(folder)
