"""The blocked, prefetched reducer: same result as the whole-tensor path for any block size, and a reader
thread that always stops, on success, on a read error and on a failure in the consumer."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from refs import FORMATS, RUNS
from safetensors.torch import save_file

import ckptavg.reduce.cpu
from ckptavg.errors import CheckpointFormatError
from ckptavg.layout import TensorSpec, check_layout
from ckptavg.read.checkpoint import Checkpoint
from ckptavg.read.discover import find_checkpoints
from ckptavg.read.layouts import open_checkpoint
from ckptavg.reduce.cpu import stream_cpu
from ckptavg.reduce.stream import stream_reduce
from ckptavg.reduce.tensor import reduce_tensor, work_bytes


def _collect(specs: list[TensorSpec], ckpts: list[Checkpoint], weights: list[float], **kw: object) -> dict[str, torch.Tensor]:
    """Run stream_reduce, checking that blocks arrive in order, and assemble whole tensors."""
    out: dict[str, list[torch.Tensor]] = {}
    seen: list[str] = []

    def sink(spec: TensorSpec, start: int, block: torch.Tensor) -> None:
        assert block.dtype == spec.out_dtype
        parts = out.setdefault(spec.name, [])
        assert start == sum(p.numel() for p in parts), "blocks out of order"
        parts.append(block.clone())
        if not seen or seen[-1] != spec.name:
            seen.append(spec.name)

    stream_reduce(specs, ckpts, lambda s: weights, sink, **kw)  # type: ignore[arg-type]
    assert seen == [s.name for s in specs], "tensors out of order"
    return {k: torch.cat(v).reshape(next(s.shape for s in specs if s.name == k)) for k, v in out.items()}


def _whole(specs: list[TensorSpec], ckpts: list[Checkpoint], weights: list[float]) -> dict[str, torch.Tensor]:
    return {s.name: reduce_tensor(s, ckpts, weights) for s in specs}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("block", [1, 7, 1000, 1 << 20])
def test_blocks_equal_whole_tensor_path(fmt: str, block: int) -> None:
    ckpts = [open_checkpoint(p) for p in find_checkpoints(RUNS / fmt)]
    specs = check_layout(ckpts)
    weights = [0.0, 0.1, 0.2, 0.3, 0.15, 0.25][: len(ckpts)]  # a zero weight: that file is never read
    got = _collect(specs, ckpts, weights, block_elems=block)
    want = _whole(specs, ckpts, weights)
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k  # bit for bit: the same float64 sums in the same order


def _write_set(tmp_path: Path, tensors: list[dict[str, torch.Tensor]]) -> list[Checkpoint]:
    paths = []
    for i, t in enumerate(tensors):
        paths.append(tmp_path / f"c{i}.safetensors")
        save_file(t, paths[-1])
    return [open_checkpoint(p) for p in paths]


def test_mixed_dtypes_complex_empty_and_zero_d(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    sets = [
        {
            "half": torch.randn(33, generator=g).to(torch.float16 if i == 0 else torch.float32),
            "empty": torch.empty(0, 4),
            "scalar": torch.tensor(float(i)),
            "count": torch.tensor(10 * i, dtype=torch.int64),
            "c": torch.randn(5, generator=g, dtype=torch.complex64),
            "big": torch.randn(3, 50, generator=g, dtype=torch.bfloat16),
        }
        for i in range(3)
    ]
    ckpts = _write_set(tmp_path, sets)
    specs = check_layout(ckpts, torch.float32)
    weights = [0.5, 0.25, 0.25]
    got = _collect(specs, ckpts, weights, block_elems=8)
    for k, want in _whole(specs, ckpts, weights).items():
        assert torch.equal(got[k], want), k
    assert got["count"].item() == 20  # copied from the newest checkpoint with a weight
    assert got["empty"].shape == (0, 4)


def test_read_error_surfaces_and_reader_stops(tmp_path: Path) -> None:
    ckpts = _write_set(tmp_path, [{"w": torch.ones(4000)} for _ in range(3)])
    specs = check_layout(ckpts)
    with open(ckpts[2].path, "r+b") as f:  # truncate after the header was read: the data runs short
        f.truncate(ckpts[2].path.stat().st_size - 100)
    before = threading.active_count()
    with pytest.raises(CheckpointFormatError, match="c2.safetensors: file is truncated"):
        stream_reduce(specs, ckpts, lambda s: [1 / 3] * 3, lambda *a: None, block_elems=256)
    assert threading.active_count() == before


def test_consumer_failure_stops_reader(tmp_path: Path) -> None:
    ckpts = _write_set(tmp_path, [{"w": torch.ones(100_000)} for _ in range(4)])
    specs = check_layout(ckpts)
    before = threading.active_count()

    def sink(spec: TensorSpec, start: int, block: torch.Tensor) -> None:
        if start > 0:
            raise KeyboardInterrupt  # Ctrl-C while the reader is blocked on a full queue

    with pytest.raises(KeyboardInterrupt):
        stream_reduce(specs, ckpts, lambda s: [0.25] * 4, sink, block_elems=100)
    assert threading.active_count() == before


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64, torch.complex64])
def test_progress_counts_the_bytes_read(tmp_path: Path, dtype: torch.dtype) -> None:
    """on_read reports file bytes (not the widened copies), so a progress bar ends exactly at its total."""
    g = torch.Generator().manual_seed(0)
    ckpts = _write_set(tmp_path, [
        {"big": torch.randn(3000, generator=g).to(dtype), "small": torch.randn(5, generator=g).to(dtype),
         "count": torch.tensor(i)} for i in range(3)
    ])
    specs = check_layout(ckpts)
    reported: list[int] = []
    weights = [0.5, 0.25, 0.25]
    _collect(specs, ckpts, weights, block_elems=1000, on_read=reported.append)
    # every input byte of the averaged tensors, one copy of the integer one: the total a progress bar is given
    assert sum(reported) == sum(work_bytes(s, ckpts, [weights]) for s in specs) == 3 * 3005 * dtype.itemsize + 8
    assert all(n > 0 for n in reported)


def _worker_set(tmp_path: Path) -> tuple[list[TensorSpec], list[Checkpoint]]:
    g = torch.Generator().manual_seed(1)
    ckpts = _write_set(tmp_path, [
        {"a": torch.randn(5000, generator=g), "b": torch.randn(7, 9, generator=g).to(torch.bfloat16),
         "n": torch.tensor(i), "c": torch.randn(3000, generator=g)} for i in range(4)
    ])
    return check_layout(ckpts, torch.float32), ckpts


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_any_number_of_workers_gives_the_same_bits_in_order(
    tmp_path: Path, workers: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Workers finish batches out of order; the sink still sees them in order, one call at a time.

    The sink holds the first batch until every worker has read a batch of its own, so each worker has a
    result waiting for its turn however the threads are scheduled (a loaded machine could otherwise let
    one worker run through all ~80 tiny batches before the others start)."""
    specs, ckpts = _worker_set(tmp_path)
    weights = [0.1, 0.2, 0.3, 0.4]
    got: dict[str, list[torch.Tensor]] = {}
    inside = threading.Lock()
    callers: set[str] = set()
    readers: set[str] = set()
    held: list[bool] = []
    all_reading = threading.Condition()

    original = ckptavg.reduce.cpu.read_share

    def read_share(*args: Any) -> int:
        with all_reading:
            readers.add(threading.current_thread().name)
            all_reading.notify_all()
        return original(*args)

    monkeypatch.setattr(ckptavg.reduce.cpu, "read_share", read_share)

    def sink(spec: TensorSpec, start: int, block: torch.Tensor) -> None:
        assert inside.acquire(blocking=False), "the sink was entered by two workers at once"
        try:
            if threading.current_thread().name in readers and not held:  # a batch (`n` is reduced whole)
                held.append(True)
                with all_reading:
                    assert all_reading.wait_for(lambda: len(readers) == workers, timeout=60)
            parts = got.setdefault(spec.name, [])
            assert start == sum(p.numel() for p in parts), "blocks out of order"
            assert list(got) == [s.name for s in specs][: len(got)], "tensors out of order"
            parts.append(block.clone())
            callers.add(threading.current_thread().name)
        finally:
            inside.release()

    stream_cpu(specs, ckpts, lambda s: weights, sink, torch.float64, None, 100, workers=workers)
    want = _whole(specs, ckpts, weights)
    for s in specs:
        assert torch.equal(torch.cat(got[s.name]).reshape(s.shape), want[s.name]), s.name
    assert len(callers) == workers  # every worker handed over a batch of its own


