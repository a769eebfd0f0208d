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

import io
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeGuard

import torch

from ..errors import CheckpointFormatError, CkptavgWarning, listing, one_line
from .checkpoint import Checkpoint, LoadOptions, Stamp, stamp
from .dcp_chunks import BytesEntry, Chunk, DcpTensor, Stored, all_ints
from .dcp_chunks import assemble as assemble  # re-exported: tests build tensors from blocks with it
from .dcp_metadata import corrupt, read_metadata
from .lazy import MAX_INT64, LazyTensor, read_exact
from .locate import locate_weights, select_prefix
from .metadata import meta_from_mapping, meta_from_name

METADATA = ".metadata"
PROVENANCE = "ckptavg.json"  # what ckptavg writes beside a DCP output's .metadata: its provenance
RANK_METADATA = "__0.metadata"  # rank-local metadata, written by dcp.save(..., use_collectives=False)
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


def _ints(path: Path, value: Any, what: str) -> tuple[int, ...]:
    if not all_ints(value):
        raise corrupt(path, f"bad {what} {_show(value)}")
    count = 1
    for v in value:
        count *= max(v, 1)
    if count > MAX_INT64:
        raise corrupt(path, f"{what} {_show(value)} is too large for a tensor")
    return tuple(value)


def _show(value: Any) -> str:
    """`value` for a message, short; repr fails on integers past Python's digit limit."""
    try:
        return one_line(value, 80)
    except ValueError:
        return f"<a {type(value).__name__} too large to show>"


def _q(fqn: str) -> str:
    return one_line(fqn, 120)


def _storage(folder: Path, meta_path: Path, md: Any, stamps: dict[Path, Stamp]) -> dict[Where, Stored]:
    """Map (fqn, chunk offsets) to where the item lies, checking that every data file is there and long enough;
    each data file's stamp goes to `stamps`."""
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
            raise corrupt(meta_path, f"bad storage entry for {_show(getattr(index, 'fqn', '?'))}")
        if rel in ("", ".", "..") or os.path.basename(rel) != rel or "\0" in rel or at < 0 or length < 0:
            raise corrupt(meta_path, f"'{_q(fqn)}' points outside the folder ({_show(rel)})")
        if rel not in sizes:
            if not (folder / rel).is_file():
                raise CheckpointFormatError(
                    f"{folder}: data file '{one_line(rel, 120)}' (holding '{_q(fqn)}') is missing; copy the whole "
                    "checkpoint folder."
                )
            stamps[folder / rel] = stamp(folder / rel)
            sizes[rel] = stamps[folder / rel][0]
        if at + length > sizes[rel]:
            raise CheckpointFormatError(
                f"{folder / rel}: file is truncated ('{_q(fqn)}' needs bytes {at}-{at + length}, the file has "
                f"{sizes[rel]}); re-copy the checkpoint."
            )
        key = None if offsets is None else _ints(meta_path, offsets, f"offsets of '{_q(fqn)}'")
        found[(fqn, key)] = Stored(folder / rel, at, length, tuple(map(str, transforms)))
    return found


def _entries(meta_path: Path, md: Any, where: dict[Where, Stored]) -> dict[str, DcpTensor | BytesEntry]:
    entries = getattr(md, "state_dict_metadata", None)
    if not isinstance(entries, dict):
        raise corrupt(meta_path, "no state_dict_metadata")
    out: dict[str, DcpTensor | BytesEntry] = {}
    claimed = 0
    for fqn, entry in entries.items():
        if not isinstance(fqn, str):
            raise corrupt(meta_path, f"an entry is named {_show(fqn)}, not a string")
        kind = getattr(type(entry), "dcp_name", type(entry).__name__)  # stand-ins, or the real classes (--trust-pickle)
        if kind == "BytesStorageMetadata" and (fqn, None) in where:
            out[fqn] = BytesEntry(where[(fqn, None)])
        elif kind == "TensorStorageMetadata":
            tensor = out[fqn] = _tensor(meta_path, fqn, entry, where)
            claimed += tensor.nbytes
        else:
            raise CheckpointFormatError(
                f"{meta_path}: entry '{_q(fqn)}' is a {one_line(kind, 60)} without stored data, which ckptavg "
                "cannot read; save the state dict with the default DCP planner."
            )
    # Each chunk's bytes fit in its own stored range (see _tensor), but chunks may name the same range: the
    # tensors together must still fit in the data files, or assembling them would allocate what no file holds.
    held = sum({s.file: s.file.stat().st_size for s in where.values()}.values())
    if claimed > held:
        raise corrupt(meta_path, f"its tensors claim {claimed} bytes, but the data files hold {held}")
    return out


