"""Fuzzing the readers: whatever bytes a checkpoint file holds, opening it and loading every tensor either
works or raises a `CkptavgError` subclass. Never another exception, never a hang, never an allocation larger
than the file.

Inputs are arbitrary bytes, bytes behind each format's magic, and mutations of small valid files: bit flips,
overwrites, truncations, insertions, deletions and splices of raw bytes; edits of a safetensors header's JSON
(rewritten with the right length, so they reach the validation); edits of a torch archive's pickle and
records, re-packed with torch's own zip writer (so they get past the archive's CRCs and reach the
unpickler and the offset checks).

Where ckptavg reads a file, an independent reader (safetensors, torch.load) must read the same values,
so a reader that silently returns wrong bytes is a failure too.

The suite runs a fixed, derandomised number of examples; `python bench/fuzz.py --examples N` runs the same
targets for longer with random seeds. CKPTAVG_FUZZ_EXAMPLES overrides the per-target count here.
"""

from __future__ import annotations

import io
import json
import os
import signal
import struct
import warnings
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from types import FrameType
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save as safetensors_save

from ckptavg import CkptavgError, LoadOptions, find_checkpoints, open_checkpoint
from ckptavg.read.safetensors_file import read_safetensors_header, sniff

HANG_SECONDS = 10
RAW = LoadOptions(keep_prefix=True)  # compare names with the references as they are in the file


# ---------------------------------------------------------------- seeds: small valid files of each format


def seed_state() -> dict[str, torch.Tensor]:
    """A small state dict with the dtypes and shapes readers get wrong: half, bfloat16, int, bool, 0-d, empty."""
    g = torch.Generator().manual_seed(5)
    return {
        "conv.weight": torch.randn(4, 6, generator=g),
        "conv.bias": torch.randn(6, generator=g).half(),
        "bn.running_mean": torch.randn(3, generator=g).bfloat16(),
        "bn.num_batches_tracked": torch.tensor(3),
        "mask": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 2),
        "scale": torch.tensor(2.5, dtype=torch.float64),
    }


def torch_bytes(obj: Any, legacy: bool = False) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf, _use_new_zipfile_serialization=not legacy)
    return buf.getvalue()


def _torch_seed() -> dict[str, Any]:
    """Views and shared storages too: a transposed view, a slice with a storage offset."""
    sd: dict[str, Any] = seed_state()
    sd["conv.weight_t"] = sd["conv.weight"].t()
    sd["conv.rows"] = sd["conv.weight"][1:3]
    return {"epoch": 2, "global_step": 40, "state_dict": sd, "metrics": {"val_loss": 0.5}}


SAFETENSORS_SEED = safetensors_save(seed_state(), metadata={"step": "40", "epoch": "2"})
TORCH_ZIP_SEED = torch_bytes(_torch_seed())
TORCH_LEGACY_SEED = torch_bytes(_torch_seed(), legacy=True)
SEEDS = {"safetensors": SAFETENSORS_SEED, "torch-zip": TORCH_ZIP_SEED, "torch-legacy": TORCH_LEGACY_SEED}


# ---------------------------------------------------------------- the property every input must satisfy


class Hang(BaseException):
    """Raised by the alarm; a BaseException so that no `except Exception` in the readers can swallow it."""


@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    def alarm(signum: int, frame: FrameType | None) -> None:
        raise Hang(f"reading took more than {seconds} s")

    old = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def check_file(data: bytes, path: Path) -> None:
    """Write `data` to `path` and read it every way ckptavg does; fail on anything but a CkptavgError."""
    path.write_bytes(data)
    with time_limit(HANG_SECONDS), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for reader in (sniff, read_safetensors_header, find_checkpoints):
            with suppress(CkptavgError):
                reader(path)
        try:
            ckpt = open_checkpoint(path, RAW)
            loaded = {name: _load_checked(t, len(data)) for name, t in ckpt.tensors.items()}
        except CkptavgError:
            return
        for name in loaded:  # whatever is read must be writable: an output header is UTF-8 JSON
            name.encode("utf-8")
        _compare_with_reference(path, ckpt.format, loaded)


