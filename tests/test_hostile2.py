"""Hostile inputs, second round (issue 18, the read side): crafted pickles, DCP metadata, sidecar JSON,
tensor names, inputs that change while being read, and more inputs than the open-file limit.

Every CLI case runs in one child process (tests/hostile_driver.py) under an address-space cap and a timeout,
so a bomb fails its test instead of the machine, and checks the contract of test_hostile.py: exit 1 with a
single `Error:` line naming the file, no traceback, nothing at the output path, no temp file, every input
unchanged. Cases that torch.load reads and that are harmless (a list nested 50 000 deep, a DAG of shared
lists in a side entry) must be read, and give the right average.
"""

from __future__ import annotations

import json
import os
import pickle
import resource
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from hostile_inputs import (
    dcp_folder,
    deep_dicts,
    deep_json,
    deep_lists,
    edit_dcp_metadata,
    edit_pickle,
    free_memo,
    hf_folder,
    huge_int_binary,
    huge_int_text,
    memo_put,
    memo_put_text,
    record_aliased,
    shared_dicts,
    shared_lists,
    tensor_ref,
    torch_bytes,
    weights,
    with_value,
)
from safetensors.torch import load_file, save_file
from test_cli import partial_files, snapshot

from ckptavg import CheckpointFormatError, open_checkpoint

HERE = Path(__file__).resolve().parent
MEMORY_CAP = 3 << 30  # address space of the driver: torch itself takes about 1 GiB of it
DRIVER_TIMEOUT = 120

Build = Callable[[Path], Path]  # writes a case's input under the given folder; returns the path to pass


# ---------------------------------------------------------------- crafted pickles


def _file(name: str, data: Callable[[], bytes]) -> Build:
    def build(root: Path) -> Path:
        (root / name).write_bytes(data())
        return root / name
    return build


def _patched(edits: dict[bytes, bytes], legacy: bool = False) -> bytes:
    """The base checkpoint with runs of pickle opcodes (a size or stride tuple) replaced, each found once."""
    def edit(pickled: bytes) -> bytes:
        for old, new in edits.items():
            assert pickled.count(old) == 1, old
            pickled = pickled.replace(old, new)
        return pickled
    base = torch_bytes(weights(), legacy=legacy)
    return edit(base) if legacy else edit_pickle(base, edit)


