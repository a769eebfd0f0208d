"""A checkpoint as ckptavg sees it: where it came from, its lazy tensors and its metadata; and how to read it.

A `Checkpoint` is a small value: where it came from, its lazy tensors, and its step/epoch metadata
with the place each value was read from.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import CheckpointFormatError
from .lazy import LazyTensor
from .metadata import Meta

PathLike = str | os.PathLike[str]
# What says a file is still the one that was opened: size, mtime_ns, ctime_ns, inode, device. ctime too: a copy
# that restores the mtime (cp -p, rsync) over the same inode still moves it.
Stamp = tuple[int, int, int, int, int]


def stamp(path: Path) -> Stamp:
    """The file's `Stamp` now; taken when a file is opened, before any of it is read."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise CheckpointFormatError(f"{path}: cannot read ({e.strerror}).") from None
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev


def check_unchanged(ckpts: Iterable[Checkpoint]) -> None:
    """Raise CheckpointFormatError for the first file of `ckpts` that was changed, replaced or removed since
    it was opened: its tensors may then mix two saves. Call it after the last read, before the output is
    committed."""
    for ckpt in ckpts:
        for path, before in ckpt.stamps.items():
            try:
                now: Stamp | None = stamp(path)
            except CheckpointFormatError:
                now = None
            if now != before:
                raise CheckpointFormatError(f"{path}: changed while being read; nothing was written.")


@dataclass(frozen=True)
class LoadOptions:
    """How to read checkpoints.

    Attributes:
        key: dotted path of the weights inside a training checkpoint (e.g. ``"model_ema"``);
            None looks in the usual places.
        keep_prefix: keep a ``module.``/``_orig_mod.`` prefix shared by every key.
        trust_pickle: allow full unpickling (can run code); only for files you trust.
        component: which model of a checkpoint that holds several (accelerate's ``model_1``, a diffusers
            training checkpoint's ``unet_ema``); None takes the only one, and refuses a choice.
        strip_prefix: a prefix every tensor name has, removed (Lightning's ``model.``).
        add_prefix: a prefix added to every tensor name (after strip_prefix).
    """

    key: str | None = None
    keep_prefix: bool = False
    trust_pickle: bool = False
    component: str | None = None
    strip_prefix: str | None = None
    add_prefix: str | None = None


@dataclass
class Checkpoint:
    """One checkpoint: its tensors (lazy), where they were found, and its metadata."""

    path: Path
    format: str
    tensors: dict[str, LazyTensor]
    location: str
    meta: Meta
    stripped_prefix: str = ""
    file_metadata: dict[str, str] = field(default_factory=dict)
    other_entries: list[str] = field(default_factory=list)
    stamps: dict[Path, Stamp] = field(default_factory=dict)  # every file it was read from, as when opened
    extra_state: list[str] = field(default_factory=list)  # `_extra_state` entries: not weights, not averaged

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


def files_of(ckpts: Sequence[Checkpoint]) -> list[Path]:
    """Every file an input is made of: the file itself, its shards, and all files of a checkpoint folder
    (index, trainer_state.json, config), so that none can be overwritten by the output."""
    files = {c.path for c in ckpts} | {t.path for c in ckpts for t in c.tensors.values()}
    files |= {p for c in ckpts if c.path.is_dir() for p in c.path.iterdir() if p.is_file()}
    return sorted(files, key=os.fspath)
