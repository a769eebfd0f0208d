"""How an average is computed and written: the output dtype, the accumulator, the device, sharding, checks."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import CkptavgWarning, PlanError
from ..layout import ACCUM_DTYPES, OUT_DTYPES
from .hf_folder import parse_size

FORMATS: dict[str, tuple[str, ...]] = {"safetensors": (".safetensors",), "torch": (".pt", ".pth", ".bin", ".ckpt", ".tar"),
                                       "dcp": ()}  # dcp: a folder, never told from a file name


def named_format(path: Path) -> str | None:
    """The format a file's extension names (``.safetensors``, ``.pt``, ...), or None."""
    return next((name for name, suffixes in FORMATS.items() if suffixes and path.name.endswith(suffixes)), None)


def contradicted(path: Path, fmt: str | None) -> CkptavgWarning | None:
    """A note when `fmt` overrides the format that the file's name says: loaders go by the name (torch.load
    hands a .safetensors name to safetensors; a safetensors .pt makes torch.load blame weights_only)."""
    named = named_format(path)
    if fmt is None or named is None or fmt == named or not FORMATS.get(fmt):
        return None
    return CkptavgWarning(f"output {path}: written as {fmt}, as format asks, but its name says {named}, and loaders "
                          f"go by the name; load it with {fmt}'s own reader, or name it {' or '.join(FORMATS[fmt])}.",
                          params=("format",))


def row_suffix(fmt: str | None) -> str:
    """The extension of each row's file in a folder of several outputs: the format's first, safetensors' by
    default."""
    return FORMATS[fmt][0] if fmt in FORMATS and FORMATS[fmt] else ".safetensors"


def output_format(path: Path, fmt: str | None) -> str:
    """The format of a file output: `fmt` when given, else the one its extension names."""
    found = fmt or named_format(path)
    if found is not None:
        return found
    choices = "; ".join(f"{' '.join(s)} for {n}" for n, s in FORMATS.items() if s)
    raise PlanError(f"output {path}: cannot tell the format from the name; end it with {choices}, or pass format.",
                    params=("output", "format"))


@dataclass(frozen=True)
class WriteOptions:
    """How an average is computed and written; checked when built.

    Attributes:
        dtype: output dtype of floating tensors (``float32``, ``float16``, ``bfloat16``); None keeps each
            tensor's input dtype.
        accum_dtype: ``float64`` (default) or ``float32`` accumulator for floating tensors.
        allow_nonfinite: average NaN/Inf values instead of refusing them.
        force: overwrite an existing output.
        device: ``cpu``, ``cuda`` or ``cuda:N``: where the arithmetic runs (files are read and written on the
            host either way).
        max_shard_size: write a folder of shards of at most this size ("5GB", "500MiB"), with an index.
        shards_like_input: write a folder sharded like the first input (a sharded Hugging Face folder).
        verify: re-open every written file (with ckptavg's reader and with the format's own: safetensors, or
            ``torch.load(weights_only=True)``) and check each tensor's name, shape, dtype and (unless
            allow_nonfinite) finiteness before renaming it into place.
        format: ``safetensors``, ``torch`` (a ``torch.save`` state dict) or ``dcp`` (a PyTorch Distributed
            Checkpoint folder, the default for a folder output from DCP inputs); None follows the output's
            extension (``.safetensors``; ``.pt``, ``.pth``, ``.bin``, ``.ckpt``, ``.tar``).
        container: write a copy of the newest input's training checkpoint (a torch file) with its weights
            replaced by the average; its optimizer, scheduler, loss scaler and RNG state are dropped.
        keep_training_state: with container (or a legacy Megatron run's folder output), keep those too (copied
            from the newest input, not averaged).
    """

    dtype: str | None = None
    accum_dtype: str = "float64"
    allow_nonfinite: bool = False
    force: bool = False
    device: str = "cpu"
    max_shard_size: str | None = None
    shards_like_input: bool = False
    verify: bool = False
    format: str | None = None
    container: bool = False
    keep_training_state: bool = False

    def __post_init__(self) -> None:
        if self.container and self.format not in (None, "torch"):
            raise PlanError(f"container writes a torch file, a copy of the newest input's checkpoint, not {self.format}; "
                            "give format torch, or leave out container.", params=("container", "format"))
        if self.container and (self.max_shard_size is not None or self.shards_like_input):
            raise PlanError("container writes one torch file, a copy of the newest input's checkpoint; leave out "
                            "max_shard_size and shards_like_input.",
                            params=("container", "max_shard_size", "shards_like_input"))
        if self.format is not None and self.format not in FORMATS:
            raise PlanError(f"format must be one of {', '.join(FORMATS)}, not {self.format!r}.", params=("format",))
        if self.format == "torch" and (self.max_shard_size is not None or self.shards_like_input):
            raise PlanError("format torch writes one file; max_shard_size and shards_like_input write a folder of "
                            "safetensors shards.", params=("format", "max_shard_size", "shards_like_input"))
        if self.accum_dtype not in ACCUM_DTYPES:
            raise PlanError(f"accum_dtype must be one of {', '.join(ACCUM_DTYPES)}, not {self.accum_dtype!r}.",
                            params=("accum_dtype",))
        if self.dtype is not None and self.dtype not in OUT_DTYPES:
            raise PlanError(f"dtype must be one of {', '.join(OUT_DTYPES)}, not {self.dtype!r}.", params=("dtype",))
        if self.max_shard_size is not None:
            parse_size(self.max_shard_size)

    @property
    def max_bytes(self) -> int | None:
        return parse_size(self.max_shard_size) if self.max_shard_size is not None else None
