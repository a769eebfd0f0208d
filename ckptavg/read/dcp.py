"""PyTorch Distributed Checkpoint (DCP) folders, read lazily and without a process group.

`torch.distributed.checkpoint.save` writes a folder: `.metadata`, a pickle of DCP's `Metadata`, and
`*.distcp` data files. The metadata lists every entry of the flattened state dict (`model.fc.weight`,
`optim.state.0.exp_avg`, `step`): tensors with their dtype, full size and chunks (the block each rank
saved), and non-tensor values. Its `storage_data` says where each chunk lies: file, offset and length.
A chunk is a small `torch.save` archive (the default), or, with `SerializationFormat.SAFETENSORS`, an entry
of a safetensors blob that starts at the recorded offset.

`.metadata` is unpickled by an allow-list: DCP's metadata classes are rebuilt as plain stand-ins, so no
torch.distributed code runs and nothing outside the list can be constructed.
"""

from __future__ import annotations

import functools
import io
import math
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeGuard

import torch

from ..errors import CheckpointFormatError
from ..layout import SAFETENSORS_DTYPES
from .checkpoint import Checkpoint, LoadOptions
from .dcp_metadata import corrupt, read_metadata
from .lazy import LazyTensor, read_exact
from .locate import locate_weights, select_prefix
from .metadata import meta_from_mapping, meta_from_name
from .safetensors_file import MAX_HEADER_BYTES, read_json_header

METADATA = ".metadata"
RANK_METADATA = "__0.metadata"  # rank-local metadata, written by dcp.save(..., use_collectives=False)
ZIP_MAGIC = b"PK\x03\x04"
# Subtrees that torchtitan keeps next to top-level model weights; never weights themselves.
TRAINING_ENTRIES = (
    "optimizer", "optim", "optimizers", "optimizer_state_dict", "lr_scheduler", "lr_schedulers",
    "scheduler", "dataloader", "train_state",
)
# Non-tensor entries larger than this are not decoded when looking for step and epoch.
MAX_SCALAR_BYTES = 1 << 20

Where = tuple[str, tuple[int, ...] | None]  # (fqn, chunk offsets) as in DCP's MetadataIndex; None for bytes


def is_dcp_folder(path: Path) -> bool:
    """True for a folder written by `torch.distributed.checkpoint.save` (it holds a `.metadata` file)."""
    return (path / METADATA).is_file() or (path / RANK_METADATA).is_file()


# ---------------------------------------------------------------- safe unpickling of .metadata


# ---------------------------------------------------------------- what is stored where


@dataclass(frozen=True)
class Stored:
    """Where one saved item lies: data file, byte offset and length, and DCP stream transforms (none by default)."""

    file: Path
    offset: int
    length: int
    transforms: tuple[str, ...] = ()


@dataclass(frozen=True)
class Chunk:
    """One block of a tensor (as one rank saved it): its start and sizes in the full tensor, and its bytes."""

    start: tuple[int, ...]
    sizes: tuple[int, ...]
    stored: Stored


@dataclass(frozen=True)
class BytesEntry:
    """A non-tensor entry (step counter, hyper-parameter): a `torch.save` archive of the value."""

    stored: Stored


def _all_ints(value: Any) -> TypeGuard[list[int] | tuple[int, ...]]:
    return isinstance(value, tuple | list) and all(type(v) is int and v >= 0 for v in value)


def _ints(path: Path, value: Any, what: str) -> tuple[int, ...]:
    if not _all_ints(value):
        raise corrupt(path, f"bad {what} {value!r}")
    return tuple(value)


def _storage(folder: Path, meta_path: Path, md: Any) -> dict[Where, Stored]:
    """Map (fqn, chunk offsets) to where the item lies, checking that every data file is there and long enough."""
    data = getattr(md, "storage_data", None)
    if not isinstance(data, dict):
        raise corrupt(meta_path, "no storage_data")
    sizes: dict[str, int] = {}
    found: dict[Where, Stored] = {}
    for index, info in data.items():
        fqn, offsets = getattr(index, "fqn", None), getattr(index, "offset", None)
        rel = getattr(info, "relative_path", None)
        at, length = getattr(info, "offset", None), getattr(info, "length", None)
        transforms = getattr(info, "transform_descriptors", None) or ()
        if (
            not isinstance(fqn, str) or not isinstance(rel, str) or type(at) is not int or type(length) is not int
            or not isinstance(transforms, list | tuple)
        ):
            raise corrupt(meta_path, f"bad storage entry for {getattr(index, 'fqn', '?')!r}")
        if rel in ("", ".", "..") or os.path.basename(rel) != rel or at < 0 or length < 0:
            raise corrupt(meta_path, f"'{fqn}' points outside the folder ({rel!r})")
        if rel not in sizes:
            if not (folder / rel).is_file():
                raise CheckpointFormatError(
                    f"{folder}: data file '{rel}' (holding '{fqn}') is missing; copy the whole checkpoint folder."
                )
            sizes[rel] = (folder / rel).stat().st_size
        if at + length > sizes[rel]:
            raise CheckpointFormatError(
                f"{folder / rel}: file is truncated ('{fqn}' needs bytes {at}-{at + length}, the file has "
                f"{sizes[rel]}); re-copy the checkpoint."
            )
        key = None if offsets is None else _ints(meta_path, offsets, f"offsets of '{fqn}'")
        found[(fqn, key)] = Stored(folder / rel, at, length, tuple(map(str, transforms)))
    return found


