"""Each checkpoint once: among opened checkpoints, leave out the ones a directory or pattern found twice (hard
links, symlinks, copies) and the aliases (``last.*``, ``model_best.*``...) that repeat a numbered checkpoint."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import CkptavgWarning, listing
from .checkpoint import Checkpoint
from .discover import Skipped
from .identity import find_twins
from .names import is_alias, natural_key, with_path_meta


@dataclass
class Deduped:
    """The checkpoints kept, those left out with the reason, and `identity`: the same number for checkpoints
    that are one checkpoint although both were named explicitly (a selection may use only one of them)."""

    kept: list[Checkpoint]
    skipped: list[Skipped] = field(default_factory=list)
    identity: dict[Path, int] = field(default_factory=dict)


def fill_path_meta(ckpts: Sequence[Checkpoint]) -> None:
    """Fill each checkpoint's unknown step or epoch from the checkpoint folders around it."""
    for c in ckpts:
        c.meta = with_path_meta(c.meta, c.path)


def dedupe(ckpts: Sequence[Checkpoint], explicit: Sequence[bool]) -> Deduped:
    """Keep each checkpoint once. Of checkpoints with the same files or bytes, one is kept (an explicit one, else
    one that is not an alias, else the first by name) and the others found through a directory or pattern are
    skipped; explicit ones all stay, with one identity. An alias found that way is also skipped when a kept
    numbered checkpoint has its step (or epoch), or when its step is unknown while theirs are known."""
    twins = find_twins(ckpts)
    groups: dict[int, list[int]] = {}
    for i, g in enumerate(twins.group):
        groups.setdefault(g, []).append(i)
    out = Deduped([])
    dropped: set[int] = set()
    for members in groups.values():
        if len(members) < 2:
            continue
        keeper = min(members, key=lambda i: (not explicit[i], is_alias(ckpts[i].path), natural_key(str(ckpts[i].path))))
        for i in members:
            if i != keeper and not explicit[i]:
                dropped.add(i)
                why = twins.how[i] if twins.how[i] is not None else twins.how[keeper]
                out.skipped.append((ckpts[i].path, f"{why} as {ckpts[keeper].path}"))
            elif explicit[i]:
                out.identity[ckpts[i].path] = keeper
    numbered = [c for i, c in enumerate(ckpts) if i not in dropped and not is_alias(c.path)]
    for i, c in enumerate(ckpts):
        if i in dropped or explicit[i] or not is_alias(c.path) or not numbered:
            continue
        why = _repeats(c, numbered)
        if why is not None:
            dropped.add(i)
            out.skipped.append((c.path, why))
    out.kept = [c for i, c in enumerate(ckpts) if i not in dropped]
    return out


def _repeats(alias: Checkpoint, numbered: Sequence[Checkpoint]) -> str | None:
    """Why the alias repeats one of the numbered checkpoints, or None when it is a checkpoint of its own."""
    for name in ("step", "epoch"):
        value = getattr(alias.meta, name)
        if value is None:
            continue
        twin = next((c for c in numbered if getattr(c.meta, name) == value), None)
        if twin is not None:
            return f"an alias of {twin.path} (the same {name}, {value})"
        if all(getattr(c.meta, name) is not None for c in numbered):
            return None
    unknown = alias.meta.step is None and alias.meta.epoch is None
    if unknown and any(c.meta.step is not None or c.meta.epoch is not None for c in numbered):
        return "an alias whose step and epoch are unknown, beside numbered checkpoints (a copy of one of them?)"
    return None


def skipped_note(skipped: Sequence[Skipped]) -> CkptavgWarning:
    """The one note that says which inputs were left out, and why."""
    items = [f"{p} ({why})" for p, why in skipped]
    return CkptavgWarning(f"left out {len(items)} of the checkpoints found, each counted once: {listing(items, 6, '; ')}.")
