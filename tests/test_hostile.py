"""A corpus of hostile and broken inputs (issue 5), beyond the error table of test_cli.py.

Every case runs the real CLI and checks the error contract of test_cli.py: exit 1, exactly one `Error:`
line on stderr and no traceback, nothing at the output path, no temp file, and every file (inputs
included) byte for byte as it was. Cases already in test_cli.ERROR_CASES (zero-byte file, truncated zip
and safetensors, invalid JSON, missing/extra keys, shape mismatch, float vs int, fp16 vs fp32, NaN, the
code-running pickle in a zip, output equal to an input, existing output, missing output directory) are not
repeated here; this file adds the header corruptions, pickles in other containers, Inf, the flags that turn
an error into a result, links and odd paths, read-only output, and inputs that are not regular files.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import tracemalloc
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_cli import assert_one_error_line, partial_files, snapshot
from typer.testing import Result

from ckptavg import CheckpointFormatError, open_checkpoint
from ckptavg.read.safetensors_file import read_safetensors_header, sniff

Cli = Callable[..., Result]
REPO = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------- helpers


def state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"weight": torch.randn(4, 3, generator=g), "bias": torch.randn(3, generator=g), "count": torch.tensor(7)}


def raw_safetensors(path: Path, header: dict[str, Any] | bytes, data: bytes, length: int | None = None) -> None:
    """A safetensors file with exactly this header (padded to 8 bytes) and data; `length` overrides the length field."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)


def entry(dtype: str, shape: list[int], begin: int, end: int) -> dict[str, Any]:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


class RunsCode:
    """Unpickling this calls `func(*args)`: the classic malicious-pickle payload."""

    def __init__(self, func: Callable[..., Any], *args: Any) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> tuple[Any, ...]:
        return (self.func, self.args)


def touch_command(marker: Path) -> str:
    return f"touch {shlex.quote(str(marker))}"


def repack_zip(src: bytes, compression: int = zipfile.ZIP_STORED, skip: str = "") -> bytes:
    """Re-pack a torch archive with Python's zipfile (no 64-byte alignment, optional deflate)."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(src)) as zin, zipfile.ZipFile(out, "w", compression) as zout:
        for info in zin.infolist():
            if not info.filename.endswith(skip) or not skip:
                zout.writestr(info.filename, zin.read(info))
    return out.getvalue()


def torch_bytes(obj: Any, legacy: bool = False) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf, _use_new_zipfile_serialization=not legacy)
    return buf.getvalue()


def one_line_error_subprocess(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 1, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and not ln.startswith("Warning: ")]
    assert len(lines) == 1 and lines[0].startswith("Error: "), proc.stderr
    assert proc.stdout == ""
    return lines[0]


def run_ckptavg(*args: object, timeout: float = 120, **kw: Any) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "CKPTAVG_DEBUG"} | kw.pop("env", {})
    return subprocess.run([sys.executable, "-m", "ckptavg", *map(os.fsdecode, args)], capture_output=True, text=True,
                          timeout=timeout, env=env, **kw)


# ---------------------------------------------------------------- the corpus


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Good and hostile inputs, built once: every test proves it left them unchanged."""
    root = tmp_path_factory.mktemp("corpus")
    src = root / "src"
    src.mkdir()
    save_file(state(1), src / "one.safetensors")
    save_file(state(2), src / "two.safetensors")
    _safetensors_headers(src)
    _dtype_and_value_cases(src)
    _torch_archives(src)
    _code_running_pickles(src, root / "MARKER")
    _folders(root, src, REPO / "fixtures" / "runs")
    (root / "plain.txt").write_text("a file, not a directory\n")
    return root


@pytest.fixture
def corpus(inputs: Path, tmp_path: Path) -> dict[str, str]:
    """The names used in the case templates; outputs go to this test's own tmp_path. `tmp` is the corpus."""
    out = tmp_path / "out"
    out.mkdir()
    return {"tmp": str(inputs), "src": str(inputs / "src"), "out": str(out / "avg.safetensors"), "outdir": str(out),
            "marker": str(inputs / "MARKER"), "plainfile": str(inputs / "plain.txt"), "work": str(tmp_path)}


