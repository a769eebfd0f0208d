"""Which checkpoints are one checkpoint: the same files (hard links, symlinks) or the same bytes.

A checkpoint is compared by the files its weights are read from. Files are grouped by (device, inode) first,
then by size, then by a SHA-256 of their first and last MiB, and only files that still tie are hashed whole,
so that telling a run's distinct checkpoints apart reads at most 2 MiB of each.
"""

from __future__ import annotations

import hashlib
import os
from collections import defaultdict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .checkpoint import Checkpoint

MIB = 1 << 20


@dataclass(frozen=True)
class Twins:
    """Checkpoints that are one checkpoint: `group[i]` is the same number for the same checkpoint, and
    `how[i]` says why it equals the first of its group (``the same file``, ``the same bytes``), or None."""

    group: tuple[int, ...]
    how: tuple[str | None, ...]


def weight_files(ckpt: Checkpoint) -> tuple[Path, ...]:
    """The files a checkpoint's weights are read from (the file itself, or a folder's weight files)."""
    files = {t.path for t in ckpt.tensors.values()}
    if ckpt.path.is_file():
        files.add(ckpt.path)
    return tuple(sorted(files, key=os.fspath))


def find_twins(ckpts: Sequence[Checkpoint]) -> Twins:
    """Group checkpoints whose weight files are the same files, or hold the same bytes."""
    files = [weight_files(c) for c in ckpts]
    group = list(range(len(ckpts)))
    how: list[str | None] = [None] * len(ckpts)
    _merge(group, how, files, range(len(ckpts)), _inodes, "the same file (a hard link or symlink)")
    firsts = [i for i in range(len(ckpts)) if group[i] == i]
    by_size = _buckets(files, firsts, _sizes)
    for same_size in by_size:
        by_ends = _buckets(files, same_size, _ends)
        for tied in by_ends:
            _merge(group, how, files, tied, _digests, "the same bytes")
    return Twins(tuple(group), tuple(how))


def _merge(group: list[int], how: list[str | None], files: Sequence[tuple[Path, ...]], among: Sequence[int] | range,
           key: Callable[[tuple[Path, ...]], Hashable], why: str) -> None:
    """Join `among` whose `key` is equal into the group of the first of them."""
    first: dict[Hashable, int] = {}
    for i in among:
        if group[i] != i:
            continue
        k = key(files[i])
        if k in first:
            j = first[k]
            for m in range(len(group)):
                if group[m] == i:
                    group[m] = j
                    how[m] = how[m] or why
        else:
            first[k] = i


def _buckets(files: Sequence[tuple[Path, ...]], among: Sequence[int], key: Callable[[tuple[Path, ...]], Hashable]
             ) -> list[list[int]]:
    """Those of `among` that share `key` with another, in buckets of two or more."""
    found: dict[Hashable, list[int]] = defaultdict(list)
    for i in among:
        found[key(files[i])].append(i)
    return [b for b in found.values() if len(b) > 1]


def _stat(path: Path) -> os.stat_result | None:
    try:
        return os.stat(path)
    except OSError:
        return None


def _inodes(files: tuple[Path, ...]) -> Hashable:
    stats = [_stat(f) for f in files]
    return tuple((s.st_dev, s.st_ino) if s is not None else ("path", os.fspath(f)) for f, s in zip(files, stats, strict=True))


def _sizes(files: tuple[Path, ...]) -> Hashable:
    stats = [_stat(f) for f in files]
    return tuple(s.st_size if s is not None and f.is_file() else os.fspath(f) for f, s in zip(files, stats, strict=True))


def _ends(files: tuple[Path, ...]) -> Hashable:
    return tuple(_hash_ends(f) if f.is_file() else os.fspath(f) for f in files)


def _digests(files: tuple[Path, ...]) -> Hashable:
    return tuple(_hash_all(f) if f.is_file() else os.fspath(f) for f in files)


def _hash_ends(path: Path) -> str:
    """SHA-256 of the first and the last MiB (the whole file when it is at most 2 MiB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(MIB))
        size = os.fstat(f.fileno()).st_size
        if size > MIB:
            f.seek(max(MIB, size - MIB))
            h.update(f.read(MIB))
    return h.hexdigest()


def _hash_all(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(16 * MIB):
            h.update(chunk)
    return h.hexdigest()
