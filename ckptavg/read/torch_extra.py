"""The provenance metadata that ckptavg's torch writer stores in a torch archive, beside the state dict.

`torch.load` ignores the record (``<top>/extra/ckptavg.json``); `inspect` shows it like a safetensors file's
``__metadata__``.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

from ..errors import CheckpointFormatError, first_line

ARCHIVE = "archive/"  # the top folder of every record of an archive ckptavg writes
EXTRA_METADATA = "extra/ckptavg.json"
MAX_METADATA_BYTES = 16 * 1024 * 1024  # a larger extra record is not ours: refuse to inflate it


def extra_metadata_from(archive: zipfile.ZipFile, prefix: str = ARCHIVE) -> dict[str, str]:
    """The provenance metadata of an open torch archive whose top folder is `prefix`; {} when it has none.

    Raises:
        CheckpointFormatError: the record is there but is not a JSON object of strings.
    """
    name = prefix + EXTRA_METADATA
    try:
        info = archive.getinfo(name)
    except KeyError:
        return {}
    where = f"{archive.filename}: '{name}'"
    if info.file_size > MAX_METADATA_BYTES:
        raise CheckpointFormatError(f"{where} holds {info.file_size} bytes, more than metadata can; the file is corrupt.")
    try:
        meta = json.loads(archive.read(info))
    except (ValueError, zipfile.BadZipFile, OSError, EOFError, NotImplementedError, RuntimeError) as e:
        raise CheckpointFormatError(f"{where} is unreadable ({first_line(e)}).") from None
    if not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise CheckpointFormatError(f"{where} is not a JSON object of strings.")
    return meta


def read_extra_metadata(path: Path) -> dict[str, str]:
    """The provenance metadata `TorchWriter` stored in a torch archive (``<top>/extra/ckptavg.json``), as
    the `metadata` it was given; {} for archives without it, such as torch.save's own.

    Raises:
        CheckpointFormatError: not a zip archive, or the record is not a JSON object of strings.
    """
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
            prefix = names[0].split("/", 1)[0] + "/" if names and "/" in names[0] else ARCHIVE
            return extra_metadata_from(z, prefix)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise CheckpointFormatError(f"{path}: broken zip archive ({first_line(e)}).") from None