def _safetensors_headers(src: Path) -> None:
    good = (src / "one.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", good[:8])
    # the length field alone is corrupt; the rest of the file is intact
    (src / "len_past_end.safetensors").write_bytes(struct.pack("<Q", len(good)) + good[8:])
    (src / "len_2p60.safetensors").write_bytes(struct.pack("<Q", 2**60) + good[8:])
    (src / "len_max.safetensors").write_bytes(struct.pack("<Q", 2**64 - 1) + good[8:])
    (src / "len_short.safetensors").write_bytes(struct.pack("<Q", n - 8) + good[8:])
    data = bytes(16)
    raw_safetensors(src / "overlap.safetensors", {"a": entry("F32", [2], 0, 8), "b": entry("F32", [2], 4, 12)}, data)
    raw_safetensors(src / "hole.safetensors", {"a": entry("F32", [1], 0, 4), "b": entry("F32", [1], 8, 12)}, data)
    raw_safetensors(src / "past_end.safetensors", {"a": entry("F32", [1024], 0, 4096)}, data)
    raw_safetensors(src / "unknown_dtype.safetensors", {"a": entry("F99", [4], 0, 16)}, data)
    raw_safetensors(src / "shape_vs_bytes.safetensors", {"a": entry("F32", [3], 0, 16)}, data)
    raw_safetensors(src / "giant_empty.safetensors", {"a": entry("F32", [0, 2**40, 2**40], 0, 0)}, b"")
    raw_safetensors(src / "reversed_offsets.safetensors", {"a": entry("F32", [2], 8, 0)}, data)
    raw_safetensors(src / "float_offsets.safetensors", {"a": entry("F32", [4], 0.0, 16.0)}, data)  # type: ignore[arg-type]
    raw_safetensors(src / "negative_shape.safetensors", {"a": entry("F32", [-4], 0, 16)}, data)
    raw_safetensors(src / "meta_not_strings.safetensors", {"__metadata__": {"step": 3}, "a": entry("F32", [4], 0, 16)}, data)
    raw_safetensors(src / "no_tensors.safetensors", {"__metadata__": {"format": "pt"}}, b"")
    raw_safetensors(src / "lone_surrogate.safetensors", b'{"w\\ud800": ' + json.dumps(entry("F32", [4], 0, 16)).encode() + b"}", data)
    huge = b"9" * 5000  # more digits than Python's int() accepts by default (4300)
    raw_safetensors(src / "huge_int.safetensors", b'{"a": {"dtype": "F32", "shape": [' + huge + b'], "data_offsets": [0, 16]}}', data)
    raw_safetensors(src / "utf16.safetensors", json.dumps({"a": entry("F32", [4], 0, 16)}).encode("utf-16-le"), data)
    raw_safetensors(src / "not_utf8.safetensors", b'{"w\xff": ' + json.dumps(entry("F32", [4], 0, 16)).encode() + b"}", data)
    long_name = "x" * 1_000_000  # the error must name it without printing a megabyte
    raw_safetensors(src / "long_name.safetensors", {long_name: entry("F99", [4], 0, 16)}, data)


def _dtype_and_value_cases(src: Path) -> None:
    two = state(2)
    inf = two["weight"].clone()
    inf[0, 1] = float("inf")
    save_file({**two, "weight": inf}, src / "inf.safetensors")
    neg = two["bias"].clone()
    neg[2] = float("-inf")
    save_file({**two, "bias": neg}, src / "neginf.safetensors")
    save_file({**two, "weight": two["weight"].half()}, src / "fp16.safetensors")
    save_file({**state(1), "bias": torch.arange(3)}, src / "int_bias_first.safetensors")
    save_file({**two, "count": torch.tensor(True)}, src / "bool_count.safetensors")


