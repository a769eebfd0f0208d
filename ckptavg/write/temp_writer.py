"""What the streaming output writers share (`SafetensorsWriter`, `TorchWriter`): tensors in order, checked
against their specs, into an `OutputFile` at a temp name that is placed on success and removed on failure."""

from __future__ import annotations

from pathlib import Path
from types import TracebackType

import torch

from ..layout import TensorSpec, byte_view
from .outfile import OutputFile
from .placing import place


class TempWriter:
    """What the streaming writers share: tensors arrive in `order` into an `OutputFile` at a temp name; on
    a clean exit the file is completed (`_complete`), fsynced and hashed, and renamed into place (or, with
    `rename` False, left at `done` for the caller to rename); on any exception, Ctrl-C included, removed."""

    def __init__(self, path: Path, order: list[TensorSpec], rename: bool) -> None:
        self.path = path
        self._rename = rename
        self.done: Path | None = None
        self.order = order
        self._next = 0  # the tensor of `order` being written
        self._filled = 0  # bytes of order[_next] written so far
        self._file: OutputFile | None = None
        self._sha256: str | None = None
        self._placed = False  # the finished file is renamed into place, or handed over as `done`

    @property
    def nbytes(self) -> int:
        return self._file.nbytes if self._file else 0

    @property
    def sha256(self) -> str:
        """The sha256 of the written file (known once the writer has finished)."""
        if self._sha256 is None:
            raise AssertionError("sha256 asked for before the writer finished")
        return self._sha256

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._file is not None
        try:
            if exc_type is None:
                if self._next != len(self.order):
                    raise AssertionError("writer closed before every tensor was written")
                self._complete(self._file)
                self._place(self._file)
        finally:
            if not self._placed:  # failed, or interrupted: leave nothing behind
                self._file.discard()

    def write(self, tensor: torch.Tensor) -> None:
        """Write the next tensor of `order` whole; its shape and dtype must match the spec."""
        spec = self.order[self._next]
        if tuple(tensor.shape) != spec.shape or self._filled:
            raise AssertionError(f"writer got {tensor.dtype}{list(tensor.shape)} for {spec}")  # a bug, not input
        self.write_part(tensor.reshape(-1))

    def write_part(self, block: torch.Tensor) -> None:
        """Write the next elements of the current tensor of `order`; move on when it is complete."""
        assert self._file is not None
        spec = self.order[self._next]
        t = block.contiguous()
        if t.dtype != spec.out_dtype or self._filled + t.nbytes > spec.nbytes:
            raise AssertionError(f"writer got {t.dtype}[{t.numel()}] for {spec}")  # a bug, not input
        if t.numel():
            self._data(self._file, byte_view(t))
        self._filled += t.nbytes
        if self._filled == spec.nbytes:
            self._next, self._filled = self._next + 1, 0
            self._tensor_done(self._file)

    def _data(self, file: OutputFile, data: memoryview) -> None:
        """Write a tensor's bytes (a format may also checksum them)."""
        file.write(data)

    def _tensor_done(self, file: OutputFile) -> None:
        """After the last bytes of tensor `_next - 1` (a format may write a trailer and the next header)."""

    def _complete(self, file: OutputFile) -> None:
        """Write what follows the tensors (nothing, for a format whose header comes first)."""

    def _place(self, file: OutputFile) -> None:
        self._sha256 = file.finish()
        if self._rename:
            place(file.temp, self.path, force=True)
        else:
            self.done = file.temp
        self._placed = True