def _load_checked(lazy: Any, file_size: int) -> torch.Tensor:
    """Load one tensor after checking that it claims no more bytes than the file has (no absurd allocation)."""
    if getattr(lazy, "eager", None) is not None:
        assert lazy.eager.untyped_storage().nbytes() <= file_size
    elif lazy.numel:
        extent = lazy.span if getattr(lazy, "span", None) is not None else lazy.nbytes
        assert lazy.file_offset + extent <= file_size, (lazy, file_size)
    t = lazy.load()
    assert tuple(t.shape) == tuple(lazy.shape) and t.dtype == lazy.dtype, (t.shape, t.dtype, lazy)
    return t


def _compare_with_reference(path: Path, fmt: str, loaded: dict[str, torch.Tensor]) -> None:
    """When the reference reader also reads the file, it must see exactly the tensors ckptavg saw."""
    reference = _reference_tensors(path, fmt)
    if reference is None:
        return
    assert set(reference) == set(loaded), (sorted(reference), sorted(loaded))
    for name, ref in reference.items():
        got = loaded[name]
        assert got.dtype == ref.dtype and got.shape == ref.shape, name
        assert torch.equal(got.contiguous().view(-1).view(torch.uint8), ref.contiguous().view(-1).view(torch.uint8)), name


def _reference_tensors(path: Path, fmt: str) -> dict[str, torch.Tensor] | None:
    try:
        if fmt == "safetensors":
            with safe_open(path, "pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            obj = torch.load(path, weights_only=True)
    except Exception:  # noqa: BLE001 - the reference may refuse what ckptavg accepts; only values are compared
        return None
    sd = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        return None
    return {str(k): v for k, v in sd.items()}


# ---------------------------------------------------------------- byte-level mutations


@st.composite
def mutated(draw: st.DrawFn, seed: bytes) -> bytes:
    """`seed` after 1 to 4 random edits, including splices of pieces of every seed."""
    data = bytearray(seed)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "set", "cut", "insert", "delete", "splice", "length"]))
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and data:
            data[pos] = draw(st.sampled_from([0x00, 0xFF, 0x7F, 0x80, ord("{"), ord("["), ord("9"), ord('"')]))
        elif op == "cut":
            del data[pos:]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del data[pos:pos + draw(st.integers(1, 64))]
        elif op == "splice":
            donor = draw(st.sampled_from(list(SEEDS.values())))
            start = draw(st.integers(0, len(donor) - 1))
            piece = donor[start:start + draw(st.integers(1, 256))]
            data[pos:pos + (len(piece) if draw(st.booleans()) else 0)] = piece
        elif op == "length" and len(data) >= 8:  # a corrupt little-endian length field at the start
            data[:8] = struct.pack("<Q", draw(_interesting_ints(len(data))) % 2**64)
    return bytes(data)


def _interesting_ints(size: int) -> st.SearchStrategy[int]:
    edges = [0, 1, 7, 8, size - 9, size - 8, size, 2**31 - 1, 2**31, 2**32, 2**53 + 1, 2**60, 2**63 - 1, 2**63, 2**64 - 1]
    return st.one_of(st.sampled_from(edges), st.integers(-(2**70), 2**70))


# ---------------------------------------------------------------- safetensors header edits


def _split_safetensors(data: bytes) -> tuple[dict[str, Any], bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def _json_values(size: int) -> st.SearchStrategy[Any]:
    scalars = st.one_of(
        _interesting_ints(size), st.floats(allow_nan=True), st.booleans(), st.none(),
        st.sampled_from(["F32", "F16", "BF16", "I64", "BOOL", "F8_E4M3", "F99", "", "f32", "U64", "C64"]),
        st.text(max_size=8),
    )
    return st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
                        max_leaves=8)