def _entries(meta_path: Path, md: Any, where: dict[Where, Stored]) -> dict[str, DcpTensor | BytesEntry]:
    entries = getattr(md, "state_dict_metadata", None)
    if not isinstance(entries, dict):
        raise corrupt(meta_path, "no state_dict_metadata")
    out: dict[str, DcpTensor | BytesEntry] = {}
    for fqn, entry in entries.items():
        kind = getattr(type(entry), "dcp_name", type(entry).__name__)  # stand-ins, or the real classes (--trust-pickle)
        if kind == "BytesStorageMetadata" and (fqn, None) in where:
            out[fqn] = BytesEntry(where[(fqn, None)])
        elif kind == "TensorStorageMetadata":
            out[fqn] = _tensor(meta_path, fqn, entry, where)
        else:
            raise CheckpointFormatError(
                f"{meta_path}: entry '{fqn}' is a {kind} without stored data, which ckptavg cannot read; "
                "save the state dict with the default DCP planner."
            )
    return out


def _tensor(meta_path: Path, fqn: str, entry: Any, where: dict[Where, Stored]) -> DcpTensor:
    props = getattr(entry, "properties", None)
    dtype, layout = getattr(props, "dtype", None), str(getattr(props, "layout", "torch.strided"))
    if not isinstance(dtype, torch.dtype):
        raise corrupt(meta_path, f"'{fqn}' has no dtype")
    if layout != "torch.strided":
        raise CheckpointFormatError(f"{meta_path}: '{fqn}' is a {layout} tensor; only dense tensors are supported.")
    shape = _ints(meta_path, getattr(entry, "size", None), f"size of '{fqn}'")
    chunks = []
    for c in getattr(entry, "chunks", None) or ():
        start = _ints(meta_path, getattr(c, "offsets", None), f"chunk offsets of '{fqn}'")
        sizes = _ints(meta_path, getattr(c, "sizes", None), f"chunk sizes of '{fqn}'")
        if len(start) != len(shape) or len(sizes) != len(shape) or any(
            o + n > s for o, n, s in zip(start, sizes, shape, strict=True)
        ):
            raise corrupt(meta_path, f"a chunk of '{fqn}' at {list(start)} lies outside its shape {list(shape)}")
        if (fqn, start) not in where:
            raise corrupt(meta_path, f"no stored data for the chunk of '{fqn}' at {list(start)}")
        chunks.append(Chunk(start, sizes, where[(fqn, start)]))
    covered, numel = sum(math.prod(c.sizes) for c in chunks), math.prod(shape)
    if covered != numel:
        raise CheckpointFormatError(
            f"{meta_path}: the chunks of '{fqn}' hold {covered} of its {numel} elements; the checkpoint is "
            "incomplete (saved by several ranks with one rank's part missing?)."
        )
    home = chunks[0].stored.file if chunks else meta_path
    return DcpTensor(home, dtype, shape, key=fqn, chunks=tuple(chunks))


# ---------------------------------------------------------------- reading tensors


@dataclass
class DcpTensor(LazyTensor):
    """A tensor of a DCP folder; `load()` decodes its chunks and assembles them into the full tensor."""

    key: str = ""
    chunks: tuple[Chunk, ...] = ()

    @property
    def streamable(self) -> bool:
        """False: chunks are archives (or blocks of a larger tensor), not one byte range of a file."""
        return False

    def load(self) -> torch.Tensor:
        """Read and assemble the whole tensor into a new CPU tensor."""
        if self.numel == 0:
            return torch.empty(self.shape, dtype=self.dtype)
        if len(self.chunks) == 1 and self.chunks[0].sizes == self.shape:
            return read_chunk(self.chunks[0], self.key, self.dtype)  # the usual case: no copy
        blocks = ((c.start, read_chunk(c, self.key, self.dtype)) for c in self.chunks)
        return assemble(f"{self.path.parent}: '{self.key}'", self.shape, self.dtype, blocks)