def _long(n: int) -> bytes:
    raw = n.to_bytes((n.bit_length() + 8) // 8, "little")
    return b"\x8a" + bytes([len(raw)]) + raw


SIZE, STRIDE = b"K\x04K\x03\x86", b"K\x03K\x01\x86"  # weight: shape (4, 3), strides (3, 1)
TENSOR_DEEP = tensor_ref(lambda t, m: deep_dicts(50_000, t))
TENSOR_DAG = tensor_ref(lambda t, m: shared_dicts(45, m, t))
CYCLE = free_memo(lambda m: b"]r" + struct.pack("<I", m) + b"j" + struct.pack("<I", m) + b"a")
STEP_2_127 = _long(2**127)

PICKLE_ERRORS: dict[str, tuple[Callable[[bool], bytes], list[str]]] = {
    "tensor-nested-50000-deep": (lambda legacy: with_value(TENSOR_DEEP, legacy), ["nested more than"]),
    "tensor-in-dag-2**45-names": (lambda legacy: with_value(TENSOR_DAG, legacy), ["referred to from so many places"]),
    "memo-long-binput-2**27": (lambda legacy: with_value(memo_put(2**27), legacy), ["memo index 134217728"]),
    "memo-put-text": (lambda legacy: with_value(memo_put_text(2**27), legacy), ["opcode"]),
    "int-past-digit-limit": (lambda legacy: with_value(huge_int_text(5000), legacy), ["opcode"]),
    "int-long4-3000-bytes": (lambda legacy: with_value(huge_int_binary(3000), legacy), ["opcode"]),
    "container-holds-itself": (lambda legacy: with_value(CYCLE, legacy), ["contains itself"]),
    "step-2**127": (lambda legacy: with_value(STEP_2_127, legacy, key="global_step"), ["'global_step'", "too large"]),
    # torch refuses these two itself while rebuilding the tensor: the error must still be one line
    "shape-2**62-squared": (lambda legacy: _patched({SIZE: _long(2**62) * 2 + b"\x86"}, legacy), ["overflow", "corrupt"]),
    "empty-shape-past-int64": (lambda legacy: _patched({SIZE: b"K\x00" + _long(2**62) * 2 + b"\x87",
                                                        STRIDE: b"K\x01" * 3 + b"\x87"}, legacy), ["shape"]),
    "stride-0-broadcast-4-GiB": (lambda legacy: _patched({SIZE: _long(2**20) + _long(2**10) + b"\x86",
                                                          STRIDE: b"K\x00K\x00\x86"}, legacy), ["repeats", ".contiguous()"]),
    "stride-past-int64": (lambda legacy: _patched({STRIDE: _long(2**64) + b"K\x01\x86"}, legacy), ["Overflow", "corrupt"]),
}


def _pickle_cases() -> dict[str, tuple[Build, list[str]]]:
    cases = {}
    for name, (make, parts) in PICKLE_ERRORS.items():
        for legacy in (False, True):
            file = f"{name}{'-legacy' if legacy else ''}.pt"
            cases[file.removesuffix(".pt")] = (_file(file, lambda make=make, legacy=legacy: make(legacy)), [file, *parts])
    zipped = torch_bytes(weights())
    cases["record-named-by-another-entry"] = (
        _file("aliased.pt", lambda: record_aliased(zipped, "data/1", "data/0")), ["aliased.pt", "points at the record"])
    cases["record-inside-another"] = (
        _file("inside.pt", lambda: _point_into(zipped, "data/1", "data/0", 16)), ["inside.pt", "local header"])
    return cases


def _point_into(archive: bytes, victim: str, source: str, delta: int) -> bytes:
    from hostile_inputs import central_offset
    data = bytearray(archive)
    at, _ = central_offset(archive, victim)
    _, offset = central_offset(archive, source)
    struct.pack_into("<I", data, at + 42, offset + delta)
    return bytes(data)


HARMLESS = {  # torch.load reads these in milliseconds; so must ckptavg, and average them right
    "list-nested-50000-deep": lambda legacy: with_value(deep_lists(50_000), legacy),
    "lists-dag-2**45-leaves": lambda legacy: with_value(free_memo(lambda m: shared_lists(45, m)), legacy),
    "int-dag-side-entry": lambda legacy: with_value(free_memo(lambda m: shared_dicts(45, m, b"K\x05")), legacy),
    "memo-index-at-limit": lambda legacy: with_value(free_memo(lambda m: memo_put(m)), legacy),
}


# ---------------------------------------------------------------- DCP metadata


def _dcp(name: str, change: Callable[[Any], None], state: dict[str, Any] | None = None,
         raw: Callable[[bytes], bytes] | None = None) -> Build:
    def build(root: Path) -> Path:
        folder = dcp_folder(root / name / "checkpoint-5", state)
        edit_dcp_metadata(folder, change)
        if raw is not None:
            (folder / ".metadata").write_bytes(raw((folder / ".metadata").read_bytes()))
        return folder
    return build


def _huge_size(md: Any) -> None:
    entry = md.state_dict_metadata["model.weight"]
    entry.size = torch.Size([2**20, 2**20])
    entry.chunks[0].sizes = torch.Size([2**20, 2**20])


def _shared_chunks(md: Any) -> None:
    """2000 chunks of (4, 3), every one pointing at the bytes of the single chunk saved."""
    entry = md.state_dict_metadata["model.weight"]
    index, info = next((i, v) for i, v in md.storage_data.items() if i.fqn == "model.weight")
    first = entry.chunks[0]
    entry.size = torch.Size([4 * 2000, 3])
    entry.chunks = [replace(first, offsets=torch.Size([4 * i, 0])) for i in range(2000)]
    for i in range(2000):
        md.storage_data[replace(index, offset=torch.Size([4 * i, 0]), index=None)] = info


def _rename(old: str, new: str) -> Callable[[Any], None]:
    def change(md: Any) -> None:
        md.state_dict_metadata = {new if k == old else k: v for k, v in md.state_dict_metadata.items()}
        md.storage_data = {replace(i, fqn=new) if i.fqn == old else i: v for i, v in md.storage_data.items()}
        md.planner_data = {new if k == old else k: tuple(new.split(".")) if k == old else v
                           for k, v in md.planner_data.items()}
    return change


def _memo_bomb(data: bytes) -> bytes:
    md = pickle.loads(data)
    plain = pickle.dumps(md, protocol=2)
    return plain[:2] + b"]r" + struct.pack("<I", 0x0FFFFFF0) + b"0" + plain[2:]


def _size_long4(data: bytes) -> bytes:
    plain = pickle.dumps(pickle.loads(data), protocol=2)
    marker = b"K\x04K\x03\x86"  # model.weight's size (4, 3), first occurrence
    return plain.replace(marker, huge_int_binary(700) + b"K\x03\x86", 1)


def _nothing(md: Any) -> None:
    pass


DCP_CASES: dict[str, tuple[Build, list[str]]] = {
    "dcp-size-beyond-chunks": (_dcp("dcp_huge", _huge_size), ["dcp_huge", "model.weight", "claims"]),
    "dcp-chunks-share-bytes": (_dcp("dcp_shared", _shared_chunks), ["dcp_shared", "data files hold"]),
    "dcp-lone-surrogate-key": (_dcp("dcp_surrogate", _rename("model.bias", "model.b\ud800")), ["dcp_surrogate", "Unicode"]),
    "dcp-metadata-memo-bomb": (_dcp("dcp_memo", _nothing, raw=_memo_bomb), ["dcp_memo", "memo index"]),
    "dcp-size-huge-int": (_dcp("dcp_long4", _nothing, raw=_size_long4), ["dcp_long4", "size of 'model.weight'"]),
    "dcp-tensor-named-metadata": (_dcp("dcp_name", _nothing, state={"__metadata__": torch.ones(2), "w": torch.ones(2)}),
                                  ["dcp_name", "'__metadata__'"]),
}


# ---------------------------------------------------------------- sidecar JSON


def _hf(name: str, link: bool = False, loop: bool = False, **kw: Any) -> Build:
    def build(root: Path) -> Path:
        outside = root / "outside.safetensors"
        if not outside.exists():
            save_file({"weight": torch.full((4, 3), 666.0)}, outside)
        index = kw.get("index")
        if callable(index):
            kw["index"] = index(outside)
        folder = hf_folder(root / name / "checkpoint-10", **kw)
        if link:
            (folder / "link.safetensors").symlink_to(outside)
        if loop:
            (folder / "loop.safetensors").symlink_to("loop.safetensors")
        return folder
    return build


def _index(weight: Any, bias: Any = "model-00002-of-00002.safetensors") -> dict[str, Any]:
    return {"weight_map": {"weight": weight, "bias": bias}}


SIDECAR_CASES: dict[str, tuple[Build, list[str]]] = {
    "index-dotdot": (_hf("idx_dotdot", index=_index("../../outside.safetensors")), ["index.json", "outside the checkpoint"]),
    "index-absolute": (_hf("idx_abs", index=lambda o: _index(str(o))), ["index.json", "outside the checkpoint"]),
    "index-symlink-out": (_hf("idx_link", link=True, index=_index("link.safetensors")), ["index.json", "outside the checkpoint"]),
    "index-symlink-loop": (_hf("idx_loop", loop=True, index=_index("loop.safetensors")), ["index.json", "loop"]),
    "index-name-past-name-max": (_hf("idx_long", index=_index("m" * 300 + ".safetensors")), ["index.json", "m" * 40]),
    "index-shard-not-string": (_hf("idx_int", index=_index(5)), ["index.json", "'weight'", "not a string"]),
    "index-deep-nesting": (_hf("idx_deep", raw_index=b'{"weight_map": ' + deep_json(100_000) + b"}"),
                           ["index.json", "JSON"]),
    "index-int-past-digit-limit": (_hf("idx_digits", raw_index=b'{"weight_map": {"weight": ' + b"9" * 5000 + b"}}"),
                                   ["index.json", "JSON"]),
    "index-lone-surrogate": (_hf("idx_surrogate", raw_index=b'{"weight_map": {"w\\ud800": "x.safetensors"}}'),
                             ["index.json", "Unicode"]),
    "state-step-a-string": (_hf("st_str", trainer_state={"global_step": "12"}), ["trainer_state.json", "'global_step'"]),
    "state-step-2**100": (_hf("st_big", trainer_state={"global_step": 2**100}), ["trainer_state.json", "'global_step'"]),
    "state-epoch-nan": (_hf("st_nan", raw_state=b'{"global_step": 5, "epoch": NaN}'), ["trainer_state.json", "'epoch'"]),
    "state-epoch-inf": (_hf("st_inf", raw_state=b'{"global_step": 5, "epoch": 1e999}'), ["trainer_state.json", "'epoch'"]),
    "state-history-not-list": (_hf("st_hist", trainer_state={"global_step": 5, "log_history": {"a": 1}}),
                               ["trainer_state.json", "'log_history'"]),
    "state-deep-nesting": (_hf("st_deep", raw_state=b'{"global_step": 5, "x": ' + deep_json(100_000) + b"}"),
                           ["trainer_state.json", "JSON"]),
    "state-not-an-object": (_hf("st_list", trainer_state=[1, 2]), ["trainer_state.json", "object"]),
}


# ---------------------------------------------------------------- names


def _saved(name: str, obj: Callable[[], Any], legacy: bool = False) -> Build:
    return _file(name, lambda: torch_bytes(obj(), legacy=legacy))


def _st(name: str, tensors: dict[str, torch.Tensor]) -> Build:
    def build(root: Path) -> Path:
        save_file(tensors, root / name)
        return root / name
    return build


NAME_CASES: dict[str, tuple[Build, list[str], list[str]]] = {  # build, message parts, extra CLI arguments
    "tensor-named-metadata": (_saved("meta_name.pt", lambda: {"__metadata__": torch.ones(2), "w": torch.ones(2)}),
                              ["meta_name.pt", "'__metadata__'"], []),
    "tensor-named-metadata-legacy": (_saved("meta_name_legacy.pt", lambda: {"__metadata__": torch.ones(2)}, True),
                                     ["meta_name_legacy.pt", "'__metadata__'"], []),
    "metadata-after-prefix": (_saved("meta_prefix.pt", lambda: {"module.__metadata__": torch.ones(2), "module.w": torch.ones(2)}),
                              ["meta_prefix.pt", "'module.'", "--keep-prefix"], []),
    "metadata-after-key": (_st("meta_key.safetensors", {"ema.__metadata__": torch.ones(2), "ema.w": torch.ones(2)}),
                           ["meta_key.safetensors", "'__metadata__'"], ["--key", "ema"]),
    "dotted-vs-nested": (_saved("collide.pt", lambda: {"a.b": torch.ones(2), "a": {"b": torch.zeros(2)}}),
                         ["collide.pt", "'a.b'", "'a' > 'b'"], []),
    "dotted-vs-nested-legacy": (_saved("collide_legacy.pt", lambda: {"a": {"b": torch.zeros(2)}, "a.b": torch.ones(2)}, True),
                                ["collide_legacy.pt", "'a.b'"], []),
    "int-key-vs-str-key": (_saved("int_key.pt", lambda: {"layers": {1: torch.ones(2), "1": torch.zeros(2)}}),
                           ["int_key.pt", "'layers.1'"], []),
    "escape-codes-in-colliding-names": (
        _saved("escape.pt", lambda: {"x\x1b[2J\n.y": torch.ones(2), "x\x1b[2J\n": {"y": torch.zeros(2)}}),
        ["escape.pt", "\\x1b[2J\\n"], []),
}


# ---------------------------------------------------------------- running every case at once


@pytest.fixture(scope="module")
def driven(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Build every input, run every CLI case in the capped child process; the results, and what to check."""
    root = tmp_path_factory.mktemp("hostile2")
    src, out = root / "src", root / "out"
    src.mkdir()
    out.mkdir()
    (src / "good.pt").write_bytes(torch_bytes(weights()))
    expect: dict[str, tuple[list[str], list[str]]] = {}
    argv: dict[str, list[str]] = {}

    def add(case: str, build: Build, parts: list[str], extra: list[str] = (), ok: bool = False) -> None:  # type: ignore[assignment]
        path = build(src)
        inputs = [str(path)] if extra else [str(src / "good.pt"), str(path)]
        argv[case] = ["swa", *inputs, *extra, "-o", str(out / f"{case}.safetensors")]
        expect[case] = (parts, ["ok"] if ok else [])

    for case, (build, parts) in {**_pickle_cases(), **DCP_CASES, **SIDECAR_CASES}.items():
        add(case, build, parts)
    for case, (build, parts, extra) in NAME_CASES.items():
        add(case, build, parts, extra)
    for name, make in HARMLESS.items():
        for legacy in (False, True):
            file = f"{name}{'-legacy' if legacy else ''}.pt"
            add(f"ok-{file[:-3]}", _file(file, lambda make=make, legacy=legacy: make(legacy)), [], ok=True)
    before = snapshot(src)
    (root / "cases.json").write_text(json.dumps(argv))

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP, MEMORY_CAP))

    env = {k: v for k, v in os.environ.items() if k != "CKPTAVG_DEBUG"}
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), env.get("PYTHONPATH", "")])
    started = time.monotonic()
    command = [sys.executable, str(HERE / "hostile_driver.py"), str(root / "cases.json"), str(root / "results.json")]
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=DRIVER_TIMEOUT, preexec_fn=cap, env=env)
    except subprocess.TimeoutExpired as e:  # the cases it finished are in results.json; the others fail
        proc = subprocess.CompletedProcess(command, -9, str(e.stdout or ""), str(e.stderr or ""))
    results = json.loads((root / "results.json").read_text()) if (root / "results.json").exists() else {}
    return {"results": results, "expect": expect, "out": out, "src": src, "before": before, "driver": proc,
            "seconds": time.monotonic() - started}


CASE_IDS = [*_pickle_cases(), *DCP_CASES, *SIDECAR_CASES, *NAME_CASES]
OK_IDS = [f"ok-{n}{s}" for n in HARMLESS for s in ("", "-legacy")]


@pytest.mark.parametrize("case", CASE_IDS)
def test_hostile_case_is_one_error_line(driven: dict[str, Any], case: str) -> None:
    results = driven["results"]
    assert case in results, f"the driver died before this case: {driven['driver'].stderr[-2000:]}"
    r = results[case]
    assert r["exception"] is None, r["exception"]
    assert r["exit"] == 1, (r["exit"], r["stderr"], r["stdout"])
    lines = [ln for ln in r["stderr"].splitlines() if ln.strip() and not ln.startswith("Warning: ")]
    assert len(lines) == 1 and lines[0].startswith("Error: "), r["stderr"]
    assert "Traceback" not in r["stderr"] + r["stdout"] and "\x1b" not in r["stderr"]
    for part in driven["expect"][case][0]:
        assert part in lines[0], f"{part!r} not in {lines[0]!r}"
    assert r["seconds"] < 10, r["seconds"]
    assert not (driven["out"] / f"{case}.safetensors").exists()


@pytest.mark.parametrize("case", OK_IDS)
def test_harmless_crafted_pickle_is_read_and_averaged(driven: dict[str, Any], case: str) -> None:
    r = driven["results"][case]
    assert r["exit"] == 0, (r["stderr"], r["exception"])
    got = load_file(driven["out"] / f"{case}.safetensors")
    assert set(got) == {"weight", "bias"}
    for k, v in weights().items():
        assert torch.equal(got[k], v), k


def test_no_case_changed_inputs_left_temp_files_or_took_memory(driven: dict[str, Any]) -> None:
    assert snapshot(driven["src"]) == driven["before"], "an input changed"
    assert partial_files(driven["src"], driven["out"]) == []
    results = {k: v for k, v in driven["results"].items() if k != "__peak__"}
    worst = max(results.values(), key=lambda r: r["rss_growth"])
    assert worst["rss_growth"] < 300 * 2**20, worst  # a few KiB of input never costs hundreds of MiB
    assert driven["seconds"] < DRIVER_TIMEOUT


# ---------------------------------------------------------------- inputs that change while being read


def _pair(tmp_path: Path) -> list[Any]:
    for i in range(2):
        save_file({"w": torch.full((1000,), float(i))}, tmp_path / f"c{i}.safetensors")
    return [open_checkpoint(tmp_path / f"c{i}.safetensors") for i in range(2)]


def test_unchanged_inputs_pass(tmp_path: Path) -> None:
    from ckptavg.read.checkpoint import check_unchanged

    check_unchanged(_pair(tmp_path))


@pytest.mark.parametrize("how", ["rewritten-same-size", "truncated", "replaced-by-rename", "removed", "touched"])
def test_an_input_changed_after_opening_is_named(tmp_path: Path, how: str) -> None:
    from ckptavg.read.checkpoint import check_unchanged

    ckpts = _pair(tmp_path)
    victim = tmp_path / "c1.safetensors"
    if how == "rewritten-same-size":
        data = bytearray(victim.read_bytes())
        data[-4:] = b"\x00\x00\x80\x7f"
        with open(victim, "r+b") as f:
            f.write(data)
    elif how == "truncated":
        os.truncate(victim, victim.stat().st_size - 100)
    elif how == "replaced-by-rename":
        save_file({"w": torch.full((1000,), 7.0)}, tmp_path / "new.safetensors")
        os.replace(tmp_path / "new.safetensors", victim)
    elif how == "removed":
        victim.unlink()
    else:
        st = victim.stat()
        os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    with pytest.raises(CheckpointFormatError, match=r"c1\.safetensors: changed while being read; nothing was written\."):
        check_unchanged(ckpts)


def test_a_read_past_the_new_end_says_the_file_changed(tmp_path: Path) -> None:
    ckpts = _pair(tmp_path)
    os.truncate(tmp_path / "c0.safetensors", 200)
    with pytest.raises(CheckpointFormatError, match=r"c0\.safetensors: .*changed while being read.*nothing was written"):
        ckpts[0].tensors["w"].load()


def test_folders_record_every_file_they_are_read_from(tmp_path: Path) -> None:
    from ckptavg.read.checkpoint import check_unchanged

    hf = open_checkpoint(hf_folder(tmp_path / "hf" / "checkpoint-3", trainer_state={"global_step": 3}))
    assert {p.name for p in hf.stamps} == {"model.safetensors.index.json", "model-00001-of-00002.safetensors",
                                          "model-00002-of-00002.safetensors", "trainer_state.json"}
    dcp = open_checkpoint(dcp_folder(tmp_path / "dcp"))
    assert {p.name for p in dcp.stamps} == {".metadata", "__0_0.distcp"}
    (tmp_path / "dcp" / "__0_0.distcp").touch()
    with pytest.raises(CheckpointFormatError, match="__0_0.distcp: changed while being read"):
        check_unchanged([hf, dcp])


# ---------------------------------------------------------------- provenance, for inspect


def _provenance(**changes: str) -> dict[str, str]:
    good = {"format": "pt", "ckptavg_version": "1.0", "ckptavg_method": "swa", "ckptavg_params": '{"a": 1}',
            "ckptavg_order": "step", "ckptavg_inputs": json.dumps([{"path": "a.pt", "weight": 0.5, "step": 3}])}
    return good | changes


def test_provenance_parses_when_sound() -> None:
    from ckptavg.read.sidecars import parse_provenance

    assert parse_provenance({"format": "pt"}) is None
    got = parse_provenance(_provenance())
    assert got == {"version": "1.0", "method": "swa", "params": {"a": 1}, "order": "step",
                   "inputs": [{"path": "a.pt", "weight": 0.5, "step": 3}]}


@pytest.mark.parametrize("changes", [
    {"ckptavg_params": "[1, 2]"}, {"ckptavg_inputs": '{"a": 1}'}, {"ckptavg_params": "{"},
    {"ckptavg_params": '{"a": NaN}'}, {"ckptavg_params": '{"a": 1e999}'}, {"ckptavg_params": '{"a": ' + "9" * 5000 + "}"},
    {"ckptavg_params": '{"a": ' + str(2**70) + "}"}, {"ckptavg_inputs": "[" * 100_000 + "]" * 100_000},
    {"ckptavg_inputs": "[" * 40 + "]" * 40}, {"ckptavg_params": '{"a": "\\ud800"}'},
], ids=["params-not-object", "inputs-not-list", "invalid-json", "nan", "infinity", "digits", "int-past-int64",
        "deep-nesting", "nesting-past-32", "lone-surrogate"])
def test_damaged_provenance_is_none(changes: dict[str, str]) -> None:
    from ckptavg.read.sidecars import parse_provenance

    assert parse_provenance(_provenance(**changes)) is None


# ---------------------------------------------------------------- more inputs than the open-file limit


def test_thousands_of_inputs_under_ulimit_256(tmp_path: Path) -> None:
    """1500 safetensors and 300 torch files through `python -m ckptavg swa DIR` with RLIMIT_NOFILE 256."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    for i in range(1500):
        save_file({"w": torch.full((3,), float(i)), "b": torch.ones(2)}, inputs / f"c{i:05d}.safetensors")
    for i in range(300):
        (inputs / f"t{i:05d}.pt").write_bytes(torch_bytes({"w": torch.full((3,), float(i)), "b": torch.ones(2)}))
    out = tmp_path / "out.safetensors"

    def limits() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP, MEMORY_CAP))

    env = {k: v for k, v in os.environ.items() if k != "CKPTAVG_DEBUG"}
    proc = subprocess.run([sys.executable, "-m", "ckptavg", "swa", str(inputs), "-o", str(out)], capture_output=True,
                          text=True, timeout=120, preexec_fn=limits, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = load_file(out)
    expected = (sum(range(1500)) + sum(range(300))) / 1800
    assert torch.allclose(got["w"], torch.full((3,), expected)) and torch.equal(got["b"], torch.ones(2))
