"""Megatron-LM checkpoints: a run folder of `iter_N/` iterations, each in one of Megatron's two formats.

`megatron/training/checkpointing.py` saves into `<save>/iter_{N:07d}/` and then writes the iteration to
`<save>/latest_checkpointed_iteration.txt` (or ``release`` for a released model in `release/`):

- torch_dist (`--ckpt-format torch_dist`, the default): the iteration folder is a DCP folder written by
  `megatron.core.dist_checkpointing.save`: `.metadata`, `__<rank>_<i>.distcp`, `common.pt` (args, iteration,
  scheduler: not weights) and `metadata.json` (`{"sharded_backend": "torch_dist", ...}`). It is read as a DCP
  folder (`dcp.open_dcp_folder`); `.metadata` needs the save-plan records of `dcp_metadata`'s allow-list.
  The tensors keep their stored names, which do not depend on the parallelism (transformer layers stacked
  along a first axis: `decoder.layers.mlp.linear_fc1.weight` of shape [num_layers, ...]).
- legacy (`--ckpt-format torch`): one torch file per model-parallel rank, `iter_N/mp_rank_XX/model_optim_rng.pt`
  (`mp_rank_XX_YYY` with pipeline parallelism), each holding its rank's slice of the weights; see
  `megatron_legacy`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from ..errors import CheckpointFormatError, one_line
from .checkpoint import Checkpoint, LoadOptions
from .dcp import is_dcp_folder, open_dcp_folder
from .metadata import Meta

TRACKER = "latest_checkpointed_iteration.txt"
MEGATRON_METADATA = "metadata.json"
MEGATRON_COMMON = "common.pt"  # args, iteration, scheduler state: never read
LEGACY_FILE = "model_optim_rng.pt"
_ITER = re.compile(r"iter_(\d{1,18})")
_RANK = re.compile(r"mp_rank_\d+(?:_\d+)?")


def megatron_step(path: Path) -> int | None:
    """The iteration of a Megatron checkpoint from the nearest `iter_N` component of `path` (the iteration
    folder, or a rank's file inside it), else None."""
    for part in reversed(path.parts):
        if m := _ITER.fullmatch(part):
            return int(m.group(1))
    return None


def legacy_rank_files(iteration: Path) -> dict[str, Path]:
    """A legacy iteration's torch files by rank folder name (`mp_rank_00`, `mp_rank_01_002`), in name order."""
    try:
        ranks = sorted(p for p in iteration.iterdir() if _RANK.fullmatch(p.name) and (p / LEGACY_FILE).is_file())
    except OSError:
        return {}
    return {p.name: p / LEGACY_FILE for p in ranks}


def is_torch_dist(path: Path) -> bool:
    """True for a folder that `megatron.core.dist_checkpointing.save` wrote: a DCP folder with `metadata.json`."""
    return is_dcp_folder(path) and (path / MEGATRON_METADATA).is_file()


def is_megatron_iteration(path: Path) -> bool:
    """True for an `iter_N` folder holding a Megatron checkpoint, torch_dist or legacy."""
    return (
        _ITER.fullmatch(path.name) is not None and path.is_dir()
        and (is_torch_dist(path) or is_dcp_folder(path) or bool(legacy_rank_files(path)))
    )


def megatron_iterations(run: Path) -> list[Path]:
    """The `iter_N` checkpoint folders of a Megatron run folder, by iteration (children that are not
    checkpoints, such as an iteration whose save was cut short, are not listed)."""
    try:
        found = [p for p in run.iterdir() if is_megatron_iteration(p)]
    except OSError:
        return []
    return sorted(found, key=lambda p: (megatron_step(p) or 0, p.name))


def is_megatron_run(path: Path) -> bool:
    """True for a Megatron save folder: it holds `iter_N/` checkpoints (Megatron also writes
    `latest_checkpointed_iteration.txt` there after each save; a copy may lack it)."""
    return path.is_dir() and bool(megatron_iterations(path))


def latest_iteration(run: Path) -> int | None:
    """The iteration that `latest_checkpointed_iteration.txt` names, or None without one (or for ``release``).

    Raises CheckpointFormatError for a tracker file that holds neither."""
    tracker = run / TRACKER
    if not tracker.is_file():
        return None
    try:
        text = tracker.read_text(encoding="utf-8", errors="replace")[:100].strip()
    except OSError as e:
        raise CheckpointFormatError(f"{tracker}: cannot read ({e.strerror}).") from None
    if text == "release":
        return None
    if not text.isdigit() or len(text) > 18:
        raise CheckpointFormatError(f"{tracker}: holds '{one_line(text, 40)}', not an iteration; the file is corrupt.")
    return int(text)


def check_torch_dist(path: Path) -> None:
    """Refuse a Megatron folder of another sharded backend (zarr, written by megatron-core before torch_dist)."""
    try:
        info = json.loads((path / MEGATRON_METADATA).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointFormatError(f"{path / MEGATRON_METADATA}: unreadable ({type(e).__name__}).") from None
    backend = info.get("sharded_backend") if isinstance(info, dict) else None
    if backend != "torch_dist":
        raise CheckpointFormatError(
            f"{path}: a Megatron checkpoint of sharded backend '{one_line(backend, 40)}'; ckptavg reads torch_dist "
            "(convert it with Megatron's tools/checkpoint, or save with --ckpt-format torch_dist)."
        )


def open_megatron_folder(path: Path, options: LoadOptions = LoadOptions()) -> Checkpoint:
    """Open a torch_dist iteration folder lazily, as a DCP folder; the step is its iteration (`iter_N`).

    `common.pt` (args, scheduler state) is never read; `_extra_state` entries are noted and left out (see
    `dcp.extra_state_note`)."""
    check_torch_dist(path)
    ckpt = open_dcp_folder(path, options)
    step = megatron_step(path)
    if step is not None:
        ckpt.meta = Meta(step, "Megatron iter_N folder").fill(ckpt.meta)
    ckpt.other_entries = ckpt.other_entries + ["common.pt (args, iteration, scheduler: not read)"]
    return ckpt
