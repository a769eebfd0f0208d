"""One checkpoint file, safetensors or torch: its tensors, where in the file they were found, its metadata."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

from ..errors import CheckpointFormatError
from .checkpoint import Checkpoint, LoadOptions, Stamp, stamp
from .locate import locate_weights, select_prefix
from .lr_records import lr_from_checkpoint
from .metadata import Meta, extras_from_metadata, meta_from_mapping, meta_from_name, metrics_from_checkpoint
from .safetensors_file import read_safetensors_header
from .torch_extra import read_extra_metadata
from .torch_file import load_torch

# Files that training libraries write beside the weights, by name: never weights, whatever they hold.
TRAINING_STATE = (
    (re.compile(r"(.*_)?optim(izer)?(_states?)?(_\d+)?\.(bin|pt|pth|safetensors)|.*_optim_states\.pt"), "optimizer state"),
    (re.compile(r"(lr_)?scheduler(_\d+)?\.(bin|pt|pth)"), "learning-rate scheduler state"),
    (re.compile(r"random_states_\d+\.pkl|rng_state(_\d+)?\.pth"), "RNG state"),
    (re.compile(r"scaler(_\d+)?\.(bin|pt|pth)"), "loss-scaler state"),
    (re.compile(r"training_args\.bin"), "the Trainer's arguments"),
    (re.compile(r"custom_checkpoint_\d+\.pkl"), "an object registered with accelerate's save_state"),
)


def training_state(path: Path) -> str | None:
    """What training-state file `path` is by its name (optimizer, scheduler, RNG...), or None for others."""
    return next((what for pattern, what in TRAINING_STATE if pattern.fullmatch(path.name)), None)


def refuse_training_state(path: Path, what: str) -> CheckpointFormatError:
    """The error for a training-state file given as a checkpoint: never suggests trust_pickle, which
    would not turn it into weights."""
    return CheckpointFormatError(
        f"{path}: training state ({what}), not model weights; ckptavg never averages it and skips it in a "
        "folder: give the model's weights file or the checkpoint folder instead."
    )


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
