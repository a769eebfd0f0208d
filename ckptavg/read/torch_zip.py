"""Torch zip archives: the checks of the archive's directory and records before anything is unpickled.

torch.save writes a zip of stored (uncompressed) records: `data.pkl`, the pickle, and one record per
storage under `data/`. Tensors are read in place with pread at offsets found here, so every record must
be where the directory says, under its own name, uncompressed, inside the file, and apart from the others.
"""

from __future__ import annotations

import os
import re
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import CheckpointFormatError, one_line

# A compressed record that inflates to more than this is refused (torch never compresses; a "zip bomb" would).
MAX_INFLATED_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class Archive:
    """What the fast path and the checks of tensor extents need from an archive."""

    records: dict[str, tuple[int, int]]  # tensor data record name: (byte offset in the file, size)
    pickled: bytes  # data.pkl
    prefix: str  # the archive's top folder, "archive/" for torch.save


def check_torch_zip(path: Path) -> Archive:
    """Check the archive's directory; return where each tensor data record lies, and the pickle."""
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
            _check_compression(path, z.infolist())
            if any(n.endswith("/constants.pkl") for n in names):
                raise CheckpointFormatError(
                    f"{path}: this is a TorchScript archive; save the model's state_dict() instead."
                )
            pickles = [n for n in names if n.endswith("/data.pkl")]
            if not pickles:
                raise CheckpointFormatError(f"{path}: zip file without data.pkl, not a torch checkpoint.")
            order = [n for n in names if n.endswith("/byteorder")]
            if order and z.read(order[0]).strip() != b"little":
                raise CheckpointFormatError(
                    f"{path}: big-endian torch checkpoints are not supported; re-save on a little-endian machine."
                )
            records = data_records(path, z.infolist(), z.start_dir)
            return Archive(records, z.read(pickles[0]), pickles[0][: -len("data.pkl")])
    except CheckpointFormatError:  # a ValueError too: keep the message as it is
        raise
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError, RuntimeError) as e:
        # ValueError/EOFError/NotImplementedError: zipfile's answers to corrupt fields and unknown compressions;
        # RuntimeError: a record flagged as encrypted (found by fuzzing)
        raise CheckpointFormatError(f"{path}: broken zip archive ({e}); the file may be truncated.") from None


def _check_compression(path: Path, infos: list[zipfile.ZipInfo]) -> None:
    for info in infos:
        if info.compress_type == zipfile.ZIP_STORED:
            continue
        if "/data/" in info.filename:  # tensors are read in place with pread: compressed bytes would be garbage
            raise CheckpointFormatError(
                f"{path}: tensor data is compressed in the archive ('{info.filename}'); re-save it with torch.save."
            )
        if info.file_size > MAX_INFLATED_BYTES:
            raise CheckpointFormatError(
                f"{path}: '{info.filename}' would inflate to {info.file_size} bytes; refusing a likely zip bomb."
            )


def data_records(path: Path, infos: list[zipfile.ZipInfo], directory_at: int | None = None, *, base: int = 0,
                 length: int | None = None) -> dict[str, tuple[int, int]]:
    """Where each tensor record's bytes start in the file (after its local header), and how many there are.

    torch (on the meta device) computes each storage's offset from the sizes declared in the pickle; a
    corrupt or hand-made archive can make those point anywhere, so they are checked against these. Every
    record must be where the central directory says, under its own name, and apart from every other: a
    directory entry pointing at another record's bytes would make those bytes a second storage.
    `directory_at`: where the central directory starts, which no record may reach (None: not checked).
    `base`, `length`: an archive that is bytes `base` to `base + length` of the file (a DCP chunk), whose
    directory's offsets count from `base`.
    """
    size = base + length if length is not None else path.stat().st_size
    records: dict[str, tuple[int, int]] = {}
    extents: list[tuple[int, int, str]] = []
    fd = os.open(path, os.O_RDONLY)
    try:
        for info in infos:
            # the header and, if it is the name the directory gives, the name: one read
            local = os.pread(fd, 30 + len(info.orig_filename.encode("utf-8", "replace")), base + info.header_offset)
            if len(local) < 30 or local[:4] != b"PK\x03\x04":
                raise CheckpointFormatError(f"{path}: broken zip archive (bad local header of '{one_line(info.filename, 120)}').")
            name_len, extra_len = struct.unpack("<HH", local[26:30])
            local_name = local[30:30 + name_len]
            if len(local_name) != name_len or local_name.decode(
                "utf-8" if info.flag_bits & 0x800 else "cp437", "replace"
            ) != info.orig_filename:
                raise CheckpointFormatError(
                    f"{path}: broken zip archive (the directory entry '{one_line(info.filename, 120)}' points at "
                    f"the record '{one_line(local_name.decode('cp437'), 120)}'); the file is corrupt or crafted."
                )
            start = base + info.header_offset + 30 + name_len + extra_len
            if start + info.compress_size > size:
                raise CheckpointFormatError(
                    f"{path}: record '{one_line(info.filename, 120)}' ends past the end of the file; the file is truncated."
                )
            extents.append((base + info.header_offset, start + info.compress_size, info.filename))
            if not re.fullmatch(r"[^/]+/data/\d+", info.filename):
                continue
            if info.external_attr & 0x10:  # the MS-DOS directory bit: torch's reader then returns no bytes
                raise CheckpointFormatError(f"{path}: broken zip archive ('{info.filename}' is marked as a directory).")
            records[info.filename] = (start, info.file_size)
    finally:
        os.close(fd)
    extents.sort()
    after = [(base + directory_at, 0, "")] if directory_at is not None else []
    for (_, end, record), (begin, _, other) in zip(extents, [*extents[1:], *after], strict=False):
        if end > begin:
            what = f"record '{one_line(other, 120)}'" if other else "the central directory"
            raise CheckpointFormatError(
                f"{path}: broken zip archive (record '{one_line(record, 120)}' overlaps {what}); the file is corrupt or crafted."
            )
    return records
