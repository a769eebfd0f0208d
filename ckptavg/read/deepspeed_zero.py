"""Rebuilding fp32 weights from DeepSpeed's ZeRO partitions, as `zero_to_fp32.py` does, without reading them.

Each weight becomes a list of byte ranges (`Piece`s) in the ranks' optimizer files; its tensor reads only those
ranges, when loaded. Nothing here holds more than one weight in memory.

- ZeRO-1/2: a param group's flat fp32 vector is the ranks' `single_partition_of_fp32_groups[g]` one after
  another; its params lie in it in `param_shapes` order, each followed by its `param_alignment_paddings` entry.
- ZeRO-3: every param is split over the ranks: each holds ceil(numel / world) elements of it (the last rank's
  tail is padding) at the same offset of its `fp32_flat_groups` (the groups one after another); the param is the
  ranks' pieces in rank order, cut to numel. Frozen params are cut from the ranks' `frozen_param_fragments`
  the same way.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointFormatError
from .lazy import LazyTensor, pread_exact


@dataclass(frozen=True)
class Piece:
    """`nbytes` bytes of a file from byte `offset`: one rank's part of a weight."""

    path: Path
    offset: int
    nbytes: int


@dataclass
class GatheredTensor(LazyTensor):
    """A weight whose bytes lie in several ranges of several files; `load()` reads each range into its place."""

    pieces: tuple[Piece, ...] = ()

    @property
    def streamable(self) -> bool:
        """True: any run of elements maps to byte ranges of the pieces (`ranges`), so it is read block by block."""
        return True

    def ranges(self, start: int, count: int) -> list[tuple[Path, int, int]]:
        """The byte runs of elements `start` to `start + count`: the parts of the pieces they fall in."""
        size, lo, hi = self.dtype.itemsize, start * self.dtype.itemsize, (start + count) * self.dtype.itemsize
        runs, at = [], 0
        for p in self.pieces:
            a, b = max(lo, at), min(hi, at + p.nbytes)
            if a < b:
                runs.append((p.path, p.offset + a - at, b - a))
            at += p.nbytes
            if at >= hi:
                break
        if sum(n for _, _, n in runs) != count * size:
            raise CheckpointFormatError(f"{self.path}: elements {start}-{start + count} lie outside the ranks' partitions "
                                        f"({at // size} elements); the checkpoint is corrupt.")
        return runs

    def load(self) -> torch.Tensor:
        """Read the pieces, in order, into one new tensor."""
        if self.numel == 0:
            return torch.empty(self.shape, dtype=self.dtype)
        buf = bytearray(self.nbytes)
        view, at = memoryview(buf), 0
        fds: dict[Path, int] = {}
        try:
            for p in self.pieces:
                if p.path not in fds:
                    try:
                        fds[p.path] = os.open(p.path, os.O_RDONLY)
                    except OSError as e:
                        raise CheckpointFormatError(f"{p.path}: cannot read ({e.strerror}).") from None
                pread_exact(fds[p.path], p.path, p.offset, view[at:at + p.nbytes])
                at += p.nbytes
        finally:
            for fd in fds.values():
                os.close(fd)
        return torch.frombuffer(buf, dtype=self.dtype).view(self.shape)


@dataclass
class CastTensor(LazyTensor):
    """A tensor of the file converted to `dtype` when loaded: zero_to_fp32 returns floating buffers as float32."""

    source: LazyTensor | None = None

    @property
    def streamable(self) -> bool:
        """False: the bytes in the file are of another dtype."""
        return False

    def load(self) -> torch.Tensor:
        """Load the source tensor and convert it."""
        assert self.source is not None
        return self.source.load().to(self.dtype)


def as_float32(t: LazyTensor) -> LazyTensor:
    """`t` as zero_to_fp32 returns a buffer: floating dtypes become float32, others are kept."""
    if not t.dtype.is_floating_point or t.dtype == torch.float32:
        return t
    return CastTensor(t.path, torch.float32, t.shape, source=t)


class Flat:
    """A virtual 1-D tensor made of 1-D tensors of the files, one after another (a rank's groups, or a group's
    ranks); `take` gives the byte ranges of any run of its elements."""

    def __init__(self, where: str, parts: Sequence[Any]) -> None:
        self.where = where
        self.parts: list[LazyTensor] = []
        for i, t in enumerate(parts):
            if not isinstance(t, LazyTensor) or len(t.shape) != 1 or not t.streamable:
                raise corrupt(where, f"partition {i} is not a flat tensor")
            self.parts.append(t)
        dtypes = {t.dtype for t in self.parts}
        if len(dtypes) > 1:
            raise corrupt(where, f"partitions of several dtypes ({', '.join(sorted(map(str, dtypes)))})")
        self.dtype = self.parts[0].dtype if self.parts else torch.float32
        self.home = self.parts[0].path if self.parts else Path(where)  # the path of a 0-element weight
        self.numel = sum(t.numel for t in self.parts)

    def take(self, start: int, count: int) -> list[Piece]:
        """The byte ranges of elements `start` to `start + count`."""
        if start + count > self.numel:
            raise corrupt(self.where, f"a weight needs elements {start}-{start + count} of {self.numel}")
        pieces, base, size = [], 0, self.dtype.itemsize
        for t in self.parts:
            lo, hi = max(start, base), min(start + count, base + t.numel)
            if lo < hi:
                pieces.append(Piece(t.path, t.file_offset + (lo - base) * size, (hi - lo) * size))
            base += t.numel
        return pieces