def _tensor(meta_path: Path, fqn: str, entry: Any, where: dict[Where, Stored]) -> DcpTensor:
    props = getattr(entry, "properties", None)
    dtype, layout = getattr(props, "dtype", None), str(getattr(props, "layout", "torch.strided"))
    if not isinstance(dtype, torch.dtype):
        raise corrupt(meta_path, f"'{_q(fqn)}' has no dtype")
    if layout != "torch.strided":
        raise CheckpointFormatError(
            f"{meta_path}: '{_q(fqn)}' is a {one_line(layout, 40)} tensor; only dense tensors are supported."
        )
    shape = _ints(meta_path, getattr(entry, "size", None), f"size of '{_q(fqn)}'")
    chunks = []
    for c in getattr(entry, "chunks", None) or ():
        start = _ints(meta_path, getattr(c, "offsets", None), f"chunk offsets of '{_q(fqn)}'")
        sizes = _ints(meta_path, getattr(c, "sizes", None), f"chunk sizes of '{_q(fqn)}'")
        if len(start) != len(shape) or len(sizes) != len(shape) or any(
            o + n > s for o, n, s in zip(start, sizes, shape, strict=True)
        ):
            raise corrupt(meta_path, f"a chunk of '{_q(fqn)}' at {_show(start)} lies outside its shape {_show(shape)}")
        stored = where.get((fqn, start))
        if stored is None:
            raise corrupt(meta_path, f"no stored data for the chunk of '{_q(fqn)}' at {_show(start)}")
        if math.prod(sizes) * dtype.itemsize > stored.length:  # checked before anything is allocated for it
            raise corrupt(
                meta_path, f"the chunk of '{_q(fqn)}' at {_show(start)} claims {math.prod(sizes) * dtype.itemsize} "
                f"bytes, but its stored data is {stored.length} bytes long"
            )
        chunks.append(Chunk(start, sizes, stored))
    covered, numel = sum(math.prod(c.sizes) for c in chunks), math.prod(shape)
    if covered != numel:
        raise CheckpointFormatError(
            f"{meta_path}: the chunks of '{_q(fqn)}' hold {covered} of its {numel} elements; the checkpoint is "
            "incomplete (saved by several ranks with one rank's part missing?)."
        )
    home = chunks[0].stored.file if chunks else meta_path
    return DcpTensor(home, dtype, shape, key=fqn, chunks=tuple(chunks))


# ---------------------------------------------------------------- the checkpoint


def open_dcp_folder(path: Path, options: LoadOptions) -> Checkpoint:
    """Open a DCP folder lazily: parse `.metadata` and check its data files; no tensor data is read."""

    meta_path = path / METADATA
    if not meta_path.is_file():
        raise CheckpointFormatError(
            f"{path}: has only rank-local metadata ({RANK_METADATA}: saved with use_collectives=False), "
            "which ckptavg cannot combine; save with use_collectives=True (the default)."
        )
    stamps = {meta_path: stamp(meta_path)}
    entries, md = dcp_entries(path, options.trust_pickle, stamps)
    tree = _nest(entries, getattr(md, "planner_data", None))
    tensors, location, others = _locate(path, tree, entries, options.key)
    extra = extra_state_entries(entries, options.key)
    if extra:  # noted once per run, for all checkpoints (`extra_state_note`)
        others = others + [f"{len(extra)} _extra_state entries (bytes, not averaged; a DCP output carries the newest's)"]
    meta = meta_from_mapping(_scalars(tree, options.trust_pickle), "DCP checkpoint", path)
    if isinstance(tree.get("train_state"), dict):  # torchtitan keeps the step there
        meta = meta.fill(meta_from_mapping(_scalars(tree["train_state"], options.trust_pickle), "DCP 'train_state'", path))
    version = getattr(md, "version", None)
    return Checkpoint(
        path, "dcp", tensors, location, meta.fill(meta_from_name(path.name, folder=True)),
        file_metadata=({"dcp_version": version} if isinstance(version, str) else {}) | _provenance(path), other_entries=others,
        stamps=stamps, extra_state=extra,
    )


