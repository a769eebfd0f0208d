"""Hugging Face style output folders: `model.safetensors`, or shards plus `model.safetensors.index.json`,
and the newest input folder's sidecar files (config, tokenizer), so the result loads like the inputs.

Every file is written to a temp name first; only when all of them are complete are they renamed into
place (shards, then sidecars, then the index last), so a failure leaves the folder as it was.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import IO, Any

from ..errors import OutputError, PlanError, listing
from ..layout import TensorSpec
from ..read.checkpoint import Checkpoint
from ..read.dcp import METADATA, PROVENANCE
from ..read.files import training_state
from ..read.hf_folder import HF_WEIGHT_FILES
from ..read.megatron import MEGATRON_COMMON, MEGATRON_METADATA, TRACKER
from .placing import check_replaceable, temp_beside, usual_mode

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
_RUN_FOLDER = re.compile(r"iter_\d+|release")  # a Megatron run's iteration folders
STEMS = ("diffusion_pytorch_model", "adapter_model")  # diffusers' and PEFT's names for a folder's weights


def weights_stem(ckpts: Sequence[Checkpoint]) -> str:
    """The name a folder output's weights take: the newest input's when it is a diffusers or PEFT folder (so
    their `from_pretrained` finds them), else transformers' `model`."""
    names = {lazy.path.name for lazy in ckpts[-1].tensors.values()} if ckpts else set()
    return next((stem for stem in STEMS if any(n.startswith(stem) for n in names)), "model")


def index_name(stem: str) -> str:
    return f"{stem}.safetensors.index.json"
# Files of a training folder that are not part of the model: never copied into the output.
TRAINING_FILES = re.compile(
    r"(trainer_state\.json|training_args\.bin|optimizer\.(pt|bin)|scheduler\.(pt|bin)|scaler\.pt|rng_state.*\.pth"
    r"|.*\.(safetensors|bin|pt|pth|ckpt|distcp)|.*\.index\.json|\.metadata|ckptavg\.json)"
)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


MAX_SHARD_BYTES = 2**63 - 1  # what a file offset can be


def parse_size(text: str) -> int:
    """'5GB' (decimal, as Hugging Face counts), '500MiB' (binary) or a byte count -> bytes (at most 2**63 - 1).

    Read exactly (a fraction, not a float), so a number of any length gives a PlanError, never an overflow.
    """
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", text, re.IGNORECASE)
    if not m or not m.group(1).strip("0."):
        raise PlanError(f"max_shard_size {text[:40]!r}: give a size such as 5GB, 500MB or 2GiB.",
                        params=("max_shard_size",))
    whole = m.group(1).split(".")[0].lstrip("0")
    # more than 20 digits is more than 2**63 before any unit, and may be too long to convert (int's digit limit)
    size = MAX_SHARD_BYTES + 1 if len(whole) > 20 else int(Fraction(m.group(1)[:60]) * _UNITS[(m.group(2) or "").upper()])
    if size > MAX_SHARD_BYTES:
        raise PlanError(f"max_shard_size {text[:40]!r}: too large; give at most {MAX_SHARD_BYTES} bytes "
                        "(8EiB), e.g. 5GB.", params=("max_shard_size",))
    if size < 1:
        raise PlanError(f"max_shard_size {text[:40]!r}: is less than one byte; give a size such as 5GB.",
                        params=("max_shard_size",))
    return size


def is_folder_output(output: str | os.PathLike[str]) -> bool:
    """`-o DIR/` (trailing slash, so pass the text, not a Path) or an existing directory asks for a folder."""
    return Path(output).is_dir() or os.fspath(output).endswith(os.sep)


def balance(sizes: Sequence[int], parts: int) -> list[int]:
    """Assign items to `parts` bins, largest first to the least loaded bin (ties: the lowest bin).

    Deterministic, so every rank computes the same assignment without talking to the others.
    """
    load = [0] * parts
    owner = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        b = min(range(parts), key=lambda b: (load[b], b))
        owner[i] = b
        load[b] += sizes[i]
    return owner