@st.composite
def safetensors_edited(draw: st.DrawFn) -> bytes:
    """The seed with its header's JSON edited, re-serialised, and given the right (or a nearby) length."""
    header, body = _split_safetensors(SAFETENSORS_SEED)
    names = [k for k in header if k != "__metadata__"]
    for _ in range(draw(st.integers(1, 3))):
        name = draw(st.sampled_from(names))
        op = draw(st.sampled_from(["field", "offset", "shape", "swap", "drop", "copy", "meta", "raw", "relayout",
                                   "surrogate"]))
        entry = header.get(name)
        if op == "relayout" and isinstance(entry, dict):  # a new shape/dtype with every offset made consistent
            entry["shape"] = draw(st.lists(st.one_of(st.integers(0, 5), st.sampled_from([0, 2**31, 2**62, 2**70])),
                                           max_size=draw(st.sampled_from([3, 3, 40]))))
            entry["dtype"] = draw(st.sampled_from(["F32", "F16", "BF16", "F64", "I8", "BOOL", "U64", "F8_E5M2", "C64"]))
            body = _relayout(header, body)
        elif op == "surrogate":  # a JSON escape that decodes to a lone surrogate: legal JSON, not writable UTF-8
            header["w\ud800" + name] = header.pop(name, None)
        elif op == "field" and isinstance(entry, dict):
            entry[draw(st.sampled_from(["dtype", "shape", "data_offsets", "extra"]))] = draw(_json_values(len(body)))
        elif op == "offset" and isinstance(entry, dict):
            entry["data_offsets"] = [draw(_interesting_ints(len(body))), draw(_interesting_ints(len(body)))]
        elif op == "shape" and isinstance(entry, dict):
            entry["shape"] = draw(st.lists(_interesting_ints(len(body)), max_size=4))
        elif op == "swap":
            other = draw(st.sampled_from(names))
            header[name], header[other] = header.get(other), header.get(name)
        elif op == "drop":
            header.pop(name, None)
        elif op == "copy":
            header[draw(st.text(max_size=6))] = json.loads(json.dumps(entry))
        elif op == "meta":
            header["__metadata__"] = draw(_json_values(len(body)))
        else:
            header[name] = draw(_json_values(len(body)))
    raw = json.dumps(header, ensure_ascii=draw(st.booleans())).encode("utf-8", "surrogatepass")
    if draw(st.integers(0, 9)) == 0:  # a number longer than int()'s 4300-digit limit
        raw = raw.replace(b'"shape": [', b'"shape": [' + b"7" * 5000 + b", ", 1)
    raw += b" " * draw(st.integers(0, 9))
    length = max(len(raw) + draw(st.sampled_from([0, 0, 0, -1, 1, 8])), 0)
    if draw(st.booleans()):  # sometimes also cut the data
        body = body[: draw(st.integers(0, len(body)))]
    return struct.pack("<Q", length) + raw + body


_ITEM = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I8": 1, "BOOL": 1, "U64": 8, "F8_E5M2": 1, "C64": 8, "I64": 8}


