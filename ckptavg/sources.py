"""Find checkpoints among paths, directories and globs; open each one lazily; locate its weights.

A `Checkpoint` is a small value: where it came from, its lazy tensors, and its step/epoch metadata
with the place each value was read from.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .dcp import is_dcp_folder, open_dcp_folder
from .errors import CheckpointFormatError, SelectionError
from .formats import LazyTensor, read_safetensors_header, sniff
from .locate import locate_weights, select_prefix, strip_prefixes
from .metadata import Meta, meta_from_mapping, meta_from_name, metrics_from_checkpoint, metrics_from_trainer_state
from .pickles import load_torch

PathLike = str | os.PathLike[str]

# Hugging Face folder layouts, most preferred first.
HF_WEIGHT_FILES = (
    "model.safetensors.index.json", "model.safetensors",
    "pytorch_model.bin.index.json", "pytorch_model.bin",
)


@dataclass(frozen=True)
class LoadOptions:
    """How to read checkpoints.

    Attributes:
        key: dotted path of the weights inside a training checkpoint (e.g. ``"model_ema"``);
            None looks in the usual places.
        keep_prefix: keep a ``module.``/``_orig_mod.`` prefix shared by every key.
        trust_pickle: allow full unpickling (can run code); only for files you trust.
    """

    key: str | None = None
    keep_prefix: bool = False
    trust_pickle: bool = False


@dataclass
class Checkpoint:
    """One checkpoint: its tensors (lazy), where they were found, and its metadata."""

    path: Path
    format: str
    tensors: dict[str, LazyTensor]
    location: str
    meta: Meta
    stripped_prefix: str = ""
    file_metadata: dict[str, str] = field(default_factory=dict)
    other_entries: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


# ---------------------------------------------------------------- discovery


def find_checkpoints(inputs: Sequence[PathLike] | PathLike) -> list[Path]:
    """Expand files, directories and glob patterns into checkpoint paths (files, HF or DCP folders).

    A directory stands for the checkpoints directly inside it, unless it is itself a Hugging Face
    or PyTorch Distributed Checkpoint folder. Files found through a directory or a glob that are not
    checkpoints are skipped; a file named explicitly must be one.
    """
    items = [inputs] if isinstance(inputs, str | os.PathLike) else list(inputs)
    found: list[Path] = []
    for item in items:
        text = os.fspath(item)
        path = Path(text)
        if path.exists():
            found.extend(_expand_existing(path, explicit=True))
        elif glob.has_magic(text):
            matches = sorted(glob.glob(text))
            hits = [p for m in matches for p in _expand_existing(Path(m), explicit=False)]
            if not hits:
                raise SelectionError(f"{text}: the pattern matches no checkpoint.")
            found.extend(hits)
        else:
            raise SelectionError(f"{text}: no such file or directory.")
    unique: dict[Path, Path] = {}
    for p in found:
        unique.setdefault(p.resolve(), p)
    return list(unique.values())


def _expand_existing(path: Path, explicit: bool) -> list[Path]:
    if path.is_dir():
        if is_hf_folder(path) or is_dcp_folder(path):
            return [path]
        inside = sorted(
            p for p in path.iterdir() if (p.is_dir() and (is_hf_folder(p) or is_dcp_folder(p))) or _is_checkpoint_file(p)
        )
        if explicit and not inside:
            raise SelectionError(
                f"{path}: directory holds no checkpoint (files are recognised by content: torch zip or "
                "legacy pickles, safetensors, Hugging Face checkpoint folders, DCP folders with .metadata)."
            )
        return inside
    if _is_checkpoint_file(path):
        return [path]
    if explicit:
        raise CheckpointFormatError(
            f"{path}: not a checkpoint (neither a torch file nor safetensors, judged by its bytes)."
        )
    return []


CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".tar", ".safetensors")


def _is_checkpoint_file(path: Path) -> bool:
    if not path.is_file():
        return False
    if sniff(path) is not None:
        return True
    if path.name.endswith(CHECKPOINT_SUFFIXES):
        # named like a checkpoint but not one: a failed or truncated save; skipping it would
        # silently average fewer checkpoints than the user expects
        why = "an empty file" if path.stat().st_size == 0 else "unrecognised bytes"
        raise CheckpointFormatError(f"{path}: named like a checkpoint but holds {why}; remove it or fix the save.")
    return False


def is_hf_folder(path: Path) -> bool:
    """True for a Hugging Face style checkpoint folder (model.safetensors, shards or pytorch_model.bin)."""
    return any((path / name).is_file() for name in HF_WEIGHT_FILES)


# ---------------------------------------------------------------- opening


def open_checkpoint(path: PathLike, options: LoadOptions = LoadOptions()) -> Checkpoint:
    """Open one checkpoint file or folder lazily: read its index and metadata, no tensor data."""
    path = Path(path)
    if not path.exists():
        raise CheckpointFormatError(f"{path}: no such file or directory.")
    if path.is_dir():
        if is_hf_folder(path):
            ckpt = _open_hf_folder(path, options)
        elif is_dcp_folder(path):
            ckpt = open_dcp_folder(path, options)
        else:
            raise CheckpointFormatError(
                f"{path}: is a directory, not a checkpoint folder (no model.safetensors, pytorch_model.bin or .metadata)."
            )
    else:
        fmt = sniff(path)
        if fmt is None:
            size = path.stat().st_size
            why = "empty file" if size == 0 else "unknown format"
            raise CheckpointFormatError(f"{path}: not a checkpoint ({why}).")
        ckpt = _open_file(path, fmt, options)
    if not ckpt.tensors:
        raise CheckpointFormatError(f"{path}: holds no tensors.")
    if not options.keep_prefix:
        ckpt.tensors, ckpt.stripped_prefix = strip_prefixes(ckpt.tensors)
    return ckpt


def _open_file(path: Path, fmt: str, options: LoadOptions) -> Checkpoint:
    if fmt == "safetensors":
        tensors, file_meta = read_safetensors_header(path)
        meta = meta_from_mapping(file_meta, "safetensors metadata").fill(meta_from_name(path.name))
        if options.key:
            tensors = select_prefix(path, tensors, options.key)
        return Checkpoint(path, fmt, tensors, options.key or "(top level)", meta, file_metadata=file_meta)
    obj = load_torch(path, fmt, options.trust_pickle)
    tensors, location, others = locate_weights(path, obj, options.key)
    meta = Meta()
    if isinstance(obj, dict):
        meta = meta_from_mapping(obj, "checkpoint")
        meta = replace(meta, metrics={**metrics_from_checkpoint(obj, path.name), **meta.metrics})
    return Checkpoint(path, fmt, tensors, location, meta.fill(meta_from_name(path.name)), other_entries=others)


def _open_hf_folder(path: Path, options: LoadOptions) -> Checkpoint:
    weights = next(path / n for n in HF_WEIGHT_FILES if (path / n).is_file())
    if weights.name.endswith(".index.json"):
        tensors = _read_sharded(path, weights, options)
        fmt = "hf-folder (sharded " + ("safetensors)" if "safetensors" in weights.name else "torch)")
    else:
        fmt_inner = sniff(weights)
        if fmt_inner is None:
            raise CheckpointFormatError(f"{weights}: not a checkpoint file.")
        tensors = _open_file(weights, fmt_inner, options).tensors
        fmt = f"hf-folder ({fmt_inner})"
    meta = Meta()
    state = path / "trainer_state.json"
    if state.is_file():
        data = _read_json(state)
        meta = meta_from_mapping({k: v for k, v in data.items() if k in ("global_step", "epoch")}, "trainer_state.json")
        meta = replace(meta, metrics=metrics_from_trainer_state(data))
    meta = meta.fill(meta_from_name(path.name, folder=True))
    return Checkpoint(path, fmt, tensors, weights.name, meta)


def _read_sharded(folder: Path, index: Path, options: LoadOptions) -> dict[str, LazyTensor]:
    weight_map = _read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointFormatError(f"{index}: has no 'weight_map'.")
    shards: dict[str, dict[str, LazyTensor]] = {}
    tensors: dict[str, LazyTensor] = {}
    for key, shard in weight_map.items():
        if shard not in shards:
            shard_path = folder / shard
            if not shard_path.is_file():
                raise CheckpointFormatError(f"{index}: names shard '{shard}', which is missing.")
            fmt = sniff(shard_path)
            if fmt is None:
                raise CheckpointFormatError(f"{shard_path}: not a checkpoint file.")
            shards[shard] = _open_file(shard_path, fmt, LoadOptions(trust_pickle=options.trust_pickle)).tensors
        if key not in shards[shard]:
            raise CheckpointFormatError(f"{index}: says '{key}' is in '{shard}', but it is not there.")
        tensors[key] = shards[shard][key]
    return tensors


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointFormatError(f"{path}: unreadable JSON ({e}).") from None
    if not isinstance(data, dict):
        raise CheckpointFormatError(f"{path}: expected a JSON object.")
    return data
