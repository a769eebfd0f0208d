"""The streaming safetensors writer: exact bytes, round trips, atomicity."""

from __future__ import annotations

import errno
import hashlib
import sys
import threading
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save

from ckptavg.errors import OutputError
from ckptavg.layout import DTYPE_NAMES, TensorSpec
from ckptavg.write import outfile
from ckptavg.write.outfile import HASH_CHUNK, WRITEBACK_BYTES
from ckptavg.write.placing import TEMP_SUFFIX
from ckptavg.write.safetensors import SafetensorsWriter

DTYPES = list(DTYPE_NAMES)


def _sample(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, (max(1, torch.Size(shape).numel()) * dtype.itemsize,), generator=gen, dtype=torch.uint8)
    t = raw[: torch.Size(shape).numel() * dtype.itemsize].view(dtype).reshape(shape)
    return t.clone() if dtype != torch.bool else (t.view(torch.uint8) % 2).bool()


def _write(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> SafetensorsWriter:
    specs = [TensorSpec(k, tuple(v.shape), v.dtype, v.dtype) for k, v in tensors.items()]
    with SafetensorsWriter(path, specs, metadata) as w:
        for spec in w.order:
            w.write(tensors[spec.name])
    return w


def _mixed() -> dict[str, torch.Tensor]:
    shapes = [(3, 5), (), (0,), (7,), (2, 0, 3)]
    return {
        f"t{i}.{DTYPE_NAMES[d]}": _sample(d, shapes[i % len(shapes)], i)
        for i, d in enumerate(DTYPES)
    } | {"ключ.λ": torch.ones(2), "z": torch.tensor(5, dtype=torch.int64)}


def test_bytes_equal_safetensors_save(tmp_path: Path) -> None:
    tensors = _mixed()
    out = tmp_path / "a.safetensors"
    w = _write(out, tensors, {"format": "pt"})
    expected = save(tensors, metadata={"format": "pt"})
    assert out.read_bytes() == expected
    assert w.sha256 == hashlib.sha256(expected).hexdigest() and w.nbytes == len(expected)


def test_round_trip_through_safe_open(tmp_path: Path) -> None:
    tensors = _mixed()
    meta = {"b": "2", "a": "1", "ckptavg_inputs": '[{"path": "é"}]'}
    out = tmp_path / "a.safetensors"
    _write(out, tensors, meta)
    with safe_open(out, framework="pt") as f:
        assert f.metadata() == meta
        assert set(f.keys()) == set(tensors)
        for k, v in tensors.items():
            got = f.get_tensor(k)
            assert got.dtype == v.dtype and got.shape == v.shape
            assert torch.equal(got.reshape(-1).view(torch.uint8), v.reshape(-1).view(torch.uint8)), k


def test_metadata_order_does_not_change_bytes(tmp_path: Path) -> None:
    tensors = {"w": torch.ones(3)}
    _write(tmp_path / "1.safetensors", tensors, {"a": "1", "b": "2"})
    _write(tmp_path / "2.safetensors", tensors, {"b": "2", "a": "1"})
    assert (tmp_path / "1.safetensors").read_bytes() == (tmp_path / "2.safetensors").read_bytes()


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_failure_leaves_nothing(exc: type[BaseException], tmp_path: Path) -> None:
    out = tmp_path / "a.safetensors"
    specs = [TensorSpec("a", (2,), torch.float32, torch.float32), TensorSpec("b", (2,), torch.float32, torch.float32)]
    with pytest.raises(exc), SafetensorsWriter(out, specs, {}) as w:
        w.write(torch.ones(2))
        assert any(p.name.endswith(TEMP_SUFFIX) for p in tmp_path.iterdir())
        raise exc()
    assert list(tmp_path.iterdir()) == []


def test_output_permissions_follow_umask(tmp_path: Path) -> None:
    import os

    out = tmp_path / "a.safetensors"
    _write(out, {"w": torch.ones(1)}, {})
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask


def _hash_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name == "ckptavg-sha256"]


def test_sha256_of_a_file_larger_than_the_hash_chunk_and_writeback_window(tmp_path: Path) -> None:
    """The hash is read back behind the writer in HASH_CHUNK pieces while writeback starts every
    WRITEBACK_BYTES; blocks of odd sizes make the pieces straddle both."""
    big = torch.arange(3 * (WRITEBACK_BYTES // 4) // 2 + 12345, dtype=torch.float32)
    spec = TensorSpec("big", tuple(big.shape), torch.float32, torch.float32)
    out = tmp_path / "a.safetensors"
    with SafetensorsWriter(out, [spec], {"k": "v"}) as w:
        for start in range(0, big.numel(), 777_777):
            w.write_part(big[start : start + 777_777])
    data = out.read_bytes()
    assert len(data) > WRITEBACK_BYTES + HASH_CHUNK
    assert w.sha256 == hashlib.sha256(data).hexdigest() and w.nbytes == len(data)
    assert data == save({"big": big}, metadata={"k": "v"})
    assert _hash_threads() == []


def test_failure_stops_the_hash_thread(tmp_path: Path) -> None:
    specs = [TensorSpec("a", (4,), torch.float32, torch.float32), TensorSpec("b", (4,), torch.float32, torch.float32)]
    with pytest.raises(RuntimeError), SafetensorsWriter(tmp_path / "a.safetensors", specs, {}) as w:
        w.write(torch.ones(4))
        assert _hash_threads() == ["ckptavg-sha256"]
        raise RuntimeError
    assert _hash_threads() == [] and list(tmp_path.iterdir()) == []


@pytest.mark.skipif(sys.platform != "linux", reason="fallocate is Linux's")
def test_the_whole_file_is_allocated_before_writing(tmp_path: Path) -> None:
    specs = [TensorSpec("w", (1 << 20,), torch.float32, torch.float32)]
    with SafetensorsWriter(tmp_path / "a.safetensors", specs, {}) as w:
        (temp,) = [p for p in tmp_path.iterdir() if p.name.endswith(TEMP_SUFFIX)]
        assert temp.stat().st_size == len(w._header) + 4 * (1 << 20)  # before any tensor is written
        assert temp.stat().st_blocks * 512 >= 4 * (1 << 20)
        w.write(torch.zeros(1 << 20))


def test_a_full_disk_is_reported_before_any_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The reservation's error is what a full disk gives; the writer must stop at once and clean up."""
    monkeypatch.setattr(outfile, "reserve", lambda fd, n: errno.ENOSPC)
    specs = [TensorSpec("w", (8,), torch.float32, torch.float32)]
    with pytest.raises(OutputError, match=r"a\.safetensors: cannot reserve \d+ bytes .*No space left"):
        SafetensorsWriter(tmp_path / "a.safetensors", specs, {}).__enter__()
    assert list(tmp_path.iterdir()) == [] and _hash_threads() == []
