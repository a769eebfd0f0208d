"""Fuzzing the files that travel with checkpoints (issue 18): a Hugging Face folder's
`model.safetensors.index.json` and `trainer_state.json`, and a DCP folder's `.metadata` pickle.

Each target writes one file of a good folder with fuzzed bytes (mutations of the real file, or JSON and
pickles edited with values of every type, huge integers, NaN, deep nesting, paths that leave the folder),
then opens the folder and loads every tensor: that works or raises a CkptavgError, within HANG_SECONDS, and
no file outside the folder is ever read (the one planted next to it holds a value no tensor of the folder has).

`python bench/fuzz.py --targets hf-index-json trainer-state-json dcp-metadata ...` runs these for longer.
"""

from __future__ import annotations

import functools
import json
import pickle
import re
import shutil
import struct
import tempfile
import warnings
from collections.abc import Callable
from contextlib import suppress
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from hostile_inputs import dcp_folder, hf_folder
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from test_fuzz import HANG_SECONDS, _interesting_ints, mutated, time_limit

from ckptavg import CkptavgError, open_checkpoint

OUTSIDE_VALUE = 666.0


def _templates(root: Path) -> dict[str, Path]:
    """The good folders each target starts from (built once per scratch folder)."""
    hf = root / "template" / "hf" / "checkpoint-10"
    if not hf.exists():
        hf_folder(hf, trainer_state={"global_step": 10, "epoch": 1.5,
                                     "log_history": [{"step": 10, "eval_loss": 0.25, "epoch": 1.5}]})
        dcp_folder(root / "template" / "dcp" / "checkpoint-5")
        save_file({"weight": torch.full((4, 3), OUTSIDE_VALUE)}, root / "template" / "outside.safetensors")
    return {"hf": hf, "dcp": root / "template" / "dcp" / "checkpoint-5"}


INDEX_SEED = json.dumps({"metadata": {"total_size": 60}, "weight_map": {
    "weight": "model-00001-of-00002.safetensors", "bias": "model-00002-of-00002.safetensors"}}).encode()
STATE_SEED = json.dumps({"global_step": 10, "epoch": 1.5, "best_metric": None,
                         "log_history": [{"step": 10, "eval_loss": 0.25, "epoch": 1.5}]}).encode()


@functools.cache
def _dcp_seed() -> bytes:
    """The template's .metadata re-pickled with protocol 2 (no frames), so that byte edits reach the opcodes."""
    folder = dcp_folder(Path(tempfile.mkdtemp(prefix="ckptavg-fuzz-seed-")) / "checkpoint-5")
    return pickle.dumps(pickle.loads((folder / ".metadata").read_bytes()), protocol=2)


# ---------------------------------------------------------------- the property


def check_folder(kind: str, file: str, data: bytes, scratch: Path) -> None:
    """Copy the `kind` template into `scratch`, write `data` as its `file`, read it every way; fail on anything
    but a CkptavgError, and on a tensor read from outside the folder."""
    templates = _templates(scratch)
    work = scratch / "work"
    shutil.rmtree(work, ignore_errors=True)
    folder = work / "run" / templates[kind].name
    shutil.copytree(templates[kind], folder)
    shutil.copy(scratch / "template" / "outside.safetensors", work / "outside.safetensors")
    (folder / file).write_bytes(data)
    with time_limit(HANG_SECONDS), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with suppress(CkptavgError):
            ckpt = open_checkpoint(folder)
            for name, t in ckpt.tensors.items():
                value = t.load()
                assert tuple(value.shape) == tuple(t.shape), name
                assert not bool((value == OUTSIDE_VALUE).any()), f"{name} was read from outside the folder"
                name.encode("utf-8")
            for number in (ckpt.meta.step, ckpt.meta.epoch, *(v for v, _ in ckpt.meta.metrics.values())):
                assert number is None or abs(number) < 2**63 and number == number, number


# ---------------------------------------------------------------- strategies


def _json_scalar() -> st.SearchStrategy[Any]:
    paths = st.sampled_from(["../outside.safetensors", "../../work/outside.safetensors", "/etc/passwd", "",
                             "model-00001-of-00002.safetensors", "./model-00002-of-00002.safetensors", "a/../b",
                             "model.safetensors.index.json", "trainer_state.json", "\x00", "w\ud800"])
    return st.one_of(_interesting_ints(100), st.floats(allow_nan=True, allow_infinity=True), st.booleans(), st.none(),
                     st.text(max_size=8), paths)


def _json_value() -> st.SearchStrategy[Any]:
    return st.recursive(_json_scalar(), lambda inner: st.lists(inner, max_size=3)
                        | st.dictionaries(st.sampled_from(["weight", "bias", "step", "eval_loss", "x"]), inner, max_size=3),
                        max_leaves=6)


