"""What `inspect` shows of one checkpoint: its format, where its weights are, its metadata and tensors."""

from __future__ import annotations

from typing import Any

from .checkpoint import Checkpoint
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
