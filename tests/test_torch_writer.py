"""The streaming torch.save-style writer: what torch.load, zipfile and ckptavg's reader make of it, exact
bytes, ZIP64, atomicity."""

from __future__ import annotations

import hashlib
import io
import os
import random
import struct
import zipfile
import zlib
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from ckptavg.errors import CheckpointFormatError, OutputError
from ckptavg.layout import DTYPE_NAMES, TensorSpec
from ckptavg.read.checkpoint import LoadOptions
from ckptavg.read.layouts import open_checkpoint
from ckptavg.read.torch_extra import read_extra_metadata
from ckptavg.write import torch_archive
from ckptavg.write.placing import TEMP_SUFFIX
from ckptavg.write.torch_archive import Record, directory, plan_archive, state_dict_pickle
from ckptavg.write.torch_file import TorchWriter, verify_torch_file

DTYPES = list(DTYPE_NAMES)
SHAPES = [(), (0,), (2, 0, 3), (7,), (3, 5), (97, 1031)]


def _sample(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    n = torch.Size(shape).numel()
    raw = torch.randint(0, 256, (max(1, n) * dtype.itemsize,), generator=gen, dtype=torch.uint8)
    t = raw[: n * dtype.itemsize].view(dtype).reshape(shape)
    return t.clone() if dtype != torch.bool else (t.view(torch.uint8) % 2).bool()


def _bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _specs(tensors: dict[str, torch.Tensor]) -> list[TensorSpec]:
    return [TensorSpec(k, tuple(v.shape), v.dtype, v.dtype) for k, v in tensors.items()]


def _write(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None,
           seed: int = 0) -> TorchWriter:
    """Write `tensors`, each in blocks of random sizes (empty blocks included)."""
    rng = random.Random(seed)
    with TorchWriter(path, _specs(tensors), metadata or {}) as w:
        for spec in w.order:
            flat = tensors[spec.name].reshape(-1)
            if rng.random() < 0.2:
                w.write(tensors[spec.name])
                continue
            start = 0
            while True:
                count = rng.choice([0, 1, rng.randint(1, max(1, flat.numel()))])
                w.write_part(flat[start : start + count])
                start += count
                if start >= flat.numel():
                    break
    return w


def _mixed() -> dict[str, torch.Tensor]:
    out = {f"t{i}.{DTYPE_NAMES[d]}": _sample(d, SHAPES[i % len(SHAPES)], i) for i, d in enumerate(DTYPES)}
    return out | {"ключ.λ": torch.ones(2), "z": torch.tensor(5, dtype=torch.int64)}


def _data_starts(path: Path) -> dict[str, int]:
    """Where each record's data starts, from its local header."""
    starts = {}
    with zipfile.ZipFile(path) as z, open(path, "rb") as f:
        for info in z.infolist():
            f.seek(info.header_offset + 26)
            name_len, extra_len = struct.unpack("<HH", f.read(4))
            starts[info.filename] = info.header_offset + 30 + name_len + extra_len
    return starts


def _check_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
        assert _bytes(got[k]) == _bytes(v), k


@pytest.mark.parametrize("dtype", DTYPES, ids=[DTYPE_NAMES[d] for d in DTYPES])
@pytest.mark.parametrize("seed", [0, 1])
def test_round_trip_every_dtype_and_shape(dtype: torch.dtype, seed: int, tmp_path: Path) -> None:
    tensors = {f"w{i}": _sample(dtype, shape, seed * 100 + i) for i, shape in enumerate(SHAPES)}
    out = tmp_path / "avg.pt"
    _write(out, tensors, {"ckptavg_method": "swa"}, seed)
    _check_same(torch.load(out, weights_only=True), tensors)
    _check_same(torch.load(out, weights_only=True, mmap=True), tensors)
    with zipfile.ZipFile(out) as z:
        assert z.testzip() is None  # every record's CRC
    ckpt = open_checkpoint(out, LoadOptions(keep_prefix=True))
    _check_same({k: ckpt.tensors[k].load() for k in tensors}, tensors)


def test_mixed_dtypes_unicode_names_and_order(tmp_path: Path) -> None:
    tensors = _mixed()
    out = tmp_path / "avg.pt"
    w = _write(out, tensors, {"a": "é"})
    assert [s.name for s in w.order] == list(tensors)  # the state dict's own order
    loaded = torch.load(out, weights_only=True, mmap=True)
    assert isinstance(loaded, OrderedDict)
    _check_same(loaded, tensors)
    ckpt = open_checkpoint(out, LoadOptions(keep_prefix=True))
    _check_same({k: ckpt.tensors[k].load() for k in tensors}, tensors)


def test_the_fast_reader_reads_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ckptavg reads it through its C-unpickler fast path, not by falling back to torch.load."""
    from ckptavg.read import torch_file as reader

    out = tmp_path / "avg.pt"
    _write(out, _mixed())
    monkeypatch.setattr(reader.torch, "load", lambda *a, **k: pytest.fail("fell back to torch.load"))
    open_checkpoint(out)


def test_layout_is_torch_saves(tmp_path: Path) -> None:
    """Without metadata, every record lies where torch.save puts it, with the same bytes: only the
    serialization id differs (torch's comes from its own hash)."""
    tensors = OrderedDict(_mixed())
    out = tmp_path / "a.pt"
    _write(out, tensors)
    buf = io.BytesIO()
    torch.save(tensors, buf)
    with zipfile.ZipFile(out) as ours, zipfile.ZipFile(buf) as theirs:
        assert ours.namelist() == theirs.namelist()
        for a, b in zip(ours.infolist(), theirs.infolist(), strict=True):
            assert (a.header_offset, a.file_size, a.flag_bits) == (b.header_offset, b.file_size, b.flag_bits), a
            if not a.filename.endswith("serialization_id"):
                assert ours.read(a) == theirs.read(b), a.filename
    assert out.stat().st_size == len(buf.getvalue())


def test_pickle_is_torch_saves() -> None:
    tensors = OrderedDict(_mixed())
    buf = io.BytesIO()
    torch.save(tensors, buf)
    with zipfile.ZipFile(buf) as z:
        assert state_dict_pickle(_specs(tensors)) == z.read("archive/data.pkl")


def test_data_offsets_as_torch_computes_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On the meta device (and with mmap, when configured) torch computes where each storage lies from the
    sizes, assuming its own writer's layout; empty tensors in between have no descriptor."""
    from torch.utils.serialization import config

    tensors = {"a": torch.ones(3), "e": torch.zeros(0), "b": torch.arange(5.0), "f": torch.zeros(0, 2),
               "c": torch.tensor(2.0)}
    out = tmp_path / "a.pt"
    _write(out, tensors, {"k": "v"})
    starts = _data_starts(out)
    meta = torch.load(out, map_location="meta", weights_only=True)
    for i, k in enumerate(tensors):
        assert meta[k].untyped_storage()._checkpoint_offset == starts[f"archive/data/{i}"], k
        assert starts[f"archive/data/{i}"] % 64 == 0
    monkeypatch.setenv("TORCH_SERIALIZATION_DEBUG", "1")  # torch then checks its computed offsets
    before = config.load.calculate_storage_offsets
    config.load.calculate_storage_offsets = True  # a config module: monkeypatch cannot restore it
    try:
        _check_same(torch.load(out, weights_only=True, mmap=True), tensors)
    finally:
        config.load.calculate_storage_offsets = before


def test_same_inputs_same_bytes(tmp_path: Path) -> None:
    tensors = _mixed()
    w1 = _write(tmp_path / "1.pt", tensors, {"b": "2", "a": "1"}, seed=1)
    w2 = _write(tmp_path / "2.pt", tensors, {"a": "1", "b": "2"}, seed=2)
    data = (tmp_path / "1.pt").read_bytes()
    assert data == (tmp_path / "2.pt").read_bytes()
    assert w1.sha256 == w2.sha256 == hashlib.sha256(data).hexdigest() and w1.nbytes == len(data)


def test_serialization_id_follows_the_data(tmp_path: Path) -> None:
    _write(tmp_path / "1.pt", {"w": torch.ones(3)})
    _write(tmp_path / "2.pt", {"w": torch.zeros(3)})
    ids = [zipfile.ZipFile(tmp_path / n).read("archive/.data/serialization_id") for n in ("1.pt", "2.pt")]
    assert ids[0] != ids[1] and all(len(i) == 40 and i.isdigit() for i in ids)


def test_corrupt_data_fails_the_crc(tmp_path: Path) -> None:
    out = tmp_path / "a.pt"
    _write(out, {"a": torch.ones(16), "b": torch.arange(16.0)})
    raw = bytearray(out.read_bytes())
    raw[_data_starts(out)["archive/data/1"] + 9] ^= 1
    out.write_bytes(bytes(raw))
    with zipfile.ZipFile(out) as z:
        assert z.testzip() == "archive/data/1"


@pytest.mark.parametrize("meta", [{"ckptavg_inputs": '[{"path": "é"}]', "a": "1"}, {}])
def test_extra_metadata_round_trips(meta: dict[str, str], tmp_path: Path) -> None:
    out = tmp_path / "a.pt"
    _write(out, {"w": torch.ones(2)}, meta)
    assert read_extra_metadata(out) == meta
    with zipfile.ZipFile(out) as z:
        assert ("archive/extra/ckptavg.json" in z.namelist()) == bool(meta)
    assert list(torch.load(out, weights_only=True)) == ["w"]  # torch ignores the record


def test_extra_metadata_of_other_files(tmp_path: Path) -> None:
    plain = tmp_path / "plain.pt"
    torch.save({"w": torch.ones(2)}, plain)
    assert read_extra_metadata(plain) == {}
    bad = tmp_path / "bad.pt"
    with zipfile.ZipFile(bad, "w") as z:
        z.writestr("archive/data.pkl", b"")
        z.writestr("archive/extra/ckptavg.json", b'{"a": 1}')
    with pytest.raises(CheckpointFormatError, match="not a JSON object of strings"):
        read_extra_metadata(bad)
    (tmp_path / "not.pt").write_bytes(b"nope")
    with pytest.raises(CheckpointFormatError, match="broken zip"):
        read_extra_metadata(tmp_path / "not.pt")


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_failure_leaves_nothing(exc: type[BaseException], tmp_path: Path) -> None:
    out = tmp_path / "a.pt"
    specs = [TensorSpec("a", (2,), torch.float32, torch.float32), TensorSpec("b", (2,), torch.float32, torch.float32)]
    with pytest.raises(exc), TorchWriter(out, specs, {}) as w:
        w.write(torch.ones(2))
        assert any(p.name.endswith(TEMP_SUFFIX) for p in tmp_path.iterdir())
        raise exc()
    assert list(tmp_path.iterdir()) == []


def test_closed_early_raises_and_leaves_nothing(tmp_path: Path) -> None:
    specs = [TensorSpec("a", (4,), torch.float32, torch.float32), TensorSpec("b", (4,), torch.float32, torch.float32)]
    with pytest.raises(AssertionError, match="before every tensor"), TorchWriter(tmp_path / "a.pt", specs, {}) as w:
        w.write(torch.ones(4))
        w.write_part(torch.ones(2))
    assert list(tmp_path.iterdir()) == []


def test_wrong_block_is_refused(tmp_path: Path) -> None:
    specs = [TensorSpec("a", (4,), torch.float32, torch.float32)]
    with pytest.raises(AssertionError), TorchWriter(tmp_path / "a.pt", specs, {}) as w:
        w.write_part(torch.ones(5))
    assert list(tmp_path.iterdir()) == []


def test_unrenamed_output_is_left_for_the_caller(tmp_path: Path) -> None:
    out = tmp_path / "a.pt"
    with TorchWriter(out, [TensorSpec("w", (3,), torch.float32, torch.float32)], {}, rename=False) as w:
        w.write(torch.ones(3))
    assert w.done is not None and w.done.name.endswith(TEMP_SUFFIX) and not out.exists()
    assert w.sha256 == hashlib.sha256(w.done.read_bytes()).hexdigest()
    assert torch.equal(torch.load(w.done, weights_only=True)["w"], torch.ones(3))


def test_verify_accepts_what_was_written(tmp_path: Path) -> None:
    tensors = {f"t.{DTYPE_NAMES[d]}": torch.ones(SHAPES[i % len(SHAPES)]).to(d) for i, d in enumerate(DTYPES)}
    out = tmp_path / "a.pt"
    _write(out, tensors, {"k": "v"})
    verify_torch_file(out, _specs(tensors), check_finite=True)


def test_verify_names_the_problem(tmp_path: Path) -> None:
    tensors = {"a": torch.ones(3), "b": torch.tensor([1.0, float("nan")]), "c": torch.ones(2, dtype=torch.bfloat16)}
    out = tmp_path / "a.pt"
    _write(out, tensors)
    specs = _specs(tensors)
    verify_torch_file(out, specs, check_finite=False)
    with pytest.raises(OutputError, match=r"'b' holds NaN or Inf \(first at flat index 1\)"):
        verify_torch_file(out, specs, check_finite=True)
    with pytest.raises(OutputError, match=r"'a' has shape \[3\] but should have \[4\] \(as read by torch.load\)"):
        verify_torch_file(out, [TensorSpec("a", (4,), torch.float32, torch.float32), *specs[1:]], False)
    with pytest.raises(OutputError, match=r"'c' is BF16 but should be F16"):
        verify_torch_file(out, [*specs[:2], TensorSpec("c", (2,), torch.float16, torch.float16)], False)
    with pytest.raises(OutputError, match=r"'d' is missing"):
        verify_torch_file(out, [*specs, TensorSpec("d", (1,), torch.float32, torch.float32)], False)
    (tmp_path / "bad.pt").write_bytes(out.read_bytes()[:-30])
    with pytest.raises(OutputError, match="torch.load cannot read"):
        verify_torch_file(tmp_path / "bad.pt", specs, False)


def test_zip64_everywhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the ZIP64 thresholds lowered, every record and the end record take their ZIP64 forms: torch
    and zipfile must read them all (CRCs included) from the 64-bit fields."""
    monkeypatch.setattr(torch_archive, "ZIP64_LIMIT", 200)
    monkeypatch.setattr(torch_archive, "COUNT_LIMIT", 3)
    tensors = {f"w{i}": torch.arange(float(30 * i + 1)) for i in range(4)} | {"e": torch.zeros(0)}
    out = tmp_path / "a.pt"
    _write(out, tensors, {"k": "v"})
    raw = out.read_bytes()
    with zipfile.ZipFile(out) as z:
        assert z.testzip() is None
        wide = [i for i in z.infolist() if i.extra[:2] == b"\x01\x00"]
        assert {i.filename for i in wide} >= {"archive/data/2", "archive/data/3", "archive/version"}
    end = raw[-22:]
    assert struct.unpack("<HHII", end[8:20]) == (0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF)
    assert raw[-22 - 20 - 56 : -22 - 20 - 52] == b"PK\x06\x06"
    _check_same(torch.load(out, weights_only=True), tensors)
    _check_same(torch.load(out, weights_only=True, mmap=True), tensors)
    assert read_extra_metadata(out) == {"k": "v"}


def test_encoder_with_sizes_and_offsets_past_4_gib() -> None:
    big = Record("archive/data/1", 3 << 30, 5 << 30)  # starts below 4 GiB, is 5 GiB long
    assert big.zip64 and not big.wide_offset and big.data_start % 64 == 0 and big.descriptor_len == 24
    after = Record("archive/data/2", big.end, 12)
    assert after.wide_offset and not after.wide_size and after.data_start % 64 == 0
    assert after.descriptor(7) == b"PK\x07\x08" + struct.pack("<IQQ", 7, 12, 12)
    # torch's rule for the local header: 30 + name + 4 (+ 4 + 16 for big sizes, + 8 for a big offset), padded
    for rec, zip64_len in [(big, 20), (after, 12), (Record("archive/data/0", 100, 5), 0)]:
        start = rec.offset + 30 + len(rec.raw_name) + 4 + zip64_len
        assert rec.data_start == start + (-start) % 64
    header = after.local_header()
    assert struct.unpack("<HHQ", header[30 + 14 : 30 + 14 + 12]) == (1, 8, after.offset)
    central = after.central(0x1234)
    assert struct.unpack("<II", central[20:28]) == (12, 12) and central[42:46] == b"\xff\xff\xff\xff"
    assert struct.unpack("<HHQ", central[46 + 14 :]) == (1, 8, after.offset)
    c = big.central(0)
    assert struct.unpack("<II", c[20:28]) == (0xFFFFFFFF, 0xFFFFFFFF)
    assert struct.unpack("<HHQQ", c[46 + 14 :]) == (1, 16, 5 << 30, 5 << 30)


def _sparse_ok(path: Path) -> bool:
    with open(path, "wb") as f:
        f.seek(1 << 30)
        f.write(b"x")
    ok = os.stat(path).st_blocks * 512 < 1 << 20
    path.unlink()
    return ok


def test_archive_past_4_gib_in_a_sparse_file(tmp_path: Path) -> None:
    """A real >4 GiB layout, written sparsely (the big tensor's data is a hole, its CRC left 0): zipfile and
    torch (mmap, and its computed offsets) find every record by its ZIP64 fields."""
    if not _sparse_ok(tmp_path / "probe"):
        pytest.skip("the file system does not make sparse files")
    small = {"a": torch.arange(16, dtype=torch.uint8), "c": torch.tensor([1.0, 2.0, 3.0])}
    specs = [_specs(small)[0], TensorSpec("big", ((1 << 32) + 5,), torch.uint8, torch.uint8), _specs(small)[1]]
    records, head = plan_archive(specs, {"k": "v"})
    out = tmp_path / "huge.pt"
    crcs = []
    with open(out, "wb") as f:
        def put(offset: int, data: bytes) -> None:
            f.seek(offset)
            f.write(data)

        contents = [*head, _bytes(small["a"]), None, _bytes(small["c"]), b"3\n", b"0" * 40]
        for rec, data in zip(records, contents, strict=True):
            crc = zlib.crc32(data) if data is not None else 0
            crcs.append(crc)
            put(rec.offset, rec.local_header() + (data or b""))
            put(rec.data_start + rec.size, rec.descriptor(crc))
        put(records[-1].end, directory(records, crcs))
    assert out.stat().st_size == torch_archive.archive_len(records) > 1 << 32
    with zipfile.ZipFile(out) as z:
        infos = {i.filename: i for i in z.infolist()}
        assert infos["archive/data/1"].file_size == (1 << 32) + 5
        assert infos["archive/data/2"].header_offset > 1 << 32
        assert z.read("archive/data/2") == _bytes(small["c"])  # CRC-checked
    loaded = torch.load(out, weights_only=True, mmap=True)
    assert loaded["big"].shape == ((1 << 32) + 5,) and int(loaded["big"][-1]) == 0
    assert torch.equal(loaded["c"], small["c"]) and torch.equal(loaded["a"], small["a"])
    del loaded
    meta = torch.load(out, map_location="meta", weights_only=True)
    assert meta["c"].untyped_storage()._checkpoint_offset == records[len(head) + 2].data_start
    ckpt = open_checkpoint(out, LoadOptions(keep_prefix=True))
    assert torch.equal(ckpt.tensors["c"].load(), small["c"])
    assert read_extra_metadata(out) == {"k": "v"}
