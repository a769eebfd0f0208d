"""Builders of crafted inputs for tests/test_hostile2.py and the fuzz targets (issue 18): pickles with
deep nesting, shared references, memo bombs and huge integers, inside torch archives and legacy files;
DCP folders with edited metadata; Hugging Face folders with hostile sidecar JSON.

Every builder writes small files (a few KiB): a case that makes ckptavg use much more time or memory than
the file's size justifies is a failure of ckptavg, not of the test.
"""

from __future__ import annotations

import io
import json
import pickle
import pickletools
import struct
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

SENTINEL = "SENTINEL-0123456789"
_SENTINEL_OP = b"X" + struct.pack("<I", len(SENTINEL)) + SENTINEL.encode()


def torch_bytes(obj: Any, legacy: bool = False) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf, _use_new_zipfile_serialization=not legacy)
    return buf.getvalue()


def weights(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"weight": torch.randn(4, 3, generator=g), "bias": torch.randn(3, generator=g)}


# ---------------------------------------------------------------- pickle opcodes


def unicode_op(text: str) -> bytes:
    raw = text.encode("utf-8", "surrogatepass")
    return b"X" + struct.pack("<I", len(raw)) + raw


def deep_lists(depth: int) -> bytes:
    """[[[...]]] nested `depth` deep: EMPTY_LIST pushed `depth` times, then APPENDed into each other."""
    return b"]" * depth + b"a" * (depth - 1)


def deep_dicts(depth: int, leaf: bytes) -> bytes:
    """{"k": {"k": ... leaf}} nested `depth` deep (leaf: the opcodes pushing the innermost value)."""
    return (b"}" + unicode_op("k")) * depth + leaf + b"s" * depth


def shared_lists(depth: int, memo: int) -> bytes:
    """L0 = [], L(i+1) = [Li, Li]: a DAG of `depth` levels that is a tree of 2**depth leaves. Every level
    stays on the stack above a MARK, appended at the end: the value is the list [L0, ..., L(depth)]. `memo`: a free memo index."""
    put, get = b"r" + struct.pack("<I", memo), b"j" + struct.pack("<I", memo)
    return b"](]" + (put + b"](" + get * 2 + b"e") * depth + b"e"


def shared_dicts(depth: int, memo: int, leaf: bytes) -> bytes:
    """D0 = leaf, D(i+1) = {"a": Di, "b": Di}, as {"l0": D0, ..., "l<depth>": D(depth)}: with a tensor as
    leaf, 2**depth dotted names."""
    put, get = b"r" + struct.pack("<I", memo), b"j" + struct.pack("<I", memo)
    levels = b"".join(put + unicode_op(f"l{i + 1}") + b"}(" + unicode_op("a") + get + unicode_op("b") + get + b"u"
                      for i in range(depth))
    return b"}(" + unicode_op("l0") + leaf + levels + b"u"


def memo_put(index: int) -> bytes:
    """An empty list memoised at `index` with LONG_BINPUT: the C unpickler sizes its memo array to it."""
    return b"]r" + struct.pack("<I", index)


def memo_put_text(index: int) -> bytes:
    """The same with the text PUT opcode, whose index has no width limit."""
    return b"]p" + str(index).encode() + b"\n"


def huge_int_text(digits: int) -> bytes:
    """INT as decimal text, longer than Python's int() digit limit (4300)."""
    return b"I" + b"7" * digits + b"\n"


def huge_int_binary(nbytes: int) -> bytes:
    """LONG4: a binary integer of `nbytes` bytes (no digit limit when read; str() of it fails)."""
    return b"\x8b" + struct.pack("<I", nbytes) + b"\x01" * nbytes


def free_memo_index(pickled: bytes) -> int:
    """One past the largest memo index the pickle uses."""
    return 1 + max((arg for op, arg, _ in pickletools.genops(pickled) if op.name.endswith("PUT") and isinstance(arg, int)),
                   default=-1)


class _TensorMark:
    pass


class _Probe(pickle._Unpickler):  # type: ignore[name-defined,misc]
    """Python's unpickler with every global a stub: to see which memo entry holds a tensor."""

    def find_class(self, module: str, name: str) -> Any:
        if name == "_rebuild_tensor_v2":
            return lambda *args: _TensorMark()
        return lambda *args, **kwargs: {}

    def persistent_load(self, pid: Any) -> Any:
        return None


def tensor_memo_index(pickled: bytes) -> int:
    """The memo index of the first tensor of a torch pickle."""
    probe = _Probe(io.BytesIO(pickled))
    probe.load()
    return min(i for i, v in probe.memo.items() if isinstance(v, _TensorMark))


def get_op(index: int) -> bytes:
    return b"j" + struct.pack("<I", index)


# ---------------------------------------------------------------- torch files with a crafted value


def archive_records(archive: bytes) -> list[tuple[str, bytes]]:
    with zipfile.ZipFile(io.BytesIO(archive)) as z:
        out = [(i.filename.split("/", 1)[1], z.read(i)) for i in z.infolist()]
    return [(n, b) for n, b in out if n not in ("version", ".data/serialization_id")]


