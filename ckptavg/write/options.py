"""How an average is computed and written: the output dtype, the accumulator, the device, sharding, checks."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import PlanError
from ..layout import ACCUM_DTYPES, OUT_DTYPES
from .hf_folder import parse_size


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
        verify: re-open every written file (with ckptavg's reader and with safetensors) and check each
            tensor's name, shape, dtype and (unless allow_nonfinite) finiteness before renaming it into place.
    """

    dtype: str | None = None
    accum_dtype: str = "float64"
    allow_nonfinite: bool = False
    force: bool = False
    device: str = "cpu"
    max_shard_size: str | None = None
    shards_like_input: bool = False
    verify: bool = False

    def __post_init__(self) -> None:
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
