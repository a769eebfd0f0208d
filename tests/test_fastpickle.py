"""The C-unpickler fast path for torch zip archives must read exactly what torch's weights-only unpickler
reads (same structure, same LazyTensors), give way to it on anything else, and run no code."""

from __future__ import annotations

import argparse
import io
import pickle
import pickletools
import struct
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import torch

from ckptavg.errors import CheckpointFormatError
from ckptavg.read import torch_file as pickles
from ckptavg.read.fastpickle import load_plain
from ckptavg.read.layouts import open_checkpoint
from ckptavg.read.lazy import LazyTensor
from ckptavg.read.torch_zip import data_records

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "runs"


def _both(path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Any, Any, bool]:
    """(fast path result, torch path result, whether the fast path answered)."""
    answered = []
    real = pickles.load_plain

    def spy(*args: Any) -> Any:
        out = real(*args)
        answered.append(out is not None)
        return out

    monkeypatch.setattr(pickles, "load_plain", spy)
    fast = pickles.load_torch(path, "torch-zip", trust_pickle=False)
    monkeypatch.setattr(pickles, "load_plain", lambda *args: None)
    slow = pickles.load_torch(path, "torch-zip", trust_pickle=False)
    return fast, slow, answered == [True]


def _same(a: Any, b: Any) -> None:
    assert type(a) is type(b), (type(a), type(b))
    if isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            _same(a[k], b[k])
        assert getattr(a, "_metadata", None) == getattr(b, "_metadata", None)
    elif isinstance(a, list | tuple):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _same(x, y)
    else:
        assert a == b, (a, b)


def _cases() -> dict[str, Any]:
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    return {
        "state_dict": torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).state_dict(),
        "views_and_offsets": {"whole": base, "row": base[2], "col": base[:, 1], "t": base.t(), "tail": base.view(-1)[5:]},
        "dtypes": {str(d): torch.ones(3, dtype=d) for d in (
            torch.float16, torch.bfloat16, torch.float64, torch.complex64, torch.int64, torch.int8, torch.bool,
            torch.uint8, torch.float8_e4m3fn, torch.float8_e5m2, torch.uint16)},
        "scalars_and_empty": {"zero_dim": torch.tensor(3.5), "empty": torch.empty(0, 5), "one": torch.ones(1, 1)},
        "parameters": {"p": torch.nn.Parameter(torch.randn(2, 3)), "frozen": torch.nn.Parameter(torch.ones(2), requires_grad=False)},
        "training": {"epoch": 3, "global_step": 120, "lr": 0.1, "name": "run-1", "flags": [True, None],
                     "state_dict": OrderedDict(w=torch.randn(5)), "optimizer": {"state": {0: {"step": torch.tensor(4.0)}},
                                                                                 "param_groups": [{"lr": 0.1, "params": [0]}]}},
        "storage_dtype_object": {"w": torch.ones(2), "dtype": torch.bfloat16},
    }


