"""What a checkpoint's path says: the aliases training libraries write beside numbered checkpoints, and the step
or epoch of a folder the checkpoint sits in (``checkpoint-N/unet/...``, ``step_N/model_1.safetensors``)."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

from .metadata import Meta, meta_from_name

# last.* (Lightning, timm, Ultralytics), best.* (Ultralytics), model_best.* (timm), checkpoint_best/last.* (fairseq);
# Lightning versions a name that exists already: last-v1.ckpt
_ALIAS = re.compile(r"^(?:last|best|model_best|checkpoint_best|checkpoint_last)(?:-v\d+)?(?:\.[^/]*)?$", re.I)

# folder names that carry a step or an epoch, whole: a run's checkpoint folders, not any folder with digits
_FOLDER_COUNTS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"^checkpoint-(\d{1,18})$"), "step"),  # transformers Trainer, diffusers and accelerate scripts
    (re.compile(r"^global_step(\d{1,18})$"), "step"),  # DeepSpeed tags
    (re.compile(r"^(?:global_)?step[_=-]?(\d{1,18})$", re.I), "step"),  # accelerate save_state(f"step_{n}")
    (re.compile(r"^iter(?:ation)?[_=-]?(\d{1,18})$", re.I), "step"),  # Megatron iter_0000010
    (re.compile(r"^epoch[_=-]?(\d{1,18})$", re.I), "epoch"),
)
PARENT_LEVELS = 3  # how many folders up a step is looked for (checkpoint-N/unet/diffusion_pytorch_model.safetensors)


def natural_key(text: str) -> tuple[tuple[int, int, str], ...]:
    """Sort key that puts ``epoch=10`` after ``epoch=9``."""
    return tuple((0, int(t), "") if t.isdigit() else (1, 0, t.lower()) for t in re.split(r"(\d+)", text) if t)


def is_alias(path: Path) -> bool:
    """A name training libraries give a copy or link of a numbered checkpoint: ``last.ckpt``, ``model_best.pth.tar``."""
    return bool(_ALIAS.match(path.name))


def is_numbered(path: Path) -> bool:
    """A name that carries a step or an epoch (``checkpoint-12/``, ``epoch=3-step=16.ckpt``, ``checkpoint_2_40.pt``)."""
    if path.is_dir():
        return folder_count(path.name) is not None or meta_from_name(path.name, folder=True).step is not None
    meta = meta_from_name(path.name)
    return meta.step is not None or meta.epoch is not None


def folder_count(name: str) -> tuple[str, int] | None:
    """``("step", 12)`` for a checkpoint folder name such as ``checkpoint-12`` or ``iter_0000012``."""
    for pattern, field_name in _FOLDER_COUNTS:
        if m := pattern.match(name):
            return field_name, int(m.group(1))
    return None


def meta_from_parents(path: Path) -> Meta:
    """The step and epoch of the nearest enclosing checkpoint folders (up to `PARENT_LEVELS` up), with the
    source naming the folder: ``folder name 'checkpoint-6' (1 level up)``."""
    out = Meta()
    for level, parent in enumerate(path.parents, 1):
        if level > PARENT_LEVELS or out.step is not None and out.epoch is not None:
            break
        found = folder_count(parent.name)
        if found is None:
            continue
        field_name, value = found
        if getattr(out, field_name) is None:
            where = f"folder name '{parent.name}' ({level} level{'s' if level > 1 else ''} up)"
            out = replace(out, step=value, step_source=where) if field_name == "step" else replace(
                out, epoch=value, epoch_source=where)
    return out


def with_path_meta(meta: Meta, path: Path) -> Meta:
    """`meta` with its unknown step or epoch filled from the folders around `path`."""
    return meta.fill(meta_from_parents(path)) if meta.step is None or meta.epoch is None else meta
