"""Find checkpoints among paths, directories and glob patterns."""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from pathlib import Path

from ..errors import CheckpointFormatError, SelectionError
from .checkpoint import PathLike
from .deepspeed import deepspeed_tags, is_deepspeed_run
from .files import training_state
from .layouts import is_checkpoint_folder
from .safetensors_file import sniff


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
        if is_checkpoint_folder(path):
            return [path]
        if is_deepspeed_run(path):  # global_stepN/ tags beside a `latest` file; checks that `latest` is sound
            return deepspeed_tags(path)
        inside = sorted(
            p for p in path.iterdir()
            if (p.is_dir() and is_checkpoint_folder(p)) or (training_state(p) is None and _is_checkpoint_file(p))
        )
        if explicit and not inside:
            raise SelectionError(
                f"{path}: directory holds no checkpoint (files are recognised by content: torch zip or "
                "legacy pickles, safetensors, Hugging Face checkpoint folders, DCP folders with .metadata)."
            )
        return inside
    if path.is_file() and training_state(path) is not None:  # optimizer, RNG...: skipped; named, refused on open
        return [path] if explicit else []
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