@pytest.mark.parametrize("exc", [KeyboardInterrupt, OSError])
def test_a_failure_on_a_helper_worker_is_raised_to_the_caller(tmp_path: Path, exc: type[BaseException]) -> None:
    specs, ckpts = _worker_set(tmp_path)
    before = threading.active_count()
    calls: list[str] = []

    def sink(spec: TensorSpec, start: int, block: torch.Tensor) -> None:
        calls.append(threading.current_thread().name)
        if threading.current_thread() is not threading.main_thread():
            raise exc("from a helper")

    with pytest.raises(exc, match="from a helper"):
        stream_cpu(specs, ckpts, lambda s: [0.25] * 4, sink, torch.float64, None, 100, workers=2)
    assert threading.active_count() == before
    # the calling thread only waits (a Ctrl-C must never find it holding a worker's lock), and nothing
    # reached the sink after the failure
    assert len(calls) == 1 and calls[0].startswith("ckptavg-worker-")


def test_a_read_error_stops_every_worker(tmp_path: Path) -> None:
    specs, ckpts = _worker_set(tmp_path)
    with open(ckpts[3].path, "r+b") as f:
        f.truncate(ckpts[3].path.stat().st_size - 4000)
    before = threading.active_count()
    with pytest.raises(CheckpointFormatError, match="c3.safetensors: file is truncated"):
        stream_cpu(specs, ckpts, lambda s: [0.25] * 4, lambda *a: None, torch.float64, None, 100, workers=3)
    assert threading.active_count() == before


