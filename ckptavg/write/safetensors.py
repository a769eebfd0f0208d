"""Streaming safetensors writer: header first, then each tensor as it is produced; atomic rename.

The layout follows safetensors' own `save_file` (tensors ordered by dtype rank, then name; the JSON
header padded with spaces to a multiple of 8), so the bytes are deterministic.
"""

from __future__ import annotations

import json
import os
import stat
import struct
from collections.abc import Sequence
from pathlib import Path

from ..errors import OutputError
from ..layout import DTYPE_NAMES, TensorSpec
from .outfile import OutputFile
from .placing import file_kind
from .temp_writer import TempWriter

# safetensors' write order: larger-rank dtypes first (its Dtype enum, descending).
_RANK = [
    "BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "U16", "F16", "BF16",
    "I32", "U32", "F32", "C64", "F64", "I64", "U64",
]


def write_order(specs: Sequence[TensorSpec]) -> list[TensorSpec]:
    """The order in which tensors lie in the file."""
    return sorted(specs, key=lambda s: (-_RANK.index(DTYPE_NAMES[s.out_dtype]), s.name))


def check_output(output: Path, inputs: Sequence[Path], force: bool) -> None:
    """Refuse an output that is an input, that exists (without force), that is not a regular file (a
    directory, FIFO, socket or device: even with force), or whose directory is missing.

    A symbolic link at `output`, dangling or not, exists: without force it is refused; with force the link
    itself is replaced by the new file, and its target is left alone.
    """
    try:
        mode: int | None = os.lstat(output).st_mode
    except OSError:
        mode = None
    if output.is_dir():
        raise OutputError(f"{output}: is a directory; give a file path such as {output / 'avg.safetensors'}.")
    if mode is not None and not (stat.S_ISREG(mode) or stat.S_ISLNK(mode)):
        raise OutputError(f"{output}: is {file_kind(mode)}, not a regular file; ckptavg writes only regular files "
                          "(even with force). Give another output path.", params=("force",))
    parent = output.parent
    if not parent.is_dir():
        raise OutputError(f"{output}: directory {parent} does not exist; create it first.")
    for src in inputs:
        if _same(output, src):
            raise OutputError(f"{output}: is one of the inputs; choose another output path.")
    if mode is not None and not force:
        link = " (a symbolic link" + ("" if output.exists() else " to nothing") + ")" if stat.S_ISLNK(mode) else ""
        raise OutputError(f"{output}: already exists{link}; pass force to overwrite it.", params=("force",))
    if not os.access(parent, os.W_OK):
        raise OutputError(f"{output}: directory {parent} is not writable.")


def _same(output: Path, src: Path) -> bool:
    if output.resolve() == src.resolve():
        return True
    try:
        return output.exists() and os.path.samefile(output, src)
    except OSError:
        return False


class SafetensorsWriter(TempWriter):
    """Write tensors to `path` in `write_order`, through a temp file renamed into place on success.

    Use as a context manager; on any exception (Ctrl-C included) the temp file is removed and
    nothing appears at `path`.
    """

    def __init__(self, path: Path, specs: Sequence[TensorSpec], metadata: dict[str, str], rename: bool = True) -> None:
        super().__init__(path, write_order(specs), rename)
        self._header = self._build_header(metadata)

    def _build_header(self, metadata: dict[str, str]) -> bytes:
        header: dict[str, object] = {"__metadata__": dict(sorted(metadata.items()))} if metadata else {}
        offset = 0
        for s in self.order:
            header[s.name] = {
                "dtype": DTYPE_NAMES[s.out_dtype], "shape": list(s.shape), "data_offsets": [offset, offset + s.nbytes]
            }
            offset += s.nbytes
        raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        raw += b" " * (-len(raw) % 8)
        return struct.pack("<Q", len(raw)) + raw

    def __enter__(self) -> SafetensorsWriter:
        self._file = OutputFile(self.path, len(self._header) + sum(s.nbytes for s in self.order))
        try:
            self._file.write(memoryview(self._header))
        except BaseException:
            self._file.discard()
            raise
        return self