def _torch_archives(src: Path) -> None:
    sd = state(3)
    archive = torch_bytes(sd)
    (src / "ok.pt").write_bytes(archive)
    # re-zipped by another tool: torch's computed offsets then point at the wrong bytes. ckptavg's fast path
    # takes each record's offset from its own local header and reads it right; a checkpoint that needs
    # torch's unpickler (here for an argparse.Namespace) gets torch's offsets, and is refused.
    (src / "rezipped.pt").write_bytes(repack_zip(archive))
    (src / "rezipped_hparams.pt").write_bytes(repack_zip(torch_bytes({"state_dict": sd, "hparams": argparse.Namespace(lr=0.1)})))
    (src / "deflated.pt").write_bytes(repack_zip(archive, zipfile.ZIP_DEFLATED))
    (src / "no_data_pkl.pt").write_bytes(repack_zip(archive, skip="data.pkl"))
    (src / "zip_bomb.pt").write_bytes(_claimed_size(repack_zip(archive, zipfile.ZIP_DEFLATED), "data.pkl", 2**40))
    # found by bench/fuzz.py: one bit of a record's external attributes, the MS-DOS directory bit; torch.load then
    # returns uninitialised memory for that tensor
    (src / "dir_bit.pt").write_bytes(_central_field(archive, "data/0", 38, 0x10))
    # One tensor's reference to a storage that another tensor (a view) shares is renamed, so the data section
    # still holds every storage listed, but not the renamed one: torch.load hands out uninitialised memory for it.
    legacy = torch_bytes({**sd, "weight_rows": sd["weight"][1:]}, legacy=True)
    key = next(k.encode() for k in _legacy_storage_keys(legacy) if legacy.count(k.encode()) >= 3)  # 2 uses + the list
    dangling = legacy.replace(key, key[:-1] + b"X", 1)
    (src / "legacy_dangling.pt").write_bytes(dangling)
    # found by bench/fuzz.py: the same with protocol 7 in the first pickle, which torch's unpickler accepts
    # and the standard one refuses
    (src / "legacy_dangling_proto7.pt").write_bytes(dangling[:1] + b"\x07" + dangling[2:])


def _central_field(archive: bytes, name: str, offset: int, value: int) -> bytes:
    """The archive with a 4-byte field of `name`'s central directory entry set to `value`."""
    data = bytearray(archive)
    at = data.find(b"PK\x01\x02")
    while at >= 0:
        name_len = struct.unpack_from("<H", data, at + 28)[0]
        if data[at + 46: at + 46 + name_len].decode().endswith(name):
            struct.pack_into("<I", data, at + offset, value)
            return bytes(data)
        at = data.find(b"PK\x01\x02", at + 4)
    raise AssertionError(f"{name} not in archive")


def _claimed_size(archive: bytes, name: str, size: int) -> bytes:
    """The archive with `name`'s uncompressed size in the central directory set to `size` (ZIP64 not needed:
    the field is clamped to 0xFFFFFFFF, which zipfile then reads as is)."""
    return _central_field(archive, name, 24, min(size, 0xFFFFFFFF - 1))  # offset 24: uncompressed size