def test_ctrl_c_while_starting_the_helpers_stops_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Thread.start() waits for the new thread; a Ctrl-C there must still stop it before the caller cleans up."""
    specs, ckpts = _worker_set(tmp_path)
    start = threading.Thread.start

    raised = threading.Event()

    def interrupted_start(self: threading.Thread) -> None:
        start(self)
        raised.set()
        raise KeyboardInterrupt

    monkeypatch.setattr(threading.Thread, "start", interrupted_start)
    before = threading.active_count()
    calls = 0

    def sink(spec: TensorSpec, start: int, block: torch.Tensor) -> None:
        # the first block waits until the interrupt is on its way, so a loaded machine that runs the helper
        # long before the calling thread cannot let it finish every batch first
        nonlocal calls
        calls += 1
        if calls == 1:
            raised.wait(10)
            time.sleep(0.2)

    with pytest.raises(KeyboardInterrupt):
        stream_cpu(specs, ckpts, lambda s: [0.25] * 4, sink, torch.float64, None, 100, workers=2)
    after = calls
    assert threading.active_count() == before
    assert calls == after and calls < 10  # the helper stopped after at most its first batch


def test_signed_zeros_and_float64_with_a_float32_accumulator_match_the_whole_tensor_path(tmp_path: Path) -> None:
    """-0.0 in every checkpoint averages to -0.0 on both paths; float64 inputs are summed in float64 even
    when float32 accumulation is asked for (never narrower than the input)."""
    g = torch.Generator().manual_seed(2)
    sets = []
    for _ in range(3):
        w = torch.randn(500, generator=g)
        w[::7] = -0.0
        sets.append({"w": w, "d": torch.randn(300, generator=g, dtype=torch.float64) * 1e3})
    ckpts = _write_set(tmp_path, sets)
    specs = check_layout(ckpts)
    for accum in (torch.float64, torch.float32):
        for weights in ([1 / 3] * 3, [0.5, 0.3, 0.2]):
            got = _collect(specs, ckpts, weights, block_elems=64, accum_dtype=accum)
            for s in specs:
                want = reduce_tensor(s, ckpts, weights, accum)
                assert torch.equal(got[s.name], want) and torch.equal(got[s.name].signbit(), want.signbit()), s.name
            assert bool(got["w"][::7].signbit().all())
    exact = sum(c.tensors["d"].load() * w for c, w in zip(ckpts, [0.5, 0.3, 0.2], strict=True))
    got = _collect(specs, ckpts, [0.5, 0.3, 0.2], block_elems=64, accum_dtype=torch.float32)["d"]
    # float64 precision (a float32 accumulator would be off by ~1e-4 here), up to the order of the roundings
    assert float((got - exact).abs().max()) <= 4 * torch.finfo(torch.float64).eps * float(exact.abs().max())


def test_the_gpu_paths_reader_reads_every_share_in_order_and_stops_early(tmp_path: Path) -> None:
    """The reader thread of the GPU reducer, run on the CPU (unpinned): every batch's shares arrive in order
    with the file's bytes, and closing it mid-way stops the thread even while it waits for a free buffer."""
    from ckptavg.reduce.batches import Prefetcher, Read, plan_batches

    specs, ckpts = _worker_set(tmp_path)
    streamed = [s for s in specs if s.averaged]
    plan = lambda: plan_batches(streamed, ckpts, lambda s: [[0.25] * 4], 100)  # noqa: E731
    got: dict[str, list[list[torch.Tensor]]] = {s.name: [[] for _ in ckpts] for s in streamed}
    before = threading.active_count()
    reader = Prefetcher(plan(), 100, 8, pin=False)
    k = 0
    try:
        for item in reader:
            assert isinstance(item, Read) and item.data is not None
            k = 0 if item.first else k + 1
            assert item.last == (k == len(ckpts) - 1)
            at = 0
            for piece in item.batch.pieces:
                got[streamed[piece.spec_index].name][k].append(item.data[at : at + piece.count].clone())
                at += piece.count
            reader.release(item.slot)
    finally:
        reader.close()
    for s in streamed:
        for c, parts in zip(ckpts, got[s.name], strict=True):
            assert torch.equal(torch.cat(parts), c.tensors[s.name].load().reshape(-1)), s.name
    reader = Prefetcher(plan(), 100, 8, pin=False)
    next(iter(reader))  # hold every buffer: the thread blocks waiting for one
    reader.close()
    assert threading.active_count() == before
