"""Many outputs from one read: each row of a weight matrix equals its single-row run bit for bit, and every
checkpoint's block is read once however many rows weigh it (docs/ALGORITHMS.md §12)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ckptavg.layout import TensorSpec, check_layout
from ckptavg.read.checkpoint import Checkpoint
from ckptavg.read.layouts import open_checkpoint
from ckptavg.reduce import batches
from ckptavg.reduce.cpu import stream_cpu_rows
from ckptavg.reduce.stream import stream_reduce
from ckptavg.reduce.tensor import reduce_rows, reduce_tensor

ROWS = [
    [0.25, 0.25, 0.25, 0.25],  # uniform: summed, then divided once
    [0.1, 0.2, 0.3, 0.4],
    [0.0, 0.5, 0.5, 0.0],  # a window: zeros outside
    [0.0, 0.0, 0.0, 0.0],  # nothing weighed: zeros out
    [0.0, 0.0, 0.0, 1.0],
    [0.5, 0.5, 0.0, 0.0],
]


def _checkpoints(tmp_path: Path) -> tuple[list[TensorSpec], list[Checkpoint]]:
    g = torch.Generator().manual_seed(3)
    ckpts = []
    for i in range(4):
        sd = {"a": torch.randn(5000, generator=g), "b": torch.randn(7, 9, generator=g).to(torch.bfloat16),
              "h": torch.randn(300, generator=g).to(torch.float16), "n": torch.tensor(i),
              "c": torch.randn(3000, generator=g) * 1e3}
        path = tmp_path / f"c{i}.safetensors"
        save_file(sd, str(path))
        ckpts.append(open_checkpoint(path))
    return check_layout(ckpts), ckpts


def _collect(specs: list[TensorSpec], n: int) -> tuple[list[dict[str, torch.Tensor]], list[object]]:
    out: list[dict[str, torch.Tensor]] = [{s.name: torch.empty(s.shape, dtype=s.out_dtype).reshape(-1) for s in specs}
                                          for _ in range(n)]

    def sink_for(r: int) -> object:
        def sink(spec: TensorSpec, start: int, block: torch.Tensor) -> None:
            out[r][spec.name][start : start + block.numel()] = block
        return sink

    return out, [sink_for(r) for r in range(n)]


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("block", [64, 1000, 128 * 1024])
def test_each_row_equals_its_single_run_bit_for_bit(tmp_path: Path, workers: int, block: int) -> None:
    specs, ckpts = _checkpoints(tmp_path)
    many, sinks = _collect(specs, len(ROWS))
    stream_cpu_rows(specs, ckpts, lambda s: ROWS, sinks, torch.float64, None, block, workers)  # type: ignore[arg-type]
    for r, weights in enumerate(ROWS):
        [single], [sink] = _collect(specs, 1)
        stream_reduce(specs, ckpts, lambda s, w=weights: w, sink, block_elems=block)  # type: ignore[misc]
        for s in specs:
            assert torch.equal(many[r][s.name], single[s.name]), (r, s.name)
            assert many[r][s.name].dtype == s.out_dtype


def test_every_block_is_read_once_for_all_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Six rows cost the reads of one: count the bytes pread from the files."""
    specs, ckpts = _checkpoints(tmp_path)
    read: list[int] = []
    real = batches.read_share

    def counting(files: batches.FileHandles, batch: batches.Batch, lazies: list, view: memoryview) -> int:  # type: ignore[type-arg]
        n = real(files, batch, lazies, view)
        read.append(n)
        return n

    import ckptavg.reduce.cpu as cpu

    monkeypatch.setattr(cpu, "read_share", counting)
    _, sinks = _collect(specs, len(ROWS))
    stream_cpu_rows(specs, ckpts, lambda s: ROWS, sinks, torch.float64, None, 1000, 2)  # type: ignore[arg-type]
    streamed = sum(c.tensors[s.name].nbytes for s in specs if s.averaged for c in ckpts)
    assert sum(read) == streamed  # every checkpoint is weighed by some row: each byte read exactly once


def test_whole_tensor_rows_match_reduce_tensor(tmp_path: Path) -> None:
    specs, ckpts = _checkpoints(tmp_path)
    for s in specs:
        reads: list[int] = []
        many = reduce_rows(s, ckpts, ROWS, on_read=reads.append)
        for weights, got in zip(ROWS, many, strict=True):
            assert torch.equal(got, reduce_tensor(s, ckpts, weights)), s.name
        if s.averaged:  # each checkpoint loaded once
            assert len(reads) == 4
        else:  # integers are copied from the newest checkpoint each row weighs
            assert [int(t) for t in many] == [3, 3, 2, 3, 3, 1]
