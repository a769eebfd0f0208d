"""Streaming torch.save-style writer: a zip archive that `torch.load(weights_only=True)` (and `mmap=True`) reads.

The archive holds what torch.save writes for a state dict, under the top folder ``archive/``:

- ``data.pkl``: an OrderedDict name -> tensor, pickled (protocol 2) the way torch pickles tensors, each
  tensor its own storage, referenced by key ``"0"``, ``"1"``, ... in `order`;
- ``.format_version`` (``1``), ``.storage_alignment`` (``64``), ``byteorder`` (``little``);
- ``extra/ckptavg.json``: the provenance metadata, a JSON object of strings (only when there is some;
  torch.load ignores it, `read_extra_metadata` reads it);
- ``data/<key>``: each tensor's bytes, in `order`, written block by block as they arrive, each starting at a
  multiple of 64 bytes;
- ``version`` (``3``) and ``.data/serialization_id`` (40 digits derived from the records' CRCs).

The pickle depends only on the specs, so every size and offset is known before the first byte is written
(see `torch_archive`): the file is allocated whole up front and written once from start to end, through the
same `OutputFile` as safetensors outputs. Nothing in it depends on the time, so equal inputs give equal bytes.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CkptavgError, OutputError, first_line, one_line
from ..layout import DTYPE_NAMES, TensorSpec
from ..read.torch_file import load_torch
from . import torch_archive as arc
from .outfile import OutputFile
from .temp_writer import TempWriter
from .torch_archive import FILE_VERSION, plan_archive, serialization_id
from .verify import check_read_back, check_spec, check_tensor_names


@dataclass(frozen=True)
class Copied:
    """A storage record copied byte for byte from another archive: its key here, and where its bytes lie."""

    key: str
    source: Path
    start: int
    size: int

    def chunks(self, block: int = 16 * 2**20) -> Iterator[bytes]:
        """The record's bytes, read with pread a block at a time."""
        with open(self.source, "rb") as f:
            for at in range(0, self.size, block):
                n = min(block, self.size - at)
                data = os.pread(f.fileno(), n, self.start + at)
                if len(data) != n:
                    raise OutputError(f"{self.source}: shorter than when it was read; nothing was written.")
                yield data


def _tensor_numbers(layout: Sequence[str | Copied]) -> list[int]:
    """For each data record, the number of tensors of `order` before it (its own, for a tensor's)."""
    out, n = [], 0
    for r in layout:
        out.append(n)
        n += isinstance(r, str)
    return out


