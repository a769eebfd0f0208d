"""The streaming safetensors writer: exact bytes, round trips, atomicity."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save

from ckptavg.formats import DTYPE_NAMES
from ckptavg.reduce import TensorSpec
from ckptavg.writer import TEMP_SUFFIX, SafetensorsWriter

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
