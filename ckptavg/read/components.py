"""Checkpoints that hold several models: accelerate's `save_state` with two prepared models
(`model.safetensors` + `model_1.safetensors`) and the diffusers training scripts' `checkpoint-N/` with one
model folder per model (`unet/`, `unet_ema/`, `text_encoder/`). `component` chooses one; without it, a
checkpoint is read only when it holds one model."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

from ..errors import CheckpointFormatError, one_line
from .checkpoint import Checkpoint, LoadOptions
from .files import open_file, training_state
from .hf_folder import is_hf_folder, open_hf_folder
from .metadata import meta_from_name
from .safetensors_file import sniff

# accelerate names the i-th prepared model's file model_i (the first has no number).
_ACCELERATE = re.compile(r"(?:pytorch_)?(model(?:_\d+)?)\.(?:safetensors|bin)")


def components(path: Path) -> dict[str, Path]:
    """The models of a checkpoint folder by name (a file or a model folder each); empty for a folder that is
    not a checkpoint of several models."""
    files = _accelerate_files(path)
    if len(files) > 1 and "model" in files:
        return files
    if is_hf_folder(path):
        return {}
    if not _has_markers(path):  # a folder of checkpoint-N/ model folders is a run, not one checkpoint
        return {}
    subs = _model_folders(path)
    if not subs or any(_model_folders(d) for d in _dirs(path)):  # a run folder: its children are the checkpoints
        return {}
    return subs


def _has_markers(path: Path) -> bool:
    """A diffusers pipeline (model_index.json) or a training checkpoint (optimizer, RNG... files beside)."""
    try:
        return any((p.name == "model_index.json" or training_state(p)) and p.is_file() for p in path.iterdir())
    except OSError:
        return False


def is_component_folder(path: Path) -> bool:
    """A checkpoint folder of several models (or of one model in a subfolder, diffusers style)."""
    return bool(components(path))


def open_component(path: Path, found: dict[str, Path], options: LoadOptions) -> Checkpoint:
    """Open the model of checkpoint folder `path` that `options.component` names (or its only one)."""
    name = options.component
    if name is None:
        if len(found) > 1:
            raise CheckpointFormatError(
                f"{path}: holds {len(found)} models ({', '.join(found)}); pass component with one of them.",
                params=("component",),
            )
        name = next(iter(found))
    if name not in found:
        raise CheckpointFormatError(
            f"{path}: has no model '{one_line(name, 120)}' (its models: {', '.join(found)}); pass component with one "
            "of them.", params=("component",)
        )
    inner_options = replace(options, component=None)
    where = found[name]
    if where.is_dir():
        inner = open_hf_folder(where, inner_options)
        layout = f"{inner.format}, model '{name}' of {len(found)}"
        location = f"{where.name}/{inner.location}"
    else:
        fmt = sniff(where)
        if fmt is None:
            raise CheckpointFormatError(f"{where}: not a checkpoint file.")
        inner = open_file(where, fmt, inner_options)
        layout = f"accelerate state ({fmt}), model '{name}' of {len(found)}"
        location = where.name if inner.location == "(top level)" else f"{where.name}: {inner.location}"
    meta = inner.meta.fill(meta_from_name(path.name, folder=True))
    return replace(inner, path=path, format=layout, location=location, meta=meta)


def check_no_component(path: Path, ckpt: Checkpoint, component: str | None) -> None:
    """A component asked of a checkpoint of one model: fine when it names that model, else an error."""
    if component is None:
        return
    own = {path.name, path.name.split(".", 1)[0], Path(ckpt.location).name.split(".", 1)[0]}
    if component not in own:
        raise CheckpointFormatError(
            f"{path}: holds one model ({ckpt.format}), not several; remove component '{one_line(component, 120)}'.",
            params=("component",),
        )


def _accelerate_files(path: Path) -> dict[str, Path]:
    """model(_N) files beside the training state that save_state always writes (a folder of model_0..model_5
    files is a folder of checkpoints)."""
    found: dict[str, Path] = {}
    try:
        children = sorted(path.iterdir(), key=lambda p: _natural(p.name))
    except OSError:
        return {}
    if not any(training_state(p) and p.is_file() for p in children):
        return {}
    for p in children:
        m = _ACCELERATE.fullmatch(p.name)
        if m and p.is_file():
            found.setdefault(m.group(1), p)
    return found


def _model_folders(path: Path) -> dict[str, Path]:
    return {d.name: d for d in _dirs(path) if is_hf_folder(d)}


def _dirs(path: Path) -> list[Path]:
    try:
        return sorted((p for p in path.iterdir() if p.is_dir()), key=lambda p: _natural(p.name))
    except OSError:
        return []


def _natural(name: str) -> tuple[str, int]:
    m = re.fullmatch(r"(.*?)(\d*)", name)
    head, digits = (m.group(1), m.group(2)) if m else (name, "")
    return head, int(digits) if digits else -1
