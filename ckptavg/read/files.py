"""One checkpoint file, safetensors or torch: its tensors, where in the file they were found, its metadata."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from .checkpoint import Checkpoint, LoadOptions, Stamp, stamp
from .locate import locate_weights, select_prefix
from .metadata import Meta, extras_from_metadata, lr_from_checkpoint, meta_from_mapping, meta_from_name, metrics_from_checkpoint
from .safetensors_file import read_safetensors_header
from .torch_extra import read_extra_metadata
from .torch_file import load_torch


def open_file(path: Path, fmt: str, options: LoadOptions) -> Checkpoint:
    """Open one checkpoint file of format `fmt` (as `sniff` said) lazily; its stamp is taken first."""
    return _open_file(path, fmt, options, stamp(path))


def _open_file(path: Path, fmt: str, options: LoadOptions, before: Stamp) -> Checkpoint:
    if fmt == "safetensors":
        tensors, file_meta = read_safetensors_header(path)
        meta = meta_from_mapping(file_meta, "safetensors metadata", path).fill(extras_from_metadata(file_meta))
        meta = _with_name(meta, path.name)
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
        meta = meta.fill(lr_from_checkpoint(obj))
    extra = read_extra_metadata(path) if fmt == "torch-zip" else {}  # what ckptavg's torch writer stored
    return Checkpoint(path, fmt, tensors, location, _with_name(meta, path.name), other_entries=others,
                      file_metadata=extra, stamps={path: before})


def _with_name(meta: Meta, name: str) -> Meta:
    """Fill `meta` from the file name; a snapshot name (EDM2, PostHocEMA) wins: its step is exact, while a
    snapshot's own ``step`` entry may be stored in float16."""
    named = meta_from_name(name)
    return named.fill(meta) if named.ema_index is not None or named.profile_source else meta.fill(named)
