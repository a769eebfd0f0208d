"""The bytes of a DCP data file (`__0_<i>.distcp`) and of the `.metadata` that describes it, as
`torch.distributed.checkpoint.save` lays them out with its default `FileSystemWriter`.

A data file is a concatenation of items: each non-tensor entry's bytes (copied verbatim from the newest input:
they are already `torch.save` archives of the value), then one `torch.save` archive per tensor, holding it
whole as one chunk (`torch_archive`, pickling the tensor itself rather than a state dict). An archive's size
depends only on the tensor's name-free spec, so every offset is known before the first byte is written, and
the `.metadata` (torch's own dataclasses, pickled) can be built from the plan alone.

Each tensor's CRC-32 is taken from the blocks as they are handed over (`write_part`), before they reach the
file: the zip descriptor needs it, and `--verify` compares it with what both readers read back.
"""

from __future__ import annotations

import io
import pickle
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointFormatError, OutputError
from ..layout import TensorSpec, byte_view
from ..read.dcp_chunks import Stored
from ..read.lazy import read_exact
from . import torch_archive as arc
from .outfile import OutputFile
from .temp_writer import TempWriter

DCP_VERSION = "1.0.0"  # torch.distributed.checkpoint.filesystem.CURRENT_DCP_VERSION
COPY_BYTES = 16 * 2**20  # a carried entry is copied this much at a time


@dataclass(frozen=True)
class Carried:
    """A non-tensor entry of the newest input (Transformer Engine's `_extra_state`, a counter), copied verbatim."""

    fqn: str
    stored: Stored


@dataclass(frozen=True)
class TensorArchive:
    """The `torch.save` archive of one tensor: its records, and the contents of those before the tensor's data."""

    records: list[arc.Record]
    head: list[bytes]

    @staticmethod
    def of(spec: TensorSpec) -> TensorArchive:
        records, head = arc.plan_archive([spec], {}, pickled=arc.tensor_pickle(spec))
        return TensorArchive(records, head)

    @property
    def size(self) -> int:
        return arc.archive_len(self.records)

    def lead(self) -> bytes:
        """Everything before the tensor's data: the leading records and the data record's local header."""
        return b"".join(rec.local_header() + data + rec.descriptor(zlib.crc32(data))
                        for rec, data in zip(self.records, self.head, strict=False)) + self.records[len(self.head)].local_header()

    def tail(self, crc: int) -> bytes:
        """Everything after the tensor's data (of CRC-32 `crc`): its descriptor, the last records, the directory."""
        data, version, ident = self.records[len(self.head):]
        crcs = [*(zlib.crc32(h) for h in self.head), crc]
        ident_data = arc.serialization_id(crcs, version.offset)
        crcs += [zlib.crc32(arc.FILE_VERSION), zlib.crc32(ident_data)]
        return (data.descriptor(crc) + version.local_header() + arc.FILE_VERSION + version.descriptor(crcs[-2])
                + ident.local_header() + ident_data + ident.descriptor(crcs[-1]) + arc.directory(self.records, crcs))


def file_items(specs: Sequence[TensorSpec], carried: Sequence[Carried]
               ) -> list[tuple[Carried | TensorSpec, int, int]]:
    """(item, offset, length) of every item of a data file: the carried entries, then the tensors, one after
    another."""
    items: list[tuple[Carried | TensorSpec, int, int]] = []
    at = 0
    for c in carried:
        items.append((c, at, c.stored.length))
        at += c.stored.length
    for spec in specs:
        size = TensorArchive.of(spec).size
        items.append((spec, at, size))
        at += size
    return items