def _legacy_storage_keys(legacy: bytes) -> list[str]:
    """The storage keys of a legacy file: the list pickled after the object."""
    import pickle

    f = io.BytesIO(legacy)
    for _ in range(3):
        pickle.load(f)

    class NoCode(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            return lambda *a, **k: None

        def persistent_load(self, pid: Any) -> None:
            return None

    NoCode(f).load()
    keys = pickle.load(f)
    assert isinstance(keys, list) and keys
    return keys


def _code_running_pickles(src: Path, marker: Path) -> None:
    weights = {"weight": torch.zeros(2)}
    payloads = {
        "system": RunsCode(os.system, touch_command(marker)),
        "eval": RunsCode(eval, f"__import__('pathlib').Path({str(marker)!r}).touch()"),
        "popen": RunsCode(subprocess.Popen, ["touch", str(marker)]),
    }
    for name, payload in payloads.items():
        torch.save({**weights, "hook": payload}, src / f"evil_{name}.pt")
    torch.save({**weights, "hook": payloads["system"]}, src / "evil_legacy.pt", _use_new_zipfile_serialization=False)
    # the payload in an HF folder's pytorch_model.bin, and in one shard of a sharded torch checkpoint
    hf = src.parent / "hf_evil" / "checkpoint-10"
    hf.mkdir(parents=True)
    torch.save({**state(4), "hook": payloads["system"]}, hf / "pytorch_model.bin")
    sharded = src.parent / "hf_evil_sharded" / "checkpoint-10"
    sharded.mkdir(parents=True)
    torch.save({"weight": state(5)["weight"]}, sharded / "pytorch_model-00001-of-00002.bin")
    torch.save({"bias": state(5)["bias"], "hook": payloads["eval"]}, sharded / "pytorch_model-00002-of-00002.bin")
    index = {"weight_map": {"weight": "pytorch_model-00001-of-00002.bin", "bias": "pytorch_model-00002-of-00002.bin"}}
    (sharded / "pytorch_model.bin.index.json").write_text(json.dumps(index))


def _folders(tmp: Path, src: Path, runs: Path) -> None:
    (tmp / "empty_dir").mkdir()
    (tmp / "only_text").mkdir()
    (tmp / "only_text" / "log.txt").write_text("epoch 1\n")
    # an HF folder whose weights "file" is a directory: not a checkpoint folder at all
    (tmp / "dir_as_weights" / "checkpoint-5" / "model.safetensors").mkdir(parents=True)
    base = runs / "hf-sharded" / "checkpoint-24"
    for name in ("missing_shard", "shard_is_dir", "key_not_in_shard", "bad_index", "index_no_map"):
        shutil.copytree(base, tmp / name / "checkpoint-24")
    shard = "model-00002-of-00002.safetensors"
    (tmp / "missing_shard" / "checkpoint-24" / shard).unlink()
    (tmp / "shard_is_dir" / "checkpoint-24" / shard).unlink()
    (tmp / "shard_is_dir" / "checkpoint-24" / shard).mkdir()
    index_path = tmp / "key_not_in_shard" / "checkpoint-24" / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["ghost.weight"] = shard
    index_path.write_text(json.dumps(index))
    (tmp / "bad_index" / "checkpoint-24" / "model.safetensors.index.json").write_text('{"weight_map": {')
    (tmp / "index_no_map" / "checkpoint-24" / "model.safetensors.index.json").write_text('{"metadata": {}}')


PAIR = "{src}/one.safetensors {src}/two.safetensors"
HOSTILE_CASES = [
    # safetensors headers
    pytest.param("{src}/len_past_end.safetensors", ["len_past_end.safetensors", "header"], id="header-length-past-end"),
    pytest.param("{src}/len_2p60.safetensors", ["len_2p60.safetensors"], id="header-length-2**60"),
    pytest.param("{src}/len_max.safetensors", ["len_max.safetensors"], id="header-length-2**64-1"),
    pytest.param("{src}/len_short.safetensors", ["len_short.safetensors"], id="header-length-too-short"),
    pytest.param("{src}/overlap.safetensors", ["overlap.safetensors", "'b'", "overlaps"], id="offsets-overlap"),
    pytest.param("{src}/hole.safetensors", ["hole.safetensors", "'b'", "hole"], id="offsets-leave-a-hole"),
    pytest.param("{src}/past_end.safetensors", ["past_end.safetensors", "'a'", "past the data"], id="offsets-past-end"),
    pytest.param("{src}/unknown_dtype.safetensors", ["unknown_dtype.safetensors", "F99"], id="unknown-dtype"),
    pytest.param("{src}/shape_vs_bytes.safetensors", ["shape_vs_bytes.safetensors", "'a'", "[3]", "16 bytes"],
                 id="shape-disagrees-with-byte-count"),
    pytest.param("{src}/giant_empty.safetensors", ["giant_empty.safetensors", "too large"], id="empty-shape-overflowing-int64"),
    pytest.param("{src}/reversed_offsets.safetensors", ["reversed_offsets.safetensors", "data_offsets"], id="offsets-reversed"),
    pytest.param("{src}/float_offsets.safetensors", ["float_offsets.safetensors", "data_offsets"], id="offsets-float"),
    pytest.param("{src}/negative_shape.safetensors", ["negative_shape.safetensors", "shape"], id="shape-negative"),
    pytest.param("{src}/meta_not_strings.safetensors", ["meta_not_strings.safetensors", "__metadata__"],
                 id="metadata-not-strings"),
    pytest.param("{src}/no_tensors.safetensors", ["no_tensors.safetensors", "no tensors"], id="header-without-tensors"),
    pytest.param("{src}/lone_surrogate.safetensors", ["lone_surrogate.safetensors", "Unicode"], id="name-lone-surrogate"),
    pytest.param("{src}/huge_int.safetensors", ["huge_int.safetensors", "JSON"], id="json-int-past-digit-limit"),
    pytest.param("{src}/utf16.safetensors", ["utf16.safetensors", "JSON"], id="header-utf16"),
    pytest.param("{src}/not_utf8.safetensors", ["not_utf8.safetensors", "JSON"], id="header-not-utf8"),
    pytest.param("{src}/long_name.safetensors", ["long_name.safetensors", "F99", "..."], id="megabyte-tensor-name"),
    # torch archives
    pytest.param("{src}/rezipped_hparams.pt", ["rezipped_hparams.pt", "torch.save"], id="torch-zip-repacked-by-zipfile"),
    pytest.param("{src}/deflated.pt", ["deflated.pt", "compressed"], id="torch-zip-deflated"),
    pytest.param("{src}/no_data_pkl.pt", ["no_data_pkl.pt", "data.pkl"], id="torch-zip-without-data-pkl"),
    pytest.param("{src}/zip_bomb.pt", ["zip_bomb.pt", "zip bomb"], id="torch-zip-bomb"),
    pytest.param("{src}/dir_bit.pt", ["dir_bit.pt", "directory"], id="torch-zip-record-marked-as-directory"),
    pytest.param("{src}/legacy_dangling.pt", ["legacy_dangling.pt", "does not hold"], id="legacy-dangling-storage"),
    pytest.param("{src}/legacy_dangling_proto7.pt", ["legacy_dangling_proto7.pt", "torch.save"],
                 id="legacy-dangling-storage-protocol-7"),
    # pickles that would run code, in other containers than the zip of test_cli
    pytest.param("{src}/evil_eval.pt", ["evil_eval.pt", "eval", "--trust-pickle"], id="pickle-eval"),
    pytest.param("{src}/evil_popen.pt", ["evil_popen.pt", "Popen", "--trust-pickle"], id="pickle-popen"),
    pytest.param("{src}/evil_legacy.pt", ["evil_legacy.pt", "system", "--trust-pickle"], id="pickle-legacy-format"),
    pytest.param("{tmp}/hf_evil", ["pytorch_model.bin", "--trust-pickle"], id="pickle-in-hf-folder"),
    pytest.param("{tmp}/hf_evil_sharded", ["pytorch_model-00002-of-00002.bin", "--trust-pickle"],
                 id="pickle-in-hf-shard"),
    # folders and globs
    pytest.param("{tmp}/empty_dir", ["empty_dir"], id="empty-directory"),
    pytest.param("{tmp}/only_text/*.txt", ["*.txt"], id="glob-matching-only-non-checkpoints"),
    pytest.param("{tmp}/dir_as_weights", ["dir_as_weights"], id="hf-weights-name-is-a-directory"),
    pytest.param("{tmp}/missing_shard", ["model-00002-of-00002.safetensors", "missing"], id="hf-index-missing-shard"),
    pytest.param("{tmp}/shard_is_dir", ["model-00002-of-00002.safetensors"], id="hf-index-shard-is-a-directory"),
    pytest.param("{tmp}/key_not_in_shard", ["ghost.weight"], id="hf-index-key-not-in-shard"),
    pytest.param("{tmp}/bad_index", ["model.safetensors.index.json", "JSON"], id="hf-index-invalid-json"),
    pytest.param("{tmp}/index_no_map", ["model.safetensors.index.json", "weight_map"], id="hf-index-without-weight-map"),
    # values and dtypes
    pytest.param(PAIR.replace("two", "inf"), ["inf.safetensors", "'weight'", "--allow-nonfinite"], id="inf-input"),
    pytest.param(PAIR.replace("two", "neginf"), ["neginf.safetensors", "'bias'"], id="minus-inf-input"),
    pytest.param(PAIR.replace("one", "int_bias_first"), ["int_bias_first.safetensors", "bias", "integer"],
                 id="int-vs-float-other-order"),
    pytest.param(PAIR.replace("two", "bool_count"), ["bool_count.safetensors", "count", "bool"], id="bool-vs-int"),
    # outputs
    pytest.param(PAIR + " -o {src}/../src/one.safetensors --force", ["input"], id="output-is-input-via-dotdot"),
    pytest.param(PAIR + " -o {plainfile}/avg.safetensors", ["plain.txt"], id="output-directory-is-a-file"),
]


@pytest.mark.parametrize("args, message_parts", HOSTILE_CASES)
def test_hostile_input_is_one_error_line_and_changes_nothing(
    cli: Cli, corpus: dict[str, str], runs: Path, args: str, message_parts: list[str]
) -> None:
    tmp = Path(corpus["tmp"])
    work = Path(corpus["work"])
    argv = ["swa", *[part.format(**corpus) for part in args.split()]]
    if "-o" not in argv:
        argv += ["-o", corpus["out"]]
    output = Path(argv[argv.index("-o") + 1])
    existed = output.exists()
    before = snapshot(tmp, work, runs)

    line = assert_one_error_line(cli(*argv))

    for part in message_parts:
        assert part.format(**corpus) in line, f"{part!r} not in {line!r}"
    assert len(line) < 2000, "an error line must stay readable"
    assert existed or not output.exists()
    assert partial_files(tmp, work) == []
    assert not Path(corpus["marker"]).exists(), "unpickling ran code"
    assert snapshot(tmp, work, runs) == before, "an error changed files"


@pytest.mark.parametrize("command", [["inspect"], ["plan", "swa"]])
@pytest.mark.parametrize("name", ["evil_system.pt", "evil_eval.pt", "evil_legacy.pt"])
def test_code_running_pickle_refused_by_inspect_and_plan(cli: Cli, corpus: dict[str, str], command: list[str], name: str) -> None:
    """inspect and plan unpickle too: they must refuse the same way and never run the payload."""
    tmp = Path(corpus["tmp"])
    before = snapshot(tmp)
    line = assert_one_error_line(cli(*command, Path(corpus["src"]) / name))
    assert name in line and "--trust-pickle" in line
    assert not Path(corpus["marker"]).exists()
    assert snapshot(tmp) == before


def test_code_running_pickle_refused_in_a_real_process(corpus: dict[str, str]) -> None:
    """The same refusal through `python -m ckptavg` (a real process, its own imports and signal handlers)."""
    src = Path(corpus["src"])
    before = snapshot(Path(corpus["tmp"]), Path(corpus["work"]))
    line = one_line_error_subprocess(run_ckptavg("swa", src / "ok.pt", src / "evil_popen.pt", "-o", corpus["out"]))
    assert "evil_popen.pt" in line
    time.sleep(0.2)  # a Popen payload would have had time to create the marker
    assert not Path(corpus["marker"]).exists()
    assert snapshot(Path(corpus["tmp"]), Path(corpus["work"])) == before


# ---------------------------------------------------------------- readers, directly: no allocation, no hang


@pytest.mark.parametrize("name", ["len_2p60.safetensors", "len_max.safetensors", "len_past_end.safetensors"])
def test_huge_header_length_allocates_nothing(corpus: dict[str, str], name: str) -> None:
    path = Path(corpus["src"]) / name
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointFormatError):
            read_safetensors_header(path)
        with pytest.raises(CheckpointFormatError):
            open_checkpoint(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1024 * 1024, peak


def test_pickle_size_larger_than_its_record_allocates_nothing(tmp_path: Path) -> None:
    """A pickle claiming a storage of 2**40 elements for an 16-byte record: refused before any read."""
    archive = torch_bytes({"w": torch.zeros(4)})
    with zipfile.ZipFile(io.BytesIO(archive)) as z:
        pkl_name = next(n for n in z.namelist() if n.endswith("data.pkl"))
        pkl = z.read(pkl_name)
    # the storage's numel is pickled as BININT1 4 ("K\x04") just before "tq"; make it a LONG1 of 2**40
    patched = pkl.replace(b"K\x04tq", b"\x8a\x06\x00\x00\x00\x00\x00\x01tq", 1)
    patched = patched.replace(b"K\x04\x85q", b"\x8a\x06\x00\x00\x00\x00\x00\x01\x85q", 1)
    assert patched != pkl
    path = tmp_path / "big.pt"
    path.write_bytes(_rewrite_record(archive, pkl_name, patched))
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointFormatError) as info:
            ckpt = open_checkpoint(path)
            for t in ckpt.tensors.values():
                t.load()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert "big.pt" in str(info.value) and "4398046511104 bytes" in str(info.value) and "corrupt" in str(info.value)
    assert peak < 16 * 1024 * 1024, peak