class TorchWriter(TempWriter):
    """Write tensors to `path` as a torch.save zip archive, in `order`, through a temp file renamed into
    place on success. The same interface as `SafetensorsWriter`.

    Use as a context manager; on any exception (Ctrl-C included) the temp file is removed and
    nothing appears at `path`.
    """

    def __init__(self, path: Path, specs: Sequence[TensorSpec], metadata: dict[str, str], rename: bool = True, *,
                 pickled: bytes | None = None, records: Sequence[str | Copied] | None = None) -> None:
        super().__init__(path, list(specs), rename)  # the state dict's own order: torch.load gives keys as given
        # A training checkpoint around the tensors (`container`) brings its own pickle, and `records`: the data
        # records in the order they lie, each the key of the next tensor of `order` or a record copied whole.
        # torch.load finds a storage's bytes by assuming the records lie in the order the pickle first refers
        # to them, starting with key "0": the pickle's author lays them out so.
        self._layout = list(records) if records is not None else [str(i) for i in range(len(self.order))]
        data = [(r, self.order[i].nbytes) if isinstance(r, str) else (r.key, r.size)
                for i, r in zip(_tensor_numbers(self._layout), self._layout, strict=True)]
        self._records, self._head = plan_archive(self.order, metadata, pickled, data)
        self._crcs = [zlib.crc32(data) for data in self._head]
        self._crc = 0  # of the tensor being written
        self._at = 0  # the data record being written
        self._size = arc.archive_len(self._records)

    def __enter__(self) -> TorchWriter:
        self._file = OutputFile(self.path, self._size)
        try:
            lead = b"".join(rec.local_header() + data + rec.descriptor(crc) for rec, data, crc
                            in zip(self._records[: len(self._head)], self._head, self._crcs, strict=True))
            self._file.write(memoryview(lead))
            self._advance(self._file)
        except BaseException:
            self._file.discard()
            raise
        return self

    def _record(self, i: int) -> arc.Record:
        return self._records[len(self._head) + i]

    def _advance(self, file: OutputFile) -> None:
        """Write the copied records that come next, then the local header of the next tensor's, if one remains."""
        while self._at < len(self._layout) and not isinstance(copied := self._layout[self._at], str):
            rec = self._record(self._at)
            file.write(memoryview(rec.local_header()))
            crc = 0
            for chunk in copied.chunks():
                crc = zlib.crc32(chunk, crc)
                file.write(memoryview(chunk))
            self._crcs.append(crc)
            file.write(memoryview(rec.descriptor(crc)))
            self._at += 1
        if self._at < len(self._layout):
            file.write(memoryview(self._record(self._at).local_header()))

    def _data(self, file: OutputFile, data: memoryview) -> None:
        self._crc = zlib.crc32(data, self._crc)
        file.write(data)

    def _tensor_done(self, file: OutputFile) -> None:
        file.write(memoryview(self._record(self._at).descriptor(self._crc)))
        self._crcs.append(self._crc)
        self._crc = 0
        self._at += 1
        self._advance(file)

    def _tail(self) -> bytes:
        """The last two records and the central directory, now that every CRC is known."""
        version, ident = self._records[-2:]
        ident_data = serialization_id(self._crcs, version.offset)
        crcs = [*self._crcs, zlib.crc32(FILE_VERSION), zlib.crc32(ident_data)]
        return (version.local_header() + FILE_VERSION + version.descriptor(crcs[-2])
                + ident.local_header() + ident_data + ident.descriptor(crcs[-1])
                + arc.directory(self._records, crcs))

    def _complete(self, file: OutputFile) -> None:
        file.write(memoryview(self._tail()))
        if file.nbytes != self._size:  # the file was allocated at the planned size: anything else is a bug
            raise AssertionError(f"wrote {file.nbytes} bytes of a planned {self._size}")


def verify_torch_file(path: Path, specs: Sequence[TensorSpec], check_finite: bool) -> None:
    """Raise OutputError naming the file, the tensor and the problem if `path` does not hold exactly `specs`.

    The file is read by torch's own loader (``torch.load(weights_only=True, mmap=True)``: names, shapes and
    dtypes) and by ckptavg's reader. With `check_finite`, every floating (and complex) tensor is read back
    block by block, with pread through ckptavg's reader, so memory does not grow with the file (touching
    torch's mapping instead would add every page of the file to this process's RSS), and must hold no NaN
    or Inf.
    """
    path = Path(path)
    try:
        theirs = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - torch's loader raises many types on a bad file
        raise OutputError(f"{path}: torch.load cannot read the written file ({type(e).__name__}: "
                          f"{first_line(e)}).") from None
    if not isinstance(theirs, dict):
        raise OutputError(f"{path}: torch.load gives a {type(theirs).__name__}, not a state dict.")
    check_tensor_names(path, set(theirs), specs, "torch.load")
    for spec in specs:
        t = theirs[spec.name]
        if not isinstance(t, torch.Tensor):
            raise OutputError(f"{path}: '{one_line(spec.name, 120)}' is a {type(t).__name__}, not a tensor "
                              "(as read by torch.load).")
        check_spec(path, spec, tuple(t.shape), DTYPE_NAMES.get(t.dtype, str(t.dtype)), "torch.load")
    del theirs
    try:
        ours = load_torch(path, "torch-zip", trust_pickle=False)
    except (CkptavgError, OSError) as e:
        raise OutputError(f"{path}: the written file does not read back ({e}).") from None
    if not isinstance(ours, dict):
        raise OutputError(f"{path}: ckptavg's reader gives a {type(ours).__name__}, not a state dict.")
    check_read_back(path, specs, ours, check_finite)