def weight(flat: Flat, pieces: Sequence[Piece], shape: tuple[int, ...]) -> LazyTensor:
    """A weight of `flat` from its pieces: a plain (streamable) LazyTensor when they are one range of one file."""
    merged: list[Piece] = []
    for p in pieces:
        if merged and merged[-1].path == p.path and merged[-1].offset + merged[-1].nbytes == p.offset:
            merged[-1] = Piece(p.path, merged[-1].offset, merged[-1].nbytes + p.nbytes)
        elif p.nbytes:
            merged.append(p)
    if not merged:
        return LazyTensor(flat.home, flat.dtype, shape)
    if len(merged) == 1:
        return LazyTensor(merged[0].path, flat.dtype, shape, merged[0].offset)
    return GatheredTensor(merged[0].path, flat.dtype, shape, pieces=tuple(merged))


def zero12_weights(param_shapes: Sequence[Mapping[str, tuple[int, ...]]], ranks: Sequence[Sequence[Any]],
                   paddings: Sequence[Sequence[int]] | None, where: str) -> dict[str, LazyTensor]:
    """ZeRO-1/2: `ranks[r][g]` is rank r's fp32 partition of group g."""
    world, out = len(ranks), {}
    if any(len(groups) != len(param_shapes) for groups in ranks):
        raise corrupt(where, f"{len(param_shapes)} param groups in param_shapes but {[len(g) for g in ranks]} partitions per rank")
    for g, shapes in enumerate(param_shapes):
        flat = Flat(f"{where} group {g}", [groups[g] for groups in ranks])
        pads = paddings[g] if paddings is not None else [0] * len(shapes)
        if len(pads) != len(shapes):
            raise corrupt(where, f"group {g} has {len(shapes)} params but {len(pads)} alignment paddings")
        offset = 0
        for (name, shape), pad in zip(shapes.items(), pads, strict=True):
            n = math.prod(shape)
            out[name] = weight(flat, flat.take(offset, n), shape)
            offset += n + pad
        # DeepSpeed pads each group to a multiple of 2 * world (its NCCL alignment): the sizes agree after rounding up
        align = 2 * world
        if -(-offset // align) != -(-flat.numel // align):
            raise corrupt(where, f"group {g}'s params fill {offset} elements of its {flat.numel}")
    return out


def zero3_weights(param_shapes: Sequence[Mapping[str, tuple[int, ...]]], ranks: Sequence[Sequence[Any]],
                  where: str) -> dict[str, LazyTensor]:
    """ZeRO-3: `ranks[r]` is rank r's list of flat fp32 groups."""
    world = len(ranks)
    flats = [Flat(f"{where} rank {r}", groups) for r, groups in enumerate(ranks)]
    if len({f.numel for f in flats}) > 1 or len({f.dtype for f in flats}) > 1:
        raise corrupt(where, "the ranks' partitions differ in size or dtype")
    out, offset = {}, 0
    for shapes in param_shapes:
        for name, shape in shapes.items():
            n = math.prod(shape)
            part = -(-n // world)
            pieces = [p for r, f in enumerate(flats) for p in f.take(offset, max(0, min(part, n - r * part)))]
            out[name] = weight(flats[0], pieces, shape)
            offset += part
    if offset != flats[0].numel:
        raise corrupt(where, f"the params fill {offset} elements of each rank's {flats[0].numel}")
    return out


def zero3_frozen(shapes: Mapping[str, tuple[int, ...]], fragments: Sequence[Mapping[str, Any]], where: str) -> dict[str, LazyTensor]:
    """ZeRO-3 frozen params: each rank's fragment, in rank order, cut to the param's size."""
    out = {}
    for name, shape in shapes.items():
        flat = Flat(f"{where} frozen '{name}'", [f.get(name) for f in fragments])
        out[name] = weight(flat, flat.take(0, math.prod(shape)), shape)
    return out


def corrupt(where: str, why: str) -> CheckpointFormatError:
    """The error for partitions that do not fit the model states' shapes."""
    return CheckpointFormatError(
        f"{where}: the ZeRO partitions do not fit the model states ({why}); files of different saves mixed? "
        "Re-copy the whole tag folder."
    )
