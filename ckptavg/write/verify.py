"""Check a written safetensors file against the specs it was written from (`--verify`).

The file is re-opened twice, by ckptavg's own header reader and by `safetensors.safe_open`, so a file that
only one of them accepts is caught. Every tensor's name, shape and dtype must match its spec. With
`check_finite`, the data of every floating tensor is read back in fixed-size blocks with pread and must hold
no NaN or Inf, so memory does not grow with the size of the file or of its largest tensor.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import torch

from ..errors import CheckpointFormatError, CkptavgError, OutputError, listing, one_line
from ..layout import DTYPE_NAMES, TensorSpec
from ..read.lazy import LazyTensor, read_exact
from ..read.safetensors_file import read_safetensors_header

BLOCK_BYTES = 16 * 1024 * 1024  # read back this much at a time when checking finiteness


def verify_output(path: Path, specs: Sequence[TensorSpec], check_finite: bool) -> None:
    """Raise OutputError naming the file, the tensor and the problem if `path` does not hold exactly `specs`.

    Args:
        path: the safetensors file just written.
        specs: the tensors it must hold (name, shape and `out_dtype`).
        check_finite: also read every floating (and complex) tensor back and refuse NaN or Inf.
    """
    path = Path(path)
    theirs = _read_with_safetensors(path)
    check_tensor_names(path, set(theirs), specs, "safetensors")
    for spec in specs:
        check_spec(path, spec, *theirs[spec.name], "safetensors")
    check_read_back(path, specs, _read_with_ckptavg(path), check_finite)


def check_read_back(path: Path, specs: Sequence[TensorSpec], ours: Mapping[str, LazyTensor], check_finite: bool) -> None:
    """Check the tensors ckptavg's own reader found in a written file (`ours`): exactly `specs`, each of its
    shape and dtype, and with `check_finite` no NaN or Inf in a floating or complex one (read back in blocks)."""
    check_tensor_names(path, set(ours), specs, "ckptavg's reader")
    for spec in specs:
        lazy = ours[spec.name]
        check_spec(path, spec, tuple(lazy.shape), DTYPE_NAMES.get(lazy.dtype, str(lazy.dtype)), "ckptavg's reader")
        if check_finite and (spec.out_dtype.is_floating_point or spec.out_dtype.is_complex):
            _check_finite(path, spec.name, lazy)


def _read_with_ckptavg(path: Path) -> dict[str, LazyTensor]:
    try:
        tensors, _ = read_safetensors_header(path)
    except (CkptavgError, OSError) as e:
        raise OutputError(f"{path}: the written file does not read back ({e}).") from None
    return tensors


def _read_with_safetensors(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """Shape and dtype name of every tensor as safetensors sees them (its header only: no data is read)."""
    from safetensors import safe_open  # here, not at the top: most runs never verify, and it costs 1 MiB of RSS

    try:
        with safe_open(path, framework="pt") as f:
            return {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}  # noqa: SIM118
    except Exception as e:  # noqa: BLE001 - safetensors raises its own SafetensorError, OSError, ...
        raise OutputError(f"{path}: safetensors cannot read the written file ({type(e).__name__}: {e}).") from None


def check_tensor_names(path: Path, found: set[str], specs: Sequence[TensorSpec], reader: str) -> None:
    """Refuse a written file in which `reader` found other tensor names than `specs` name."""
    wanted = {s.name for s in specs}
    missing, extra = sorted(wanted - found), sorted(found - wanted)
    if missing or extra:
        parts = [f"'{one_line(k, 120)}' is missing" for k in missing] + [f"'{one_line(k, 120)}' is unexpected" for k in extra]
        raise OutputError(f"{path}: as read by {reader}, {listing(parts, 5, '; ')}.")


def check_spec(path: Path, spec: TensorSpec, shape: tuple[int, ...], dtype: str, reader: str) -> None:
    """Refuse a tensor that `reader` sees with another shape or dtype (a safetensors name) than `spec`."""
    want_dtype = DTYPE_NAMES[spec.out_dtype]
    if shape != tuple(spec.shape):
        raise OutputError(
            f"{path}: '{one_line(spec.name, 120)}' has shape {list(shape)} but should have {list(spec.shape)} "
            f"(as read by {reader})."
        )
    if dtype != want_dtype:
        raise OutputError(f"{path}: '{one_line(spec.name, 120)}' is {dtype} but should be {want_dtype} (as read by {reader}).")


def _check_finite(path: Path, name: str, lazy: LazyTensor) -> None:
    """Read the tensor's bytes block by block and refuse the first NaN or Inf, naming its flat index."""
    step = max(BLOCK_BYTES // lazy.dtype.itemsize, 1)
    for start, block in read_blocks(path, lazy, step):
        values = torch.frombuffer(block, dtype=lazy.dtype)
        if values.dtype.itemsize == 1:  # float8: isfinite is not implemented for it
            values = values.float()
        bad = (~torch.isfinite(values)).nonzero()
        if bad.numel():
            index = start + int(bad[0, 0])
            raise OutputError(f"{path}: '{one_line(name, 120)}' holds NaN or Inf (first at flat index {index}).")


def read_blocks(path: Path, lazy: LazyTensor, step: int) -> Iterator[tuple[int, bytearray]]:
    """A written tensor's bytes, `step` elements at a time: (first element, bytes), through `lazy.ranges` (one
    run in a file; a DCP tensor's may lie in several)."""
    for start in range(0, lazy.numel, step):
        count = min(step, lazy.numel - start)
        block, at = bytearray(count * lazy.dtype.itemsize), 0
        for file, offset, n in lazy.ranges(start, count):
            try:
                read_exact(file, offset, memoryview(block)[at:at + n])
            except CheckpointFormatError:
                raise OutputError(f"{path}: the written file is shorter than its header says.") from None
            at += n
        yield start, block