def _rewrite_record(archive: bytes, name: str, payload: bytes) -> bytes:
    """The archive with one record replaced, written by torch's own writer (aligned, CRCs right)."""
    with zipfile.ZipFile(io.BytesIO(archive)) as z:
        records = [(i.filename.split("/", 1)[1], payload if i.filename == name else z.read(i)) for i in z.infolist()]
    buf = io.BytesIO()
    writer = torch._C.PyTorchFileWriter(buf)
    for rec, data in records:
        if rec not in ("version", ".data/serialization_id"):
            writer.write_record(rec, data, len(data))
    writer.write_end_of_file()
    del writer
    return buf.getvalue()


def test_rezipped_archive_is_read_right_or_refused(corpus: dict[str, str]) -> None:
    """Why the re-zipped case matters: torch.load reads it fine, so the data is intact; ckptavg must never
    hand out other bytes for it. The fast path reads the true offsets; torch's path refuses (HOSTILE_CASES)."""
    src = Path(corpus["src"])
    reference = torch.load(src / "rezipped.pt", weights_only=True)
    assert all(torch.equal(reference[k], v) for k, v in state(3).items())
    ckpt = open_checkpoint(src / "rezipped.pt")
    assert sorted(ckpt.tensors) == sorted(reference)
    for name, t in ckpt.tensors.items():
        assert torch.equal(t.load(), reference[name]), name
    with pytest.raises(CheckpointFormatError, match="torch.save"):
        open_checkpoint(src / "rezipped_hparams.pt")