def assemble(
    label: str, shape: tuple[int, ...], dtype: torch.dtype, blocks: Iterable[tuple[tuple[int, ...], torch.Tensor]]
) -> torch.Tensor:
    """Build a tensor of `shape` from (start, block) pairs; every element must come from exactly one block."""
    out = torch.empty(shape, dtype=dtype)
    filled = torch.zeros(shape, dtype=torch.bool)  # catches overlaps and gaps that the metadata check cannot
    for start, block in blocks:
        if len(start) != len(shape) or block.dim() != len(shape) or any(
            o + n > s for o, n, s in zip(start, block.shape, shape, strict=True)
        ):
            raise CheckpointFormatError(f"{label}: a chunk of shape {list(block.shape)} at {list(start)} does not fit {list(shape)}.")
        region = tuple(slice(o, o + n) for o, n in zip(start, block.shape, strict=True))
        if bool(filled[region].any()):
            raise CheckpointFormatError(f"{label}: chunks overlap at {list(start)}; the checkpoint metadata is inconsistent.")
        out[region] = block
        filled[region] = True
    if not bool(filled.all()):
        raise CheckpointFormatError(f"{label}: the chunks leave part of the tensor unwritten; the checkpoint is incomplete.")
    return out


def read_chunk(chunk: Chunk, key: str, dtype: torch.dtype) -> torch.Tensor:
    """Read one chunk's bytes with pread and decode them (torch.save archive or safetensors blob)."""
    s = chunk.stored
    if s.transforms:
        raise CheckpointFormatError(
            f"{s.file}: '{key}' is stored through {', '.join(s.transforms)} (a DCP storage extension, such as "
            "compression), which ckptavg cannot read; save the checkpoint without extensions."
        )
    if math.prod(chunk.sizes) == 0:
        return torch.empty(chunk.sizes, dtype=dtype)
    try:
        size = s.file.stat().st_size
        # 8 bytes even when `length` is shorter: with safetensors serialization `length` counts only the
        # tensor's data, and `offset` points at the blob's 8-byte header length
        head = bytearray(max(0, min(8, size - s.offset)))
        read_exact(s.file, s.offset, head)
        if head[:4] == ZIP_MAGIC:
            t = _from_archive(s, key)
        elif len(head) == 8 and (n := struct.unpack("<Q", head)[0]) <= min(MAX_HEADER_BYTES, size - s.offset - 8):
            t = _from_safetensors(s, key, n)
        else:
            raise CheckpointFormatError(
                f"{s.file}: '{key}' at offset {s.offset} is neither a torch.save archive nor safetensors data; "
                "the file is corrupt, re-copy the checkpoint."
            )
    except OSError as e:
        raise CheckpointFormatError(f"{s.file}: cannot read ({e.strerror}).") from None
    if t.dtype != dtype or tuple(t.shape) != chunk.sizes:
        raise CheckpointFormatError(
            f"{s.file}: '{key}' at offset {s.offset} holds {t.dtype} {list(t.shape)} but .metadata says "
            f"{dtype} {list(chunk.sizes)}; data and metadata disagree (files of different saves?), re-save the checkpoint."
        )
    return t