def _provenance(path: Path) -> dict[str, str]:
    """The provenance ckptavg wrote beside a DCP output (`PROVENANCE`), or nothing: it only informs `inspect`."""
    try:
        with open(path / PROVENANCE, "rb") as f:
            found = json.loads(f.read(MAX_SCALAR_BYTES))
    except (OSError, ValueError):
        return {}
    ok = isinstance(found, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in found.items())
    return found if ok else {}


def dcp_entries(path: Path, trust_pickle: bool = False, stamps: dict[Path, Stamp] | None = None
                ) -> tuple[dict[str, DcpTensor | BytesEntry], Any]:
    """Every entry of the DCP folder `path` (tensors with their chunks, non-tensor entries with where their bytes
    lie), checked against its data files, and its metadata as read (`planner_data`: the planner's key paths).
    Each data file's stamp goes to `stamps`."""
    meta_path = path / METADATA
    md = read_metadata(meta_path, trust_pickle)
    return _entries(meta_path, md, _storage(path, meta_path, md, {} if stamps is None else stamps)), md


def extra_state_entries(entries: dict[str, Any], key: str | None) -> list[str]:
    """The non-tensor `_extra_state` entries among the weights (under `key` when given): the module extra state of
    Transformer Engine layers, which Megatron saves as `<module>._extra_state/shard_<i>_<n>` bytes."""
    head = "" if key is None else key + "."
    return [
        fqn for fqn, v in entries.items()
        if isinstance(v, BytesEntry) and fqn.startswith(head) and fqn.split("/")[0].rsplit(".", 1)[-1] == "_extra_state"
        and fqn.split(".")[0] not in TRAINING_ENTRIES
    ]


def extra_state_note(ckpts: Sequence[Checkpoint]) -> CkptavgWarning | None:
    """One note for a run whose checkpoints hold `_extra_state` entries: they are serialized objects (FP8
    scaling state), not weights, so averaging them means nothing; a DCP output carries the newest checkpoint's
    (`write.dcp_folder`), other outputs (safetensors, torch state dicts of tensors) cannot hold them."""
    holding = [c for c in ckpts if c.extra_state]
    if not holding:
        return None
    names = holding[-1].extra_state
    return CkptavgWarning(
        f"{len(holding)} of {len(ckpts)} checkpoints hold '_extra_state' entries ({len(names)} in {holding[-1].path}: "
        f"{listing([one_line(n, 80) for n in names], 2)}; serialized module extra state, such as Transformer Engine's "
        "FP8 scaling state): they are not weights and are not averaged. A DCP output carries the newest checkpoint's "
        "when it is a DCP folder; other outputs do not hold them: load those with strict=False, or copy "
        "them from the newest checkpoint."
    )


def _nest(entries: dict[str, Any], planner_data: Any) -> dict[str, Any]:
    """Rebuild the saved nesting from the planner's key paths, so that `model`, `optim` and top-level
    weights (torchtitan) are told apart as in a torch file; dotted names are split when there are none."""
    tree: dict[str, Any] = {}
    for fqn, value in entries.items():
        given = planner_data.get(fqn) if isinstance(planner_data, dict) else None
        parts: list[Any] = list(given) if _key_path(given) and ".".join(map(str, given)) == fqn else fqn.split(".")
        node = tree
        for part in map(str, parts[:-1]):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                return dict(entries)  # a name is both a value and a prefix: keep the flat names
        if str(parts[-1]) in node:
            return dict(entries)
        node[str(parts[-1])] = value
    return tree


def _key_path(parts: Any) -> TypeGuard[list[Any] | tuple[Any, ...]]:
    """A planner key path: names and list indices (no integer too long to print)."""
    return isinstance(parts, tuple | list) and all(
        isinstance(p, str) or (type(p) is int and abs(p) <= MAX_INT64) for p in parts
    )


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