def _relayout(header: dict[str, Any], body: bytes) -> bytes:
    """Recompute every data_offsets from the shapes and dtypes, in the current order; fit the data to them."""
    at = 0
    for name, entry in header.items():
        if name == "__metadata__" or not isinstance(entry, dict):
            continue
        numel = 1
        for d in entry["shape"] if isinstance(entry.get("shape"), list) else []:
            numel *= d if isinstance(d, int) else 1
        dtype = entry.get("dtype")
        # a huge tensor cannot be consistent with a small file: cap it (its shape then disagrees, on purpose)
        size = min(max(numel * (_ITEM.get(dtype, 4) if isinstance(dtype, str) else 4), 0), 1 << 20)
        entry["data_offsets"] = [at, at + size]
        at += size
    return (body * (at // max(len(body), 1) + 1))[:at]


# ---------------------------------------------------------------- torch archive edits, re-packed by torch


def _records(archive: bytes) -> list[tuple[str, bytes]]:
    """The archive's records without its folder prefix, except the two torch's writer adds by itself."""
    with zipfile.ZipFile(io.BytesIO(archive)) as z:
        out = [(i.filename.split("/", 1)[1], z.read(i)) for i in z.infolist()]
    return [(n, b) for n, b in out if n not in ("version", ".data/serialization_id")]


def repack(records: list[tuple[str, bytes]]) -> bytes:
    """A torch archive written by torch's own zip writer: CRCs right, records aligned as torch.save aligns them."""
    buf = io.BytesIO()
    writer = torch._C.PyTorchFileWriter(buf)
    for name, payload in records:
        writer.write_record(name, payload, len(payload))
    writer.write_end_of_file()
    del writer
    return buf.getvalue()


@st.composite
def torch_zip_edited(draw: st.DrawFn) -> bytes:
    """Edits of the pickle (data.pkl) or of tensor records, then re-packed: they reach the unpickler and the
    checks of each tensor's offset and size against the records."""
    records = _records(TORCH_ZIP_SEED)
    for _ in range(draw(st.integers(1, 3))):
        i = draw(st.integers(0, len(records) - 1))
        name, payload = records[i]
        op = draw(st.sampled_from(["pickle", "pickle", "resize", "drop", "reorder"]))
        pickles = [k for k, (n, _) in enumerate(records) if n == "data.pkl"]
        if op == "pickle" and pickles:
            records[pickles[0]] = ("data.pkl", draw(mutated(records[pickles[0]][1])))
        elif op == "resize":
            records[i] = (name, payload[: draw(st.integers(0, len(payload)))] + draw(st.binary(max_size=64)))
        elif op == "drop":
            del records[i]
        else:
            records.insert(draw(st.integers(0, len(records) - 1)), records.pop(i))
        if not records:
            break
    return repack(records)


# ---------------------------------------------------------------- the targets (shared with bench/fuzz.py)


def _magic_prefixed() -> st.SearchStrategy[bytes]:
    heads = st.one_of(
        st.just(b"PK\x03\x04"),
        st.integers(0, 2**64 - 1).map(lambda n: struct.pack("<Q", n) + b"{"),
        st.just(TORCH_LEGACY_SEED[:12]),
    )
    return st.tuples(heads, st.binary(max_size=512)).map(lambda t: t[0] + t[1])


TARGETS: dict[str, Callable[[], st.SearchStrategy[bytes]]] = {
    "arbitrary-bytes": lambda: st.binary(max_size=1024),
    "magic-then-bytes": _magic_prefixed,
    "safetensors-bytes": lambda: mutated(SAFETENSORS_SEED),
    "safetensors-header": safetensors_edited,
    "torch-zip-bytes": lambda: mutated(TORCH_ZIP_SEED),
    "torch-zip-repacked": torch_zip_edited,
    "torch-legacy-bytes": lambda: mutated(TORCH_LEGACY_SEED),
}
# Examples per target in the normal suite: about 10 s for all of them on one core.
EXAMPLES = {"arbitrary-bytes": 150, "magic-then-bytes": 150, "safetensors-bytes": 250, "safetensors-header": 250,
            "torch-zip-bytes": 120, "torch-zip-repacked": 150, "torch-legacy-bytes": 100}


@pytest.fixture(scope="module")
def fuzz_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz") / "input.bin"


def test_seeds_are_valid_and_read_like_the_references(fuzz_file: Path) -> None:
    """The seeds themselves read, and equal what safetensors/torch read: mutations start from good files."""
    for fmt, data in SEEDS.items():
        fuzz_file.write_bytes(data)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ckpt = open_checkpoint(fuzz_file, RAW)
        assert ckpt.format == fmt
        loaded = {k: t.load() for k, t in ckpt.tensors.items()}
        reference = _reference_tensors(fuzz_file, fmt)
        assert reference is not None and set(reference) == set(loaded)
        _compare_with_reference(fuzz_file, fmt, loaded)


def test_repacked_seed_reads_like_the_original(fuzz_file: Path) -> None:
    """The re-packing itself changes nothing, so what the repacked target finds is due to the edits."""
    fuzz_file.write_bytes(repack(_records(TORCH_ZIP_SEED)))
    loaded = {k: t.load() for k, t in open_checkpoint(fuzz_file, RAW).tensors.items()}
    expected = _torch_seed()["state_dict"]
    assert set(loaded) == set(expected)
    for k, v in expected.items():
        assert torch.equal(loaded[k], v), k


def _fuzz_settings(target: str) -> settings:
    return settings(
        max_examples=int(os.environ.get("CKPTAVG_FUZZ_EXAMPLES", 0)) or EXAMPLES[target], deadline=None,
        derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


@pytest.mark.parametrize("target", list(TARGETS))
def test_fuzz(target: str, fuzz_file: Path) -> None:
    @_fuzz_settings(target)
    @given(TARGETS[target]())
    def run(data: bytes) -> None:
        check_file(data, fuzz_file)

    run()