@pytest.mark.parametrize("name", list(_cases()))
def test_fast_path_reads_what_torch_reads(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "c.pt"
    torch.save(_cases()[name], path)
    fast, slow, answered = _both(path, monkeypatch)
    assert answered, "the fast path gave way on a plain checkpoint"
    _same(fast, slow)


@pytest.mark.parametrize("path", sorted(p for p in FIXTURES.rglob("*") if p.is_file() and pickles.zipfile.is_zipfile(p)
                                        and p.suffix in (".pt", ".ckpt", ".bin", ".pth")), ids=lambda p: str(p.relative_to(FIXTURES)))
def test_fast_path_on_every_fixture(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fast, slow, _ = _both(path, monkeypatch)
    _same(fast, slow)


def test_other_globals_go_to_torch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "c.pt"
    torch.save({"hparams": argparse.Namespace(lr=0.1), "w": torch.ones(2)}, path)
    fast, slow, answered = _both(path, monkeypatch)
    assert not answered
    _same(fast, slow)
    assert isinstance(fast["w"], LazyTensor)


def test_no_code_runs(tmp_path: Path) -> None:
    """A pickle that would call os.system is declined before anything is called."""
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self) -> Any:
            import os

            return (os.system, (f"touch {marker}",))

    data = pickle.dumps({"w": Evil()}, protocol=2)
    assert load_plain(tmp_path / "x.pt", data, "archive/", {}) is None
    assert not marker.exists()


def test_corrupt_pickle_gives_way(tmp_path: Path) -> None:
    buf = io.BytesIO()
    torch.save({"w": torch.ones(2)}, buf)
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as z:
        data = z.read("archive/data.pkl")
    for cut in (1, len(data) // 2, len(data) - 1):
        assert load_plain(tmp_path / "x.pt", data[:cut], "archive/", {}) is None
    assert load_plain(tmp_path / "x.pt", data, "archive/", {}) is None  # no record for its storage


def _with_build_after_tensor(data: bytes, state: bytes) -> bytes:
    """Insert `state` + BUILD right after the REDUCE that rebuilds the (only) tensor."""
    reduces = [pos for op, _, pos in pickletools.genops(data) if op.name == "REDUCE"]
    at = reduces[-1] + 1
    return data[:at] + state + b"b" + data[at:]


def _unicode(text: str) -> bytes:
    raw = text.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw


@pytest.mark.parametrize("state", [
    b"}" + _unicode("path") + _unicode("/etc/passwd") + b"s",  # a dict state: would update __dict__
    b"N}" + _unicode("file_offset") + b"K\x00s\x86",  # (None, slot state): would setattr
], ids=["dict-state", "slot-state"])
def test_build_cannot_rewrite_a_tensor(tmp_path: Path, state: bytes) -> None:
    """pickle's BUILD on a tensor stand-in could point it at another file or offset; the fast path declines."""
    path = tmp_path / "c.pt"
    torch.save({"w": torch.ones(2)}, path)
    with zipfile.ZipFile(path) as z:
        data = z.read("c/data.pkl")  # torch.save names the archive's folder after the file
    records = {"c/data/0": (0, 8)}
    assert isinstance(load_plain(path, data, "c/", records)["w"], LazyTensor)  # the unmodified pickle is plain
    assert load_plain(path, _with_build_after_tensor(data, state), "c/", records) is None


class _Ref:
    """Pickles as torch's persistent id of a storage, with whatever storage class we like."""

    def __init__(self, kind: type, key: str, numel: int) -> None:
        self.kind, self.key, self.numel = kind, key, numel


class _T:
    def __init__(self, ref: _Ref, size: tuple[int, ...]) -> None:
        self.ref, self.size = ref, size

    def __reduce__(self) -> Any:
        return torch._utils._rebuild_tensor_v2, (self.ref, 0, self.size, (1,), False, OrderedDict())


class _StoragePickler(pickle.Pickler):
    def persistent_id(self, obj: Any) -> Any:
        return ("storage", obj.kind, obj.key, "cpu", obj.numel) if isinstance(obj, _Ref) else None


def test_a_storage_keeps_the_dtype_of_its_first_reference(tmp_path: Path) -> None:
    """Found by bench/fuzz.py: a pickle that names one storage with two types. torch keeps the first; so must we."""
    path = tmp_path / "c.pt"
    torch.save({"a": torch.arange(6.0)}, path)
    buf = io.BytesIO()
    _StoragePickler(buf, protocol=2).dump({"a": _T(_Ref(torch.FloatStorage, "0", 6), (6,)),
                                           "b": _T(_Ref(torch.HalfStorage, "0", 12), (3,))})
    with zipfile.ZipFile(path) as z:
        members = {i.filename: z.read(i) for i in z.infolist()} | {"c/data.pkl": buf.getvalue()}
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    reference = torch.load(path, weights_only=True)
    with zipfile.ZipFile(path) as z:
        records = data_records(path, z.infolist())
    got = load_plain(path, buf.getvalue(), "c/", records)
    assert got is not None and reference["b"].dtype == torch.float32
    assert got["b"].dtype == torch.float32 and torch.equal(got["b"].load(), reference["b"])


@pytest.mark.parametrize("record", ["byteorder", "data.pkl"])
def test_a_record_flagged_encrypted_is_a_broken_archive(tmp_path: Path, record: str) -> None:
    """Found by bench/fuzz.py: zipfile raises RuntimeError for a record whose encryption bit is set."""
    path = tmp_path / "c.pt"
    torch.save({"w": torch.ones(2)}, path)
    data = bytearray(path.read_bytes())
    name = f"c/{record}".encode()
    central = data.index(b"PK\x01\x02")  # the central directory, after every local record
    at = data.index(name, central) - 46  # the central directory entry of that record
    assert data[at : at + 4] == b"PK\x01\x02"
    data[at + 8] |= 1  # general purpose flag bit 0: encrypted
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointFormatError, match="broken zip archive"):
        open_checkpoint(path)