class DcpWriter(TempWriter):
    """Write a DCP data file: the `carried` entries' bytes, then each tensor of `specs` as a `torch.save` archive,
    streamed block by block, through a temp file (the same interface as `SafetensorsWriter`).

    `crcs` maps each written item's name (a tensor's spec name, a carried entry's fqn) to the CRC-32 of the
    bytes it was given: `--verify` checks what the readers find against it.
    """

    def __init__(self, path: Path, specs: Sequence[TensorSpec], metadata: dict[str, str], rename: bool = True,
                 carried: Sequence[Carried] = ()) -> None:
        super().__init__(path, list(specs), rename)
        self._carried = list(carried)
        self._archives = [TensorArchive.of(s) for s in self.order]
        self._size = sum(c.stored.length for c in self._carried) + sum(a.size for a in self._archives)
        self._crc = 0
        self.crcs: dict[str, int] = {}

    def __enter__(self) -> DcpWriter:
        self._file = OutputFile(self.path, self._size)
        try:
            for c in self._carried:
                self.crcs[c.fqn] = _copy(c, self._file)
            if self._archives:
                self._file.write(memoryview(self._archives[0].lead()))
        except BaseException:
            self._file.discard()
            raise
        return self

    def write_part(self, block: torch.Tensor) -> None:
        """Take the CRC-32 of the block as given, then write it (see `TempWriter.write_part`)."""
        t = block.contiguous()
        if t.numel() and t.dtype == self.order[self._next].out_dtype:
            self._crc = zlib.crc32(byte_view(t), self._crc)
        super().write_part(t)

    def _tensor_done(self, file: OutputFile) -> None:
        i = self._next - 1
        self.crcs[self.order[i].name] = self._crc
        after = self._archives[i].tail(self._crc) + (self._archives[i + 1].lead() if i + 1 < len(self._archives) else b"")
        self._crc = 0
        file.write(memoryview(after))

    def _complete(self, file: OutputFile) -> None:
        if file.nbytes != self._size:  # the file was allocated at the planned size: anything else is a bug
            raise AssertionError(f"wrote {file.nbytes} bytes of a planned {self._size}")


def _copy(c: Carried, file: OutputFile) -> int:
    """Copy a carried entry's bytes from its input file into `file`; their CRC-32."""
    crc, done = 0, 0
    while done < c.stored.length:
        buf = bytearray(min(COPY_BYTES, c.stored.length - done))
        try:
            read_exact(c.stored.file, c.stored.offset + done, buf)
        except (CheckpointFormatError, OSError) as e:
            raise OutputError(f"{file.path}: cannot copy '{c.fqn}' from {c.stored.file} ({e}).") from None
        crc = zlib.crc32(buf, crc)
        file.write(memoryview(buf))
        done += len(buf)
    return crc


def metadata_pickle(files: Sequence[tuple[str, Sequence[TensorSpec], Sequence[Carried]]], names: Mapping[str, str],
                    planner_data: Mapping[str, Any] | None) -> bytes:
    """The `.metadata` of a DCP folder whose data files are `files` (name, tensors, carried entries): torch's own
    `Metadata`, each tensor one chunk at offset 0, pickled as `FileSystemWriter.finish` does. `names` maps a spec
    name to the fqn it is saved under. No `storage_meta` (a save id and the path): the bytes depend only on the
    plan, and readers fill in an empty one."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (
        BytesStorageMetadata,
        ChunkStorageMetadata,
        Metadata,
        MetadataIndex,
        TensorProperties,
        TensorStorageMetadata,
    )

    entries: dict[str, Any] = {}
    storage: dict[Any, Any] = {}
    for file, specs, carried in files:
        for item, offset, length in file_items(specs, carried):
            if isinstance(item, Carried):
                entries[item.fqn] = BytesStorageMetadata()
                storage[MetadataIndex(item.fqn)] = _StorageInfo(file, offset, length)
                continue
            spec = item
            fqn, start = names[spec.name], torch.Size([0] * len(spec.shape))
            entries[fqn] = TensorStorageMetadata(
                TensorProperties(dtype=spec.out_dtype), torch.Size(spec.shape),
                [ChunkStorageMetadata(offsets=start, sizes=torch.Size(spec.shape))])
            storage[MetadataIndex(fqn, start)] = _StorageInfo(file, offset, length)
    md = Metadata(entries, dict(planner_data) if planner_data is not None else None, storage, version=DCP_VERSION)
    buf = io.BytesIO()
    pickle.dump(md, buf)
    return buf.getvalue()
