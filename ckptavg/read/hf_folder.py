"""Hugging Face checkpoint folders: `model.safetensors` (or shards with an index, or `pytorch_model.bin`),
diffusers model folders (`diffusion_pytorch_model.safetensors`) and PEFT adapters (`adapter_model.safetensors`),
with step, epoch, metrics and the logged learning rates from `trainer_state.json`."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from ..errors import CheckpointFormatError, one_line
from .checkpoint import Checkpoint, LoadOptions, Stamp, stamp
from .files import open_file
from .lazy import LazyTensor
from .lr_records import lr_history_from_trainer_state
from .metadata import Meta, meta_from_mapping, meta_from_name, metrics_from_trainer_state
from .safetensors_file import sniff
from .sidecars import parse_index, parse_trainer_state

# Hugging Face folder layouts, most preferred first.
HF_WEIGHT_FILES = (
    "model.safetensors.index.json", "model.safetensors",
    "pytorch_model.bin.index.json", "pytorch_model.bin",
    "diffusion_pytorch_model.safetensors.index.json", "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.bin.index.json", "diffusion_pytorch_model.bin",
    "adapter_model.safetensors", "adapter_model.bin",
)
# The layout each weights file names (the format `inspect` shows), by the file's stem.
LAYOUTS = {"diffusion_pytorch_model": "diffusers folder", "adapter_model": "peft adapter"}


def layout_name(weights: Path) -> str:
    """The layout of a folder whose weights are `weights`: hf-folder, diffusers folder or peft adapter."""
    return LAYOUTS.get(weights.name.split(".", 1)[0], "hf-folder")


def is_hf_folder(path: Path) -> bool:
    """True for a Hugging Face style checkpoint folder (model.safetensors, shards or pytorch_model.bin)."""
    return any((path / name).is_file() for name in HF_WEIGHT_FILES)


def open_hf_folder(path: Path, options: LoadOptions) -> Checkpoint:
    """Open a Hugging Face checkpoint folder lazily: its weights (one file, or shards through an index) and
    the step, epoch and metrics of its trainer_state.json; every sidecar is checked (see sidecars)."""
    weights = next(path / n for n in HF_WEIGHT_FILES if (path / n).is_file())
    stamps = {weights: stamp(weights)}
    if weights.name.endswith(".index.json"):
        tensors = _read_sharded(path, weights, options, stamps)
        fmt = f"{layout_name(weights)} (sharded " + ("safetensors)" if "safetensors" in weights.name else "torch)")
    else:
        fmt_inner = sniff(weights)
        if fmt_inner is None:
            raise CheckpointFormatError(f"{weights}: not a checkpoint file.")
        inner = open_file(weights, fmt_inner, options)
        tensors, stamps = inner.tensors, inner.stamps
        fmt = f"{layout_name(weights)} ({fmt_inner})"
    meta = Meta()
    state = path / "trainer_state.json"
    if state.is_file():
        stamps[state] = stamp(state)
        data = parse_trainer_state(state)
        meta = meta_from_mapping(data, "trainer_state.json", state)
        meta = replace(meta, metrics=metrics_from_trainer_state(data)).fill(lr_history_from_trainer_state(data))
    meta = meta.fill(meta_from_name(path.name, folder=True))
    return Checkpoint(path, fmt, tensors, weights.name, meta, stamps=stamps)


def _read_sharded(folder: Path, index: Path, options: LoadOptions, stamps: dict[Path, Stamp]) -> dict[str, LazyTensor]:
    weight_map = parse_index(folder, index)
    shards: dict[str, dict[str, LazyTensor]] = {}
    tensors: dict[str, LazyTensor] = {}
    for key, shard in weight_map.items():
        if shard not in shards:
            shard_path = folder / shard
            if not _is_file(shard_path):
                raise CheckpointFormatError(f"{index}: names shard '{one_line(shard, 120)}', which is missing.")
            fmt = sniff(shard_path)
            if fmt is None:
                raise CheckpointFormatError(f"{shard_path}: not a checkpoint file.")
            opened = open_file(shard_path, fmt, LoadOptions(trust_pickle=options.trust_pickle))
            shards[shard] = opened.tensors
            stamps.update(opened.stamps)
        if key not in shards[shard]:
            raise CheckpointFormatError(
                f"{index}: says '{one_line(key, 120)}' is in '{one_line(shard, 120)}', but it is not there."
            )
        tensors[key] = shards[shard][key]
    return tensors


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:  # Path.is_file answers False only for some errors: a name past NAME_MAX raises
        return False