@contextmanager
def alarm_after(seconds: int) -> Iterator[None]:
    """Turn a hang (a blocking open of a FIFO) into a failure instead of a stuck suite."""

    def fail(signum: int, frame: Any) -> None:
        raise TimeoutError(f"blocked for {seconds} s")

    old = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.mark.parametrize("kind", ["fifo", "char-device"])
@pytest.mark.parametrize("command", ["inspect", "swa"])
def test_not_a_regular_file_is_refused_without_hanging(cli: Cli, tmp_path: Path, kind: str, command: str) -> None:
    """Opening a FIFO for reading blocks until a writer comes; /dev/zero never ends."""
    if kind == "fifo":
        target = tmp_path / "pipe.safetensors"
        os.mkfifo(target)
    else:
        target = Path("/dev/zero")
    args = ["inspect", target] if command == "inspect" else ["swa", target, "-o", tmp_path / "avg.safetensors"]
    with alarm_after(20):
        line = assert_one_error_line(cli(*args))
    assert str(target) in line
    assert not (tmp_path / "avg.safetensors").exists()


def test_sniff_refuses_a_fifo_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.pt"
    os.mkfifo(fifo)
    with pytest.raises(CheckpointFormatError, match="not a regular file"):
        sniff(fifo)


# ---------------------------------------------------------------- flags that turn the errors into results


