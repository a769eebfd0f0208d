"""Find checkpoints among paths, directories and glob patterns, and say which were left out and why."""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import CheckpointFormatError, SelectionError
from .checkpoint import PathLike
from .deepspeed import deepspeed_tags, is_deepspeed_run
from .files import training_state
from .hf_folder import HF_WEIGHT_FILES
from .layouts import is_checkpoint_folder
from .megatron import is_megatron_run, megatron_iterations
from .names import is_alias, is_numbered
from .safetensors_file import sniff

Skipped = tuple[Path, str]  # a path left out, and why


@dataclass(frozen=True)
class Candidate:
    """A checkpoint found: `explicit` when it was named on its own, not found in a directory or by a pattern."""

    path: Path
    explicit: bool


@dataclass
class Found:
    """The checkpoints the inputs stand for, and what was left out with the reason."""

    candidates: list[Candidate] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)

    @property
    def paths(self) -> list[Path]:
        return [c.path for c in self.candidates]


def find_checkpoints(inputs: Sequence[PathLike] | PathLike) -> list[Path]:
    """Expand files, directories and glob patterns into checkpoint paths (files, HF or DCP folders); see `discover`."""
    return discover(inputs).paths


def discover(inputs: Sequence[PathLike] | PathLike) -> Found:
    """Expand files, directories and glob patterns into checkpoints (files, HF, DCP or DeepSpeed folders).

    A directory stands for the checkpoints directly inside it. A run folder, one with numbered checkpoints
    inside (``checkpoint-N/``, ``global_stepN/``, ``step_N/``, ``iter_N/``, ``epoch=E.ckpt``), means those,
    even when it is itself a checkpoint folder (the final model `trainer.save_model()` writes beside them):
    that final model, and model folders without a number beside numbered ones, are skipped. Otherwise a
    checkpoint folder is one checkpoint. Files found through a directory or a glob that are not checkpoints
    are skipped; a file named explicitly must be one. The same path found twice counts once.
    """
    items = [inputs] if isinstance(inputs, str | os.PathLike) else list(inputs)
    found = Found()
    for item in items:
        text = os.fspath(item)
        path = Path(text)
        if path.exists():
            hits, explicit = _expand_existing(path, True, found.skipped), not path.is_dir() or is_checkpoint_folder(path)
            _add(found, hits, explicit=explicit and hits == [path])
        elif glob.has_magic(text):
            matches = sorted(glob.glob(text))
            hits = [p for m in matches for p in _expand_existing(Path(m), False, found.skipped)]
            if not hits:
                raise SelectionError(f"{text}: the pattern matches no checkpoint.")
            _add(found, hits, explicit=False)
        else:
            raise SelectionError(f"{text}: no such file or directory.")
    return found


def _add(found: Found, paths: list[Path], explicit: bool) -> None:
    """Add checkpoints; a path already found counts once, unless two different names given explicitly lead to
    it (a symlink and its target: then the selection must not use both, which `select.refuse_twice` checks)."""
    seen = {c.path.resolve(): i for i, c in enumerate(found.candidates)}
    for p in paths:
        key = p.resolve()
        before = seen.get(key)
        old = found.candidates[before] if before is not None else None
        if old is None or (explicit and old.explicit and p.absolute() != old.path.absolute()):
            seen.setdefault(key, len(found.candidates))
            found.candidates.append(Candidate(p, explicit))
        elif explicit and not old.explicit:  # named explicitly after a directory or pattern found it
            found.candidates[before or 0] = Candidate(p, True)
        elif not explicit and p != old.path:
            found.skipped.append((p, f"the same file as {old.path}"))


def _expand_existing(path: Path, explicit: bool, skipped: list[Skipped]) -> list[Path]:
    if path.is_dir():
        numbered = _numbered_children(path)
        if is_checkpoint_folder(path):
            if not numbered:
                return [path]
            skipped.append((_weights_of(path), "the final model saved in the run folder beside its numbered "
                            "checkpoints (trainer.save_model()); name it explicitly to average it"))
            return numbered + [p for p in sorted(path.iterdir()) if is_alias(p) and _is_checkpoint_file(p)]
        if is_deepspeed_run(path):  # global_stepN/ tags beside a `latest` file; checks that `latest` is sound
            return deepspeed_tags(path)
        if is_megatron_run(path):  # iter_N/ folders beside latest_checkpointed_iteration.txt
            return megatron_iterations(path)
        inside = []
        for p in sorted(path.iterdir()):
            if p.is_dir() and is_checkpoint_folder(p):
                if numbered and p not in numbered:
                    skipped.append((p, "a model folder without a step beside the run's numbered checkpoints (the "
                                    "final model?); name it explicitly to average it"))
                else:
                    inside.append(p)
            elif training_state(p) is None and _is_checkpoint_file(p):  # optimizer, RNG: skipped
                inside.append(p)
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


def _numbered_children(path: Path) -> list[Path]:
    """The checkpoints directly inside `path` whose names carry a step or an epoch."""
    out = []
    for p in sorted(path.iterdir()):
        if not is_numbered(p):
            continue
        if p.is_dir() and is_checkpoint_folder(p) or p.is_file() and sniff(p) is not None:
            out.append(p)
    return out


def _weights_of(folder: Path) -> Path:
    """The weights file of a Hugging Face folder, or the folder itself for other layouts."""
    return next((folder / n for n in HF_WEIGHT_FILES if (folder / n).is_file()), folder)


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
