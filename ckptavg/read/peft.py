"""PEFT adapters' `adapter_config.json`: found beside an adapter's weights, read with the sidecar checks.

The LoRA averages (methods/lora_rows.py) need its ``r``, ``lora_alpha``, ``use_rslora`` and patterns: the scale of
every update, and what an output of another rank must say.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import CheckpointFormatError, PlanError
from .checkpoint import Checkpoint, LoadOptions, PathLike
from .layouts import open_checkpoint
from .sidecars import read_json

CONFIG = "adapter_config.json"


def config_path(ckpt: Checkpoint) -> Path | None:
    """The adapter_config.json of a checkpoint: in the folder of its weights (an adapter folder, or the folder of
    an adapter_model.safetensors named by itself), or None."""
    parents = {lazy.path.parent for lazy in ckpt.tensors.values()}
    folder = parents.pop() if len(parents) == 1 else ckpt.path if ckpt.path.is_dir() else ckpt.path.parent
    path = folder / CONFIG
    return path if path.is_file() else None


def adapter_config(ckpt: Checkpoint) -> tuple[Path, dict[str, Any]] | None:
    """The adapter_config.json of a checkpoint and its contents, or None when it has none.

    Raises:
        CheckpointFormatError: The file is not a readable JSON object.
    """
    path = config_path(ckpt)
    return None if path is None else (path, read_json(path))


def open_base(path: PathLike, load: LoadOptions) -> Checkpoint:
    """The base model that ``lora merge`` adds the mean update to: a Hugging Face folder or a weights file, opened
    lazily (only `load`'s trust_pickle applies: the other options describe the adapters).

    Raises:
        CheckpointFormatError: It does not exist or is not a checkpoint.
        PlanError: strip_prefix or add_prefix, which would change nothing: the merge writes the base's own names
            (an adapter's tensors are matched to the base's by their ends).
    """
    renaming = [p for p in ("strip_prefix", "add_prefix") if getattr(load, p)]
    if renaming:
        raise PlanError(f"lora merge writes the base model's own tensor names, so {renaming[0]} changes nothing; "
                        f"leave out {' and '.join(renaming)}.", params=("lora", *renaming))
    base = Path(path)
    if not base.exists():
        raise CheckpointFormatError(f"{base}: no such base model; give base, the folder or weights file the adapters "
                                    "were trained on.", params=("base",))
    return open_checkpoint(base, LoadOptions(trust_pickle=load.trust_pickle))