@st.composite
def json_edited(draw: st.DrawFn, seed: bytes, keys: list[str]) -> bytes:
    """The seed JSON with entries replaced by values of any type, then serialised (NaN, surrogates and all);
    sometimes with a number past the digit limit or nesting past the recursion limit spliced in."""
    doc = json.loads(seed)
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.sampled_from(keys))
        if key in ("weight", "bias") and not isinstance(doc.get("weight_map"), dict):
            doc["weight_map"] = {}
        target = doc["weight_map"] if key in ("weight", "bias") else doc
        target[key] = draw(_json_value())
    raw = json.dumps(doc, ensure_ascii=draw(st.booleans())).encode("utf-8", "surrogatepass")
    splice = draw(st.sampled_from([b"", b"", b"", b"9" * 5000, b"[" * 50_000 + b"]" * 50_000, b"1e999", b"NaN"]))
    return re.sub(rb"\d+", lambda _: splice, raw, count=1) if splice else raw


@st.composite
def dcp_metadata_edited(draw: st.DrawFn) -> bytes:
    """DCP's metadata (real classes, pickled by this process) with sizes, chunks, offsets and names edited."""
    md = pickle.loads(_dcp_seed())
    entry = md.state_dict_metadata["model.weight"]
    first = entry.chunks[0]
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["size", "chunk", "offset", "length", "name", "path", "planner"]))
        ints = st.lists(_interesting_ints(64), min_size=0, max_size=3)
        if op == "size":
            entry.size = torch.Size(draw(st.lists(st.integers(0, 2**62), max_size=3)))
        elif op == "chunk":
            entry.chunks = [replace(first, sizes=torch.Size(draw(st.lists(st.integers(0, 2**40), max_size=3))))
                            for _ in range(draw(st.integers(0, 3)))]
        elif op in ("offset", "length", "path"):
            index = draw(st.sampled_from(list(md.storage_data)))
            info = md.storage_data[index]
            field = {"offset": "offset", "length": "length", "path": "relative_path"}[op]
            value = draw(_json_scalar()) if op == "path" else draw(_interesting_ints(4096))
            md.storage_data[index] = replace(info, **{field: value})
        elif op == "name":
            name = draw(st.sampled_from(["__metadata__", "model.b\ud800", "model", "model.weight.x", "", "a.b"]))
            md.state_dict_metadata[name] = md.state_dict_metadata.pop(draw(st.sampled_from(list(md.state_dict_metadata))))
        elif op == "planner":
            md.planner_data = {k: tuple(draw(ints)) for k in md.planner_data}
    return pickle.dumps(md, protocol=2)


@st.composite
def dcp_metadata_bytes(draw: st.DrawFn) -> bytes:
    """The metadata pickle after byte edits, and with memo opcodes and lengths of any size spliced in."""
    data = bytearray(draw(mutated(_dcp_seed())))
    if draw(st.booleans()):
        opcode = draw(st.sampled_from([b"r", b"j", b"X", b"\x8b", b"\x8e", b"B"]))
        width = 8 if opcode == b"\x8e" else 4
        value = draw(_interesting_ints(len(data))) % 2**(8 * width)
        at = draw(st.integers(min(2, len(data)), len(data)))
        data[at:at] = b"]" + opcode + value.to_bytes(width, "little")
    return bytes(data)


def _file_check(kind: str, file: str) -> Callable[[bytes, Path], None]:
    return lambda data, scratch: check_folder(kind, file, data, scratch)


# name: (strategy, check(data, scratch folder)); shared with bench/fuzz.py
FOLDER_TARGETS: dict[str, tuple[Callable[[], st.SearchStrategy[bytes]], Callable[[bytes, Path], None]]] = {
    "hf-index-json": (lambda: st.one_of(json_edited(INDEX_SEED, ["weight", "bias", "weight_map", "metadata"]),
                                        mutated(INDEX_SEED)),
                      _file_check("hf", "model.safetensors.index.json")),
    "trainer-state-json": (lambda: st.one_of(json_edited(STATE_SEED, ["global_step", "epoch", "log_history"]),
                                             mutated(STATE_SEED)),
                           _file_check("hf", "trainer_state.json")),
    "dcp-metadata": (lambda: st.one_of(dcp_metadata_edited(), dcp_metadata_bytes()), _file_check("dcp", ".metadata")),
}
EXAMPLES = {"hf-index-json": 120, "trainer-state-json": 120, "dcp-metadata": 120}


def test_templates_read(tmp_path: Path) -> None:
    templates = _templates(tmp_path)
    assert open_checkpoint(templates["hf"]).meta.step == 10
    assert open_checkpoint(templates["dcp"]).meta.step == 5
    check_folder("dcp", ".metadata", _dcp_seed(), tmp_path)  # the re-pickled seed reads too
    assert struct.unpack("<B", _dcp_seed()[1:2])[0] == 2


@pytest.mark.parametrize("target", list(FOLDER_TARGETS))
def test_fuzz_folder(target: str, tmp_path: Path) -> None:
    strategy, check = FOLDER_TARGETS[target]

    @settings(max_examples=EXAMPLES[target], deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture])
    @given(strategy())
    def run(data: bytes) -> None:
        check(data, tmp_path)

    run()