def repack(records: list[tuple[str, bytes]]) -> bytes:
    """A torch archive written by torch's own zip writer (aligned records, right CRCs)."""
    buf = io.BytesIO()
    writer = torch._C.PyTorchFileWriter(buf)
    for name, payload in records:
        writer.write_record(name, payload, len(payload))
    writer.write_end_of_file()
    del writer
    return buf.getvalue()


def with_value(ops: Callable[[bytes], bytes] | bytes, legacy: bool = False, key: str = "x",
               top: dict[str, Any] | None = None) -> bytes:
    """A checkpoint {**top, key: <crafted>} (top: the weights by default) whose value at `key` is pushed by
    `ops`; a callable gets the pickle and returns the opcodes (to refer to a tensor by its memo index)."""
    base = torch_bytes({**(weights() if top is None else top), key: SENTINEL}, legacy=legacy)
    if legacy:
        crafted = ops(_legacy_main_pickle(base)) if callable(ops) else ops
        assert base.count(_SENTINEL_OP) == 1
        return base.replace(_SENTINEL_OP, crafted)
    records = archive_records(base)
    out = []
    for name, payload in records:
        if name == "data.pkl":
            crafted = ops(payload) if callable(ops) else ops
            assert payload.count(_SENTINEL_OP) == 1
            payload = payload.replace(_SENTINEL_OP, crafted)
        out.append((name, payload))
    return repack(out)


def _legacy_main_pickle(data: bytes) -> bytes:
    """The object pickle of a legacy torch file: after the magic number, protocol and system info pickles."""
    f = io.BytesIO(data)
    for _ in range(3):
        for _op in pickletools.genops(f):
            pass
    return data[f.tell():]


def tensor_ref(build: Callable[[bytes, int], bytes]) -> Callable[[bytes], bytes]:
    """`build(tensor, memo)`: `tensor` the opcodes that push the checkpoint's first tensor (a shared reference
    to it), `memo` a free memo index."""
    return lambda pickled: build(get_op(tensor_memo_index(pickled)), free_memo_index(pickled))


def free_memo(build: Callable[[int], bytes]) -> Callable[[bytes], bytes]:
    """`build(memo)` with a memo index the pickle does not use yet."""
    return lambda pickled: build(free_memo_index(pickled))


def edit_pickle(archive: bytes, edit: Callable[[bytes], bytes]) -> bytes:
    """The archive with its data.pkl replaced by `edit(data.pkl)`."""
    return repack([(n, edit(p) if n == "data.pkl" else p) for n, p in archive_records(archive)])


def central_offset(archive: bytes, name: str) -> tuple[int, int]:
    """Where `name`'s central directory entry starts, and the local header offset it holds."""
    at = archive.find(b"PK\x01\x02")
    while at >= 0:
        name_len = struct.unpack_from("<H", archive, at + 28)[0]
        if archive[at + 46: at + 46 + name_len].decode().endswith(name):
            return at, struct.unpack_from("<I", archive, at + 42)[0]
        at = archive.find(b"PK\x01\x02", at + 4)
    raise AssertionError(f"{name} not in archive")


def record_aliased(archive: bytes, victim: str, source: str) -> bytes:
    """The archive with `victim`'s central directory entry pointing at `source`'s local header and bytes."""
    data = bytearray(archive)
    at, _ = central_offset(archive, victim)
    _, offset = central_offset(archive, source)
    struct.pack_into("<I", data, at + 42, offset)
    return bytes(data)


# ---------------------------------------------------------------- sidecar folders


def hf_folder(folder: Path, index: Any = None, trainer_state: Any = None, raw_index: bytes | None = None,
              raw_state: bytes | None = None) -> Path:
    """A sharded Hugging Face folder: two shards, an index (given, or the right one), a trainer_state.json."""
    folder.mkdir(parents=True)
    w = weights(1)
    save_file({"weight": w["weight"]}, folder / "model-00001-of-00002.safetensors")
    save_file({"bias": w["bias"]}, folder / "model-00002-of-00002.safetensors")
    good = {"metadata": {"total_size": 60}, "weight_map": {"weight": "model-00001-of-00002.safetensors",
                                                           "bias": "model-00002-of-00002.safetensors"}}
    index_bytes = raw_index if raw_index is not None else json.dumps(good if index is None else index).encode()
    (folder / "model.safetensors.index.json").write_bytes(index_bytes)
    if raw_state is not None:
        (folder / "trainer_state.json").write_bytes(raw_state)
    elif trainer_state is not None:
        (folder / "trainer_state.json").write_text(json.dumps(trainer_state))
    return folder


def deep_json(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


# ---------------------------------------------------------------- DCP folders


def dcp_folder(folder: Path, state: dict[str, Any] | None = None) -> Path:
    from torch.distributed.checkpoint.filesystem import FileSystemWriter
    from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp_save(state if state is not None else {"model": weights(2), "step": 5},
                 storage_writer=FileSystemWriter(folder))
    return folder


def edit_dcp_metadata(folder: Path, change: Callable[[Any], None]) -> None:
    md = pickle.loads((folder / ".metadata").read_bytes())
    change(md)
    (folder / ".metadata").write_bytes(pickle.dumps(md))
