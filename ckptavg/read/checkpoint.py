"""A checkpoint as ckptavg sees it: where it came from, its lazy tensors and its metadata; and how to read it.

A `Checkpoint` is a small value: where it came from, its lazy tensors, and its step/epoch metadata
with the place each value was read from.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from .lazy import LazyTensor
from .metadata import Meta

PathLike = str | os.PathLike[str]


@dataclass(frozen=True)
class LoadOptions:
    """How to read checkpoints.

    Attributes:
        key: dotted path of the weights inside a training checkpoint (e.g. ``"model_ema"``);
            None looks in the usual places.
        keep_prefix: keep a ``module.``/``_orig_mod.`` prefix shared by every key.
        trust_pickle: allow full unpickling (can run code); only for files you trust.
    """

    key: str | None = None
    keep_prefix: bool = False
    trust_pickle: bool = False


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

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())
