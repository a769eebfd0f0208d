"""What `inspect` shows of one checkpoint: its format, where its weights are, its metadata and tensors."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from ..errors import CheckpointFormatError, CkptavgError, listing
from .checkpoint import Checkpoint, LoadOptions, PathLike
from .discover import find_checkpoints
from .layouts import is_checkpoint_folder, open_checkpoint
from .sidecars import parse_provenance


def describe(c: Checkpoint) -> dict[str, Any]:
    """A checkpoint as plain JSON-able values, with a file's ckptavg provenance parsed (``ckptavg``)."""
    info: dict[str, Any] = {
        "path": str(c.path), "format": c.format, "location": c.location, "stripped_prefix": c.stripped_prefix,
        "step": c.meta.step, "step_source": c.meta.step_source,
        "epoch": c.meta.epoch, "epoch_source": c.meta.epoch_source,
        "other_entries": c.other_entries, "file_metadata": c.file_metadata,
        "metrics": [{"name": k, "value": v, "source": s} for k, (v, s) in sorted(c.meta.metrics.items())],
        "tensors": [
            {"name": k, "dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape), "bytes": t.nbytes}
            for k, t in c.tensors.items()
        ],
        "bytes": c.nbytes,
    }
    provenance = parse_provenance(c.file_metadata)  # None when absent or damaged: the raw metadata is shown
    if provenance is not None:
        info["ckptavg"] = provenance
    return info


def refuse_folder(folder: Path) -> None:
    """`inspect` of a folder of checkpoints (or of a folder of runs): say what is inside and what to run."""
    try:
        found = find_checkpoints(folder)
    except CkptavgError:
        found = []
    if found:
        raise CheckpointFormatError(
            f"{folder}: a folder of {len(found)} checkpoints ({listing([p.name for p in found], 3)}), not one "
            f"checkpoint; inspect one of them, or see them all with `ckptavg plan swa {folder}`.")
    runs = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        with contextlib.suppress(CkptavgError, OSError):
            if n := len(find_checkpoints(sub)):
                runs.append(f"{sub.name}/ ({n})")
    hint = f"; its subfolders hold checkpoints: {listing(runs, 5)}" if runs else ""
    raise CheckpointFormatError(f"{folder}: a folder, not a checkpoint{hint}.")


def inspect_checkpoint(path: PathLike, load: LoadOptions = LoadOptions()) -> dict[str, Any]:
    """Describe one checkpoint without reading its tensor data: format, weights location, metadata, tensors.

    For a file written by ckptavg, the ``ckptavg`` entry holds its provenance (version, method,
    parameters, inputs with their weights).
    """
    folder = Path(path)
    if folder.is_dir() and not is_checkpoint_folder(folder):
        refuse_folder(folder)
    return describe(open_checkpoint(path, load))