@dataclass(frozen=True)
class Shard:
    """One output file and the tensors it holds."""

    name: str
    specs: tuple[TensorSpec, ...]

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.specs)


def plan_shards(
    specs: Sequence[TensorSpec], max_bytes: int | None, like: Checkpoint | None = None, parts: int = 1,
    stem: str = "model",
) -> list[Shard]:
    """Assign tensors to files: the first input's layout (`like`), or greedily in order up to `max_bytes`
    per file (a tensor larger than that gets a file of its own), or `parts` files of balanced size (one per
    rank of a distributed job), or one file."""
    if like is not None:
        return _like_input(specs, like)
    if max_bytes is None and parts > 1:
        owner = balance([s.nbytes for s in specs], parts)
        return _numbered([[s for s, o in zip(specs, owner, strict=True) if o == p] for p in range(parts)], stem)
    groups: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if max_bytes is not None and groups[-1] and size + spec.nbytes > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(spec)
        size += spec.nbytes
    return _numbered(groups, stem)


def _numbered(groups: list[list[TensorSpec]], stem: str = "model") -> list[Shard]:
    groups = [g for g in groups if g]
    if len(groups) <= 1:
        return [Shard(f"{stem}.safetensors", tuple(groups[0] if groups else ()))]
    n = len(groups)
    return [Shard(f"{stem}-{i:05d}-of-{n:05d}.safetensors", tuple(g)) for i, g in enumerate(groups, 1)]


def _like_input(specs: Sequence[TensorSpec], like: Checkpoint) -> list[Shard]:
    files = {like.tensors[s.name].path.name for s in specs}
    if not like.path.is_dir() or len(files) < 2:
        raise PlanError(f"shards_like_input: {like.path} is not a sharded Hugging Face folder; "
                        "use max_shard_size instead.", params=("shards_like_input", "max_shard_size"))
    by_file: dict[str, list[TensorSpec]] = {}
    for s in specs:
        name = like.tensors[s.name].path.name
        if not name.endswith(".safetensors"):  # .bin shards become safetensors shards of the same number
            name = re.sub(r"^pytorch_model", "model", name.rsplit(".", 1)[0]) + ".safetensors"
        by_file.setdefault(name, []).append(s)
    return [Shard(name, tuple(group)) for name, group in sorted(by_file.items())]


def index_json(shards: Sequence[Shard]) -> str:
    """The model.safetensors.index.json that transformers reads: total size and tensor -> file.
    (The provenance is in every shard's own metadata.)"""
    weight_map = {s.name: shard.name for shard in shards for s in shard.specs}
    body = {"metadata": {"total_size": sum(sh.nbytes for sh in shards)},
            "weight_map": dict(sorted(weight_map.items()))}
    return json.dumps(body, indent=2) + "\n"


def sidecars(ckpts: Sequence[Checkpoint]) -> list[Path]:
    """Files to copy: those beside the newest input's weights (a component's own folder, such as diffusers'
    `unet_ema/` with its config.json) that are neither weights nor training state."""
    folders = [c for c in ckpts if c.path.is_dir()]
    if not folders:
        return []
    newest = folders[-1]
    parents = {lazy.path.parent for lazy in newest.tensors.values()}
    source = parents.pop() if len(parents) == 1 else newest.path
    return sorted(p for p in source.iterdir()
                  if p.is_file() and p.name not in HF_WEIGHT_FILES and not TRAINING_FILES.fullmatch(p.name)
                  and training_state(p) is None)