def _from_archive(s: Stored, key: str) -> torch.Tensor:
    buf = bytearray(s.length)
    read_exact(s.file, s.offset, buf)
    try:
        t = torch.load(io.BytesIO(buf), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch's loader raises many types on corrupt bytes
        raise CheckpointFormatError(
            f"{s.file}: '{key}' at offset {s.offset} cannot be decoded ({type(e).__name__}); the file is corrupt, "
            "re-copy the checkpoint."
        ) from None
    if not isinstance(t, torch.Tensor) or t.layout != torch.strided:
        raise CheckpointFormatError(f"{s.file}: '{key}' at offset {s.offset} is not a dense tensor.")
    return t.contiguous()


def _from_safetensors(s: Stored, key: str, header_size: int) -> torch.Tensor:
    st = s.file.stat()
    header = _blob_header(s.file, s.offset, header_size, (st.st_size, st.st_mtime_ns))
    entry = header.get(key)
    entry = entry if isinstance(entry, dict) else {}
    name, shape, offs = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    dtype = SAFETENSORS_DTYPES.get(name) if isinstance(name, str) else None
    if (
        dtype is None or not _all_ints(shape) or not _all_ints(offs) or len(offs) != 2
        or offs[1] - offs[0] != math.prod(shape) * dtype.itemsize
    ):
        raise CheckpointFormatError(
            f"{s.file}: the safetensors data at offset {s.offset} has no readable entry '{key}'; the file is corrupt."
        )
    buf = bytearray(offs[1] - offs[0])
    read_exact(s.file, s.offset + 8 + header_size + offs[0], buf)
    return torch.frombuffer(buf, dtype=dtype).view(shape)


@functools.lru_cache(maxsize=8)
def _blob_header(file: Path, offset: int, n: int, stamp: tuple[int, int]) -> dict[str, Any]:
    """The JSON header (`n` bytes) of the safetensors blob at `offset`; cached, since all its chunks share it.
    `stamp` (size, mtime) keeps a rewritten file from being served an old header."""
    return read_json_header(file, offset, n, f"safetensors header at offset {offset}")


# ---------------------------------------------------------------- the checkpoint


def open_dcp_folder(path: Path, options: LoadOptions) -> Checkpoint:
    """Open a DCP folder lazily: parse `.metadata` and check its data files; no tensor data is read."""

    meta_path = path / METADATA
    if not meta_path.is_file():
        raise CheckpointFormatError(
            f"{path}: has only rank-local metadata ({RANK_METADATA}: saved with use_collectives=False), "
            "which ckptavg cannot combine; save with use_collectives=True (the default)."
        )
    md = read_metadata(meta_path, options.trust_pickle)
    entries = _entries(meta_path, md, _storage(path, meta_path, md))
    tree = _nest(entries, getattr(md, "planner_data", None))
    tensors, location, others = _locate(path, tree, entries, options.key)
    meta = meta_from_mapping(_scalars(tree, options.trust_pickle), "DCP checkpoint", path)
    if isinstance(tree.get("train_state"), dict):  # torchtitan keeps the step there
        meta = meta.fill(meta_from_mapping(_scalars(tree["train_state"], options.trust_pickle), "DCP 'train_state'", path))
    version = getattr(md, "version", None)
    return Checkpoint(
        path, "dcp", tensors, location, meta.fill(meta_from_name(path.name, folder=True)),
        file_metadata={"dcp_version": version} if isinstance(version, str) else {}, other_entries=others,
    )


def _nest(entries: dict[str, Any], planner_data: Any) -> dict[str, Any]:
    """Rebuild the saved nesting from the planner's key paths, so that `model`, `optim` and top-level
    weights (torchtitan) are told apart as in a torch file; dotted names are split when there are none."""
    tree: dict[str, Any] = {}
    for fqn, value in entries.items():
        parts = planner_data.get(fqn) if isinstance(planner_data, dict) else None
        if not isinstance(parts, tuple | list) or ".".join(map(str, parts)) != fqn:
            parts = fqn.split(".")
        node = tree
        for part in map(str, parts[:-1]):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                return dict(entries)  # a name is both a value and a prefix: keep the flat names
        if str(parts[-1]) in node:
            return dict(entries)
        node[str(parts[-1])] = value
    return tree


def _locate(path: Path, tree: dict[str, Any], entries: dict[str, Any], key: str | None) -> tuple[dict[str, LazyTensor], str, list[str]]:
    if key is not None:  # a dotted prefix of the saved names, as for safetensors
        stored = {k: v for k, v in entries.items() if isinstance(v, DcpTensor)}
        tensors: dict[str, LazyTensor] = select_prefix(path, stored, key, list(tree))
        return tensors, key, [k for k in tree if k != key.split(".")[0]]
    training = [k for k, v in tree.items() if k in TRAINING_ENTRIES and isinstance(v, dict)]
    tensors, location, others = locate_weights(path, {k: v for k, v in tree.items() if k not in training}, None)
    return tensors, location, others + training


def _scalars(node: dict[str, Any], trust_pickle: bool) -> dict[str, Any]:
    """One level's values, non-tensor entries decoded when small; tensors stay lazy (weights are not read)."""
    return {k: _decode(v, trust_pickle) if isinstance(v, BytesEntry) else v for k, v in node.items() if not isinstance(v, dict)}


def _decode(entry: BytesEntry, trust_pickle: bool) -> Any:
    """The value of a small non-tensor entry, or None: it only feeds step/epoch/metrics, which are optional."""
    s = entry.stored
    if s.transforms or s.length > MAX_SCALAR_BYTES:
        return None
    buf = bytearray(s.length)
    try:
        read_exact(s.file, s.offset, buf)
        return torch.load(io.BytesIO(buf), map_location="cpu", weights_only=not trust_pickle)
    except Exception:  # noqa: BLE001 - an unreadable counter costs only its step, not the weights
        return None
