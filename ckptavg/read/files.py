"""One checkpoint file, safetensors or torch: its tensors, where in the file they were found, its metadata."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from .checkpoint import Checkpoint, LoadOptions, Stamp, stamp
from .locate import locate_weights, select_prefix
from .metadata import Meta, meta_from_mapping, meta_from_name, metrics_from_checkpoint
from .safetensors_file import read_safetensors_header
from .torch_file import load_torch


def open_file(path: Path, fmt: str, options: LoadOptions) -> Checkpoint:
    """Open one checkpoint file of format `fmt` (as `sniff` said) lazily; its stamp is taken first."""
    return _open_file(path, fmt, options, stamp(path))


def _open_file(path: Path, fmt: str, options: LoadOptions, before: Stamp) -> Checkpoint:
    if fmt == "safetensors":
        tensors, file_meta = read_safetensors_header(path)
        meta = meta_from_mapping(file_meta, "safetensors metadata", path).fill(meta_from_name(path.name))
        if options.key:
            tensors = select_prefix(path, tensors, options.key)
        return Checkpoint(path, fmt, tensors, options.key or "(top level)", meta, file_metadata=file_meta,
                          stamps={path: before})
    obj = load_torch(path, fmt, options.trust_pickle)
    tensors, location, others = locate_weights(path, obj, options.key)
    meta = Meta()
    if isinstance(obj, dict):
        meta = meta_from_mapping(obj, "checkpoint", path)
        meta = replace(meta, metrics={**metrics_from_checkpoint(obj, path.name), **meta.metrics})
    return Checkpoint(path, fmt, tensors, location, meta.fill(meta_from_name(path.name)), other_entries=others,
                      stamps={path: before})