@pytest.mark.parametrize("other", ["inf", "neginf"])
def test_allow_nonfinite_averages_inf(cli: Cli, corpus: dict[str, str], other: str) -> None:
    src, out = Path(corpus["src"]), Path(corpus["out"])
    result = cli("swa", src / "one.safetensors", src / f"{other}.safetensors", "-o", out, "--allow-nonfinite")
    assert result.exit_code == 0, result.output
    refs = [load_file(src / "one.safetensors"), load_file(src / f"{other}.safetensors")]
    got = load_file(out)
    for key in ("weight", "bias"):
        expected = torch.stack([r[key].double() for r in refs]).mean(0).float()
        torch.testing.assert_close(got[key], expected)  # inf where the reference has inf, of the same sign
    assert bool(got["weight" if other == "inf" else "bias"].isinf().any())


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_fp16_and_fp32_average_with_dtype(cli: Cli, corpus: dict[str, str], dtype: str) -> None:
    """Without --dtype it is an error (test_cli: fp16-vs-fp32); with any --dtype it is the float64 mean rounded once."""
    src, out = Path(corpus["src"]), Path(corpus["out"])
    result = cli("swa", src / "one.safetensors", src / "fp16.safetensors", "-o", out, "--dtype", dtype)
    assert result.exit_code == 0, result.output
    refs = [load_file(src / "one.safetensors"), load_file(src / "fp16.safetensors")]
    got = load_file(out)
    want = getattr(torch, dtype)
    for key in ("weight", "bias"):
        expected = torch.stack([r[key].double() for r in refs]).mean(0).to(want)
        assert got[key].dtype == want
        assert torch.equal(got[key], expected), key
    assert got["count"].dtype == torch.int64 and torch.equal(got["count"], refs[1]["count"])


# ---------------------------------------------------------------- links and output directories


def test_output_symlink_to_input_without_force(cli: Cli, corpus: dict[str, str]) -> None:
    """test_cli covers the symlink with --force; without it the refusal must not touch the input either."""
    src = Path(corpus["src"])
    link = Path(corpus["outdir"]) / "link.safetensors"
    os.symlink(src / "two.safetensors", link)
    before = snapshot(Path(corpus["tmp"]), Path(corpus["work"]))
    line = assert_one_error_line(cli("swa", *PAIR.format(**corpus).split(), "-o", link))
    assert "link.safetensors" in line
    assert snapshot(Path(corpus["tmp"]), Path(corpus["work"])) == before


