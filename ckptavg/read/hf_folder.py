"""Hugging Face checkpoint folders: `model.safetensors` (or shards with an index, or `pytorch_model.bin`),
with step, epoch, metrics and the logged learning rates from `trainer_state.json`."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..errors import CheckpointFormatError
from .checkpoint import Checkpoint, LoadOptions
from .files import open_file
from .lazy import LazyTensor
from .metadata import Meta, lr_history_from_trainer_state, meta_from_mapping, meta_from_name, metrics_from_trainer_state
from .safetensors_file import sniff

# Hugging Face folder layouts, most preferred first.
HF_WEIGHT_FILES = (
    "model.safetensors.index.json", "model.safetensors",
    "pytorch_model.bin.index.json", "pytorch_model.bin",
)


def is_hf_folder(path: Path) -> bool:
    """True for a Hugging Face style checkpoint folder (model.safetensors, shards or pytorch_model.bin)."""
    return any((path / name).is_file() for name in HF_WEIGHT_FILES)


def open_hf_folder(path: Path, options: LoadOptions) -> Checkpoint:
    weights = next(path / n for n in HF_WEIGHT_FILES if (path / n).is_file())
    if weights.name.endswith(".index.json"):
        tensors = _read_sharded(path, weights, options)
        fmt = "hf-folder (sharded " + ("safetensors)" if "safetensors" in weights.name else "torch)")
    else:
        fmt_inner = sniff(weights)
        if fmt_inner is None:
            raise CheckpointFormatError(f"{weights}: not a checkpoint file.")
        tensors = open_file(weights, fmt_inner, options).tensors
        fmt = f"hf-folder ({fmt_inner})"
    meta = Meta()
    state = path / "trainer_state.json"
    if state.is_file():
        data = _read_json(state)
        meta = meta_from_mapping({k: v for k, v in data.items() if k in ("global_step", "epoch")}, "trainer_state.json")
        meta = replace(meta, metrics=metrics_from_trainer_state(data)).fill(lr_history_from_trainer_state(data))
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
            shards[shard] = open_file(shard_path, fmt, LoadOptions(trust_pickle=options.trust_pickle)).tensors
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
