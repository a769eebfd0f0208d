"""`--verify` for DCP folder outputs: the written data files, at their temp names, are read back through a
throw-away folder of links under their final names plus the `.metadata`, by ckptavg's reader and by
torch's own (`FileSystemReader.read_metadata` and `torch.distributed.checkpoint.load` into pre-allocated
tensors), before anything is renamed into place.

Both readers must find exactly the written entries, each tensor of its shape and dtype, holding the bytes it was
given (the CRC-32 the writer took of the blocks as they arrived) and, with `check_finite`, no NaN or Inf. Non-tensor
entries are compared by CRC-32 only: torch would unpickle them (`weights_only=False`), and they come from an input.
Memory: ckptavg's reader holds one block of at most `GROUP_BYTES`, torch's one group of tensors of at most
`GROUP_BYTES` (or one tensor).
"""

from __future__ import annotations

import os
import tempfile
import warnings
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import CkptavgError, OutputError, first_line, one_line
from ..layout import DTYPE_NAMES, TensorSpec, byte_view
from ..read.dcp import METADATA, dcp_entries
from ..read.dcp_chunks import BytesEntry, DcpTensor
from ..read.lazy import read_exact
from .verify import check_read_back, check_spec, check_tensor_names, read_blocks

GROUP_BYTES = 256 * 2**20


def verify_dcp(folder: Path, files: Mapping[str, Path], metadata: bytes, specs: Sequence[TensorSpec],
               crcs: Mapping[str, int], check_finite: bool) -> None:
    """Raise OutputError naming the folder, the entry and the problem unless the DCP folder of data files `files`
    (final name -> temp file) and `metadata` holds exactly `specs` (named by fqn) and the entries of `crcs`
    (fqn -> CRC-32 of what was written) that are not tensors."""
    with tempfile.TemporaryDirectory(dir=folder, prefix=".ckptavg-verify-") as tmp:
        view = Path(tmp)
        for name, temp in files.items():
            os.symlink(temp, view / name)
        (view / METADATA).write_bytes(metadata)
        try:
            _ours(view, specs, crcs, check_finite)
            _torchs(view, specs, crcs)
        except OutputError as e:  # name the folder the user asked for, not the view
            raise OutputError(str(e).replace(str(view), str(folder)) + " Nothing was written.") from None


def _ours(view: Path, specs: Sequence[TensorSpec], crcs: Mapping[str, int], check_finite: bool) -> None:
    try:
        entries, _ = dcp_entries(view)
    except CkptavgError as e:
        raise OutputError(f"{view}: the written DCP folder does not read back ({first_line(e)}).") from None
    tensors = {k: v for k, v in entries.items() if isinstance(v, DcpTensor)}
    for name, lazy in tensors.items():
        if lazy.numel and not lazy.streamable:  # each written tensor is one plain chunk, located in its file
            raise OutputError(f"{view}: '{one_line(name, 120)}' does not read back as the chunk it was written as.")
    check_read_back(view, specs, tensors, check_finite)  # names, shapes, dtypes, finiteness
    _check_bytes(view, {k: v for k, v in entries.items() if isinstance(v, BytesEntry)}, specs, crcs)
    for spec in specs:
        crc = 0
        for _, block in read_blocks(view, tensors[spec.name], max(GROUP_BYTES // spec.out_dtype.itemsize, 1)):
            crc = zlib.crc32(block, crc)
        if spec.nbytes and crc != crcs.get(spec.name):
            raise OutputError(f"{view}: '{one_line(spec.name, 120)}' does not hold the values written (as read by "
                              "ckptavg's reader).")


def _check_bytes(view: Path, found: Mapping[str, BytesEntry], specs: Sequence[TensorSpec], crcs: Mapping[str, int]
                 ) -> None:
    """The non-tensor entries: exactly those written, each with the bytes copied."""
    wanted = {k: v for k, v in crcs.items() if k not in {s.name for s in specs}}
    if set(found) != set(wanted):
        odd = sorted(set(found) ^ set(wanted))
        raise OutputError(f"{view}: as read by ckptavg's reader, the non-tensor entries differ ('{one_line(odd[0], 120)}').")
    for fqn, entry in found.items():
        buf = bytearray(entry.stored.length)
        read_exact(entry.stored.file, entry.stored.offset, buf)
        if zlib.crc32(buf) != wanted[fqn]:
            raise OutputError(f"{view}: '{one_line(fqn, 120)}' does not hold the bytes copied into it.")


def _check_values(view: Path, spec: TensorSpec, t: torch.Tensor, crcs: Mapping[str, int], reader: str) -> None:
    t = t.contiguous()
    if t.numel() and zlib.crc32(byte_view(t)) != crcs.get(spec.name):
        raise OutputError(f"{view}: '{one_line(spec.name, 120)}' does not hold the values written (as read by {reader}).")


def _torchs(view: Path, specs: Sequence[TensorSpec], crcs: Mapping[str, int]) -> None:
    """torch's reader: its own unpickling of `.metadata` (names, sizes, dtypes), then `load` in groups."""
    from torch.distributed.checkpoint.filesystem import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    from torch.distributed.checkpoint.state_dict_loader import load

    reader = "torch.distributed.checkpoint"
    try:
        md: Any = FileSystemReader(view).read_metadata()
    except Exception as e:  # noqa: BLE001 - torch raises many types on a bad file
        raise OutputError(f"{view}: {reader} cannot read the .metadata ({type(e).__name__}: {first_line(e)}).") from None
    theirs = {k: v for k, v in md.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)}
    check_tensor_names(view, set(theirs), specs, reader)
    for spec in specs:
        entry = theirs[spec.name]
        check_spec(view, spec, tuple(entry.size), DTYPE_NAMES.get(entry.properties.dtype, "?"), reader)
    for group in _groups(specs):
        state = {s.name: torch.empty(s.shape, dtype=s.out_dtype) for s in group}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "no process group: loading as a single process"
                load(state, storage_reader=FileSystemReader(view), no_dist=True)
        except Exception as e:  # noqa: BLE001
            raise OutputError(f"{view}: {reader}.load fails ({type(e).__name__}: {first_line(e)[:300]}).") from None
        for s in group:
            _check_values(view, s, state[s.name], crcs, reader)  # finiteness: checked by ckptavg's reader


def _groups(specs: Sequence[TensorSpec]) -> list[list[TensorSpec]]:
    """Consecutive tensors of at most `GROUP_BYTES` together (a larger one alone)."""
    groups: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if groups[-1] and size + spec.nbytes > GROUP_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(spec)
        size += spec.nbytes
    return [g for g in groups if g]