def test_symlinked_input_directory_and_output_through_it(cli: Cli, corpus: dict[str, str]) -> None:
    """The output named through a symlinked directory that is the input directory: still refused."""
    tmp, work = Path(corpus["tmp"]), Path(corpus["work"])
    os.symlink(corpus["src"], work / "alias")
    before = snapshot(tmp, work)
    line = assert_one_error_line(cli("swa", *PAIR.format(**corpus).split(), "-o", work / "alias" / "one.safetensors", "--force"))
    assert "input" in line
    assert snapshot(tmp, work) == before


def test_read_only_output_directory(cli: Cli, corpus: dict[str, str]) -> None:
    if os.geteuid() == 0:
        pytest.skip("root bypasses directory permissions")
    outdir = Path(corpus["outdir"])
    outdir.chmod(0o555)
    try:
        before = snapshot(Path(corpus["tmp"]), Path(corpus["work"]))
        line = assert_one_error_line(cli("swa", *PAIR.format(**corpus).split(), "-o", corpus["out"]))
        assert str(outdir) in line
        assert snapshot(Path(corpus["tmp"]), Path(corpus["work"])) == before
    finally:
        outdir.chmod(0o755)


def test_temp_file_cannot_be_created(cli: Cli, corpus: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """What a read-only directory does, also as root: creating the temp file fails (EROFS, EACCES)."""

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    before = snapshot(Path(corpus["tmp"]), Path(corpus["work"]))
    line = assert_one_error_line(cli("swa", *PAIR.format(**corpus).split(), "-o", corpus["out"]))
    assert "avg.safetensors" in line and "Permission denied" in line
    assert snapshot(Path(corpus["tmp"]), Path(corpus["work"])) == before


# ---------------------------------------------------------------- odd names: still one line, never a traceback


@pytest.mark.parametrize("where", ["file name", "tensor key"])
def test_newline_in_a_name_keeps_one_error_line(cli: Cli, tmp_path: Path, where: str) -> None:
    if where == "file name":
        bad = tmp_path / "new\nline.safetensors"
        bad.write_bytes(b"")
        args = [bad]
    else:
        save_file({"a\nb": torch.tensor([float("nan")])}, tmp_path / "k1.safetensors")
        save_file({"a\nb": torch.tensor([1.0])}, tmp_path / "k2.safetensors")
        args = [tmp_path / "k1.safetensors", tmp_path / "k2.safetensors"]
    line = assert_one_error_line(cli("swa", *args, "-o", tmp_path / "avg.safetensors"))
    assert "line" in line or "a" in line


def test_undecodable_file_name_in_a_utf8_locale(tmp_path: Path) -> None:
    """A file name that is not UTF-8 (legal on Linux) with a strict UTF-8 stdout, as in an en_US.UTF-8 locale."""
    for i in (1, 2):
        save_file(state(i), tmp_path / f"in{i}.safetensors")
    out = os.fsencode(tmp_path) + b"/avg\xff.safetensors"
    proc = run_ckptavg("swa", tmp_path / "in1.safetensors", tmp_path / "in2.safetensors", "-o", out,
                       env={"PYTHONIOENCODING": "utf-8"})
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stdout.splitlines()) == 1


def test_undecodable_input_name_in_an_error(tmp_path: Path) -> None:
    """The Error line itself survives a name that is not UTF-8 (stderr escapes it)."""
    bad = os.fsencode(tmp_path) + b"/bad\xff.safetensors"
    with open(bad, "wb"):
        pass
    line = one_line_error_subprocess(run_ckptavg("swa", bad, "-o", tmp_path / "avg.safetensors", env={"PYTHONIOENCODING": "utf-8"}))
    assert "bad" in line
    assert not (tmp_path / "avg.safetensors").exists()


def test_megabyte_key_error_stays_short(corpus: dict[str, str]) -> None:
    with pytest.raises(CheckpointFormatError) as info:
        read_safetensors_header(Path(corpus["src"]) / "long_name.safetensors")
    assert "long_name.safetensors" in str(info.value) and len(str(info.value)) < 1000


@pytest.mark.parametrize("target", ["{tmp}/empty_dir", "{tmp}/only_text", "{tmp}/dir_as_weights/checkpoint-5"])
def test_inspect_wants_a_file_or_checkpoint_folder(cli: Cli, corpus: dict[str, str], target: str) -> None:
    """A directory where one checkpoint (a file, or a Hugging Face/DCP folder) is required."""
    path = target.format(**corpus)
    before = snapshot(Path(corpus["tmp"]))
    line = assert_one_error_line(cli("inspect", path))
    assert path in line and "a folder, not a checkpoint" in line
    assert snapshot(Path(corpus["tmp"])) == before