def check_folder(out: Path, names: Sequence[str], inputs: Sequence[Path], force: bool) -> None:
    """Refuse an output folder that holds an input, or files we would overwrite (without force), or whose
    files' names are taken by something other than a regular file or link (even with force).

    A symbolic link at `out` that leads nowhere is refused: ckptavg would have to create its target. A link
    (dangling or not) at one of the files' names exists: with force it is replaced itself, not its target.
    """
    if out.is_symlink() and not out.exists():
        raise OutputError(f"{out}: is a symbolic link to nothing; give a new or existing folder.")
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: exists and is not a directory; give a new or existing folder.")
    if not out.parent.is_dir():
        raise OutputError(f"{out}: parent directory {out.parent} does not exist; create it first.")
    resolved = out.resolve()
    for src in inputs:
        if src.resolve().parent == resolved or src.resolve() == resolved:
            raise OutputError(f"{out}: holds the input {src}; choose another output folder.")
    stale = _other_weights(out, names) if out.is_dir() else []
    if stale:
        raise OutputError(f"{out}: holds other weight files ({listing(stale, 3)}) that readers would mix with the new "
                          "ones or load instead; remove them or choose an empty folder.")
    for n in names:
        check_replaceable(out / n)
    clash = [n for n in names if os.path.lexists(out / n)]
    if clash and not force:
        raise OutputError(f"{out}: already holds {', '.join(clash[:3])}; pass force to overwrite.", params=("force",))


def _other_weights(out: Path, names: Sequence[str]) -> list[str]:
    """The entries of folder `out` that hold another checkpoint than the files `names` (paths in `out`) write:
    Hugging Face weights, a DCP folder's (`.metadata`, `*.distcp`, ckptavg's `ckptavg.json`), a Megatron run's
    (`iter_N/` or `release/` folders, the tracker file) unless the output is a Megatron run itself (it writes
    the tracker), whose other iterations are its own. Left beside the new files, they would be read instead of
    them by one reader or another (torch's `dcp.load` reads `.metadata`, Megatron the tracker), or mixed in."""
    ours = {Path(n).parts[0] for n in names}
    run = TRACKER in ours
    # a Megatron iteration's common state and backend file, which our DCP folder would seem to belong with
    megatron = {MEGATRON_COMMON, MEGATRON_METADATA} if (out / METADATA).exists() or METADATA in ours else {MEGATRON_COMMON}
    return [f"{p.name}{os.sep}" if p.is_dir() else p.name for p in sorted(out.iterdir(), key=lambda p: p.name)
            if p.name not in ours and (_is_weights(p.name) or p.name in megatron or (not run and _is_run_entry(p)))]


def _is_weights(name: str) -> bool:
    return (name in HF_WEIGHT_FILES or name.endswith((".safetensors", ".index.json", ".distcp"))
            or name.startswith("pytorch_model") or name in (METADATA, PROVENANCE))


def _is_run_entry(p: Path) -> bool:
    """A Megatron run's tracker file or one of its iteration folders."""
    return p.name == TRACKER or (_RUN_FOLDER.fullmatch(p.name) is not None and p.is_dir())


def copy_temp(src: Path, folder: Path) -> Path:
    """Copy a sidecar file to a temp name in `folder`, to be renamed into place with the shards."""

    def fill(f: IO[bytes]) -> None:
        with open(src, "rb") as s:
            shutil.copyfileobj(s, f)

    return _filled_temp(folder, src.name, fill, f"cannot copy from {src}")


def write_text_temp(folder: Path, name: str, text: str) -> Path:
    """Write `text` to a temp name in `folder`, to be renamed into place with the shards."""
    return _filled_temp(folder, name, lambda f: f.write(text.encode()), "cannot write")


def _filled_temp(folder: Path, name: str, fill: Callable[[IO[bytes]], object], failure: str) -> Path:
    """A temp file for `name` in `folder`, filled and sealed; on any failure (Ctrl-C too: commit()'s clean-up
    does not know the file yet) it is removed, and an OSError becomes one OutputError naming `failure`."""
    fd, tmp = temp_beside(folder, name)
    try:
        with os.fdopen(fd, "wb") as f:
            fill(f)
            _seal(f)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise OutputError(f"{folder / name}: {failure} ({e.strerror}).") from None
        raise
    return tmp


def _seal(f: IO[Any]) -> None:
    """Make a written temp file durable, with the mode of the shards beside it, before its rename."""
    f.flush()
    os.fsync(f.fileno())
    usual_mode(f.fileno())
