"""An output as an object: `-o` becomes a plan of the files to write (`Output`), which is checked against the
inputs, opened into temp files that receive the tensors (`OpenOutput`), and then committed or discarded.

Every file goes to a temp name first; only when all of them are complete are they renamed into place
(weights, then sidecar copies, then the index last), so a failure leaves the target as it was.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

import torch

from ..errors import CkptavgWarning, OutputError, PlanError
from ..layout import TensorSpec
from ..read.checkpoint import Checkpoint
from .hf_folder import (
    Shard,
    check_folder,
    copy_temp,
    index_json,
    index_name,
    plan_shards,
    sidecars,
    weights_stem,
    write_text_temp,
)
from .options import contradicted, output_format
from .placing import place
from .safetensors import SafetensorsWriter, check_output
from .torch_file import TorchWriter, verify_torch_file
from .verify import verify_output


class Writer(Protocol):
    """What an open output needs of a file writer (`SafetensorsWriter`, `TorchWriter`)."""

    path: Path
    done: Path | None
    order: list[TensorSpec]

    def __init__(self, path: Path, specs: Sequence[TensorSpec], metadata: dict[str, str], rename: bool = True
                 ) -> None: ...

    def __enter__(self) -> Writer: ...

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None: ...

    def write_part(self, block: torch.Tensor) -> None: ...

    @property
    def nbytes(self) -> int: ...

    @property
    def sha256(self) -> str: ...


class _Discarded(Exception):
    """Closes the writers of an output that will not be committed."""


@dataclass(frozen=True)
class WrittenFile:
    """One file an average wrote."""

    path: Path
    nbytes: int
    sha256: str


def is_folder_output(output: str | os.PathLike[str]) -> bool:
    """`-o DIR/` (trailing slash, so pass the text, not a Path) or an existing directory asks for a folder."""
    return Path(output).is_dir() or os.fspath(output).endswith(os.sep)


@dataclass(frozen=True)
class Output:
    """The files of one output: a single safetensors file, or a folder of shards with sidecars and an index.

    Build it with `plan_output`; `check` it against the inputs before any work, then `open` it.
    """

    path: Path  # what the user named
    folder: Path  # where the files go
    to_folder: bool
    shards: tuple[Shard, ...]  # every weights file
    copies: tuple[Path, ...] = ()  # sidecar files copied from the newest input folder
    make_parent: bool = False  # one of several outputs in a folder that `open` creates
    format: str = "safetensors"  # of a single file; folders are safetensors shards
    stem: str = "model"  # a folder's weights: model.safetensors, or diffusers' diffusion_pytorch_model.safetensors
    container: Any = None  # a `container.ContainerPlan` (or one per rank): copies of training checkpoints
    texts: tuple[tuple[str, str], ...] = ()  # small files we write (an adapter_config.json, Megatron's tracker file)
    placed_copies: tuple[tuple[str, Path], ...] = ()  # (name in the folder, source) copied as is (distrib_optim.pt)
    notes: tuple[str, ...] = ()  # what the user must know of what is (not) written: warned once it passed `check`

    def check(self, inputs: Sequence[Path], force: bool) -> None:
        """Refuse an output that is an input, would overwrite something (without `force`), or cannot be made."""
        parent = self.path.parent
        if self.make_parent and not parent.exists() and parent.parent.is_dir():
            return  # a new folder of outputs: nothing in it to overwrite, nothing of the inputs in it
        if not self.to_folder:
            check_output(self.path, inputs, force)
            return
        names = [sh.name for sh in self.shards] + [p.name for p in self.copies] + [n for n, _ in self.texts]
        names += [self.index] if self.indexed else []
        names += [n for n, _ in self.placed_copies]
        check_folder(self.path, names, inputs, force)

    @property
    def index(self) -> str:
        """The file name of a sharded folder's index."""
        return index_name(self.stem)

    @property
    def indexed(self) -> bool:
        return self.to_folder and len(self.shards) > 1 and self.container is None

    def open(self, metadata: dict[str, str], only: Sequence[Shard] | None = None) -> OpenOutput:
        """Create the temp files (of `only` these shards: a torchrun rank's share) with their headers.

        The folders this creates (the folder of a folder output, the parent of several outputs) are
        recorded, and removed again if the output is discarded or withdrawn; folders that existed are kept.
        """
        created: list[Path] = []
        try:
            if self.make_parent:
                _make_folder(self.path.parent, created)
            if self.to_folder:
                _make_folder(self.folder, created)
            for sub in dict.fromkeys(p for sh in self.shards for p in reversed(Path(sh.name).parents[:-1])):
                _make_folder(self.folder / sub, created)  # a Megatron folder's iter_N/mp_rank_XX/
            return OpenOutput(self, list(self.shards if only is None else only), metadata, created=created)
        except BaseException:
            _remove_folders(created)
            raise


def announce(outputs: Sequence[Output], into: list[CkptavgWarning]) -> None:
    """Warn once of each of the `outputs`' notes, and keep it in `into` (a report's warnings, for --json): called
    once every output has passed its checks, so that a refused output gives its error alone."""
    for text in dict.fromkeys(n for o in outputs for n in o.notes):
        note = CkptavgWarning(text)
        warnings.warn(note, stacklevel=3)
        into.append(note)


def _make_folder(folder: Path, created: list[Path]) -> None:
    """Create `folder` unless it is a directory already, noting it in `created` if this call made it."""
    try:
        folder.mkdir()
    except FileExistsError:
        if not folder.is_dir():
            raise OutputError(f"{folder}: exists and is not a directory; give a new or existing folder.") from None
        return
    except OSError as e:
        raise OutputError(f"{folder}: cannot create the folder ({e.strerror}).") from None
    created.append(folder)


def _remove_folders(created: Sequence[Path]) -> None:
    """Remove the folders an output created, innermost first, if they are empty (another run's files stay)."""
    for folder in reversed(created):
        with contextlib.suppress(OSError):
            folder.rmdir()


def plan_output(output: str | os.PathLike[str], specs: Sequence[TensorSpec], ckpts: Sequence[Checkpoint], *,
                to_folder: bool, max_bytes: int | None = None, like_input: bool = False, parts: int = 1,
                make_parent: bool = False, fmt: str | None = None, texts: Mapping[str, str] | None = None) -> Output:
    """The files that `-o output` means for tensors `specs` from `ckpts` (the newest last).

    A folder is sharded by `max_bytes`, like the first input (`like_input`), or into `parts` files of
    balanced size (one per torchrun rank); it gets the sidecars of the newest input folder, but for those
    `texts` writes instead (name -> contents). (DCP folders: `dcp_folder.plan_dcp_output`.)
    """
    out = Path(output)
    if not to_folder:
        if (note := contradicted(out, fmt)) is not None:
            warnings.warn(note, stacklevel=2)
        return Output(out, out.parent, False, (Shard(out.name, tuple(specs)),), make_parent=make_parent,
                      format=output_format(out, fmt))
    if fmt == "torch":
        raise PlanError(f"output {out}: format torch writes one file, but a folder was asked for; give a file "
                        "name ending in .pt, or leave out format.", params=("output", "format"))
    stem = weights_stem(ckpts)
    shards = plan_shards(specs, max_bytes, ckpts[0] if like_input else None, parts=parts, stem=stem)
    written = tuple(sorted((texts or {}).items()))
    copies = tuple(p for p in sidecars(ckpts) if p.name not in dict(written))
    return Output(out, out, True, tuple(shards), copies, make_parent, stem=stem, texts=written)


@dataclass
class OpenOutput:
    """Temp files receiving one output's tensors, in `order`, through `sink`; then `finish`, `commit` or `discard`."""

    output: Output
    shards: list[Shard]
    metadata: dict[str, str]
    writers: list[Writer] = field(default_factory=list)
    created: list[Path] = field(default_factory=list)  # folders `Output.open` made, removed on failure
    _stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)
    _owner: dict[str, Writer] = field(default_factory=dict)
    _placed: list[Path] = field(default_factory=list)  # files `commit` renamed into place

    def __post_init__(self) -> None:
        kind: Any = TorchWriter if self.output.format == "torch" else SafetensorsWriter
        kind = kind if self.output.container is None else self.output.container.writer
        try:
            for sh in self.shards:
                w = self._stack.enter_context(kind(self.output.folder / sh.name, sh.specs, self.metadata, rename=False))
                self.writers.append(w)
        except BaseException:
            self._stack.close()  # no temp file is left
            _remove_folders(self.created)
            raise
        self._owner = {spec.name: w for w in self.writers for spec in w.order}

    @property
    def order(self) -> list[TensorSpec]:
        """The order in which the tensors must arrive: the files', one after another."""
        return [spec for w in self.writers for spec in w.order]

    def sink(self, spec: TensorSpec, start: int, block: torch.Tensor) -> None:
        """Receive the next block of a tensor, in `order`."""
        self._owner[spec.name].write_part(block)

    def finish(self, verify: bool = False, check_finite: bool = True) -> None:
        """Complete every temp file (written, fsynced); with `verify`, re-read each against its specs."""
        self._stack.close()  # each writer finishes its file, leaving it at a temp name (`done`)
        if verify:
            for w in self.writers:
                if w.done is not None:
                    try:
                        check = verify_torch_file if self.output.format == "torch" else verify_output
                        if self.output.container is not None:
                            check = self.output.container.verify
                        check(w.done, w.order, check_finite)
                    except OutputError as e:  # name the file the user asked for, not its temp name
                        raise OutputError(str(e).replace(str(w.done), str(w.path)) + " Nothing was written.") from None

    def commit(self, lead: bool = True, force: bool = False) -> None:
        """Rename the files into place: weights, then (`lead` only) sidecar copies, then the index.

        Without `force` each rename is exclusive (`place`): if a file appeared meanwhile (another run writing
        the same output) this raises OutputError, and the files this commit already placed, new ones, are
        removed again. With `force`, existing regular files are replaced.
        """
        temps = [(w.done, w.path) for w in self.writers if w.done is not None]
        try:
            if lead:
                self._lead_temps(temps)
            for i, (tmp, final) in enumerate(temps):
                place(tmp, final, force)
                temps[i] = (final, final)
                self._placed.append(final)
        except BaseException:
            for tmp, final in temps:
                if tmp != final:
                    tmp.unlink(missing_ok=True)
            if not force:  # what this commit placed was new: take it back, all or nothing
                self._unplace()
            raise

    def _lead_temps(self, temps: list[tuple[Path, Path]]) -> None:
        """Add to `temps` the (temp, final) files that follow the weights: sidecar copies, the index, then `texts`."""
        folder = self.output.folder
        for src in self.output.copies:  # one at a time: a failed copy must not lose the earlier temps
            temps.append((copy_temp(src, folder), folder / src.name))
        for name, src in self.output.placed_copies:
            temps.append((copy_temp(src, (folder / name).parent), folder / name))
        if self.output.indexed:
            index = self.output.index
            temps.append((write_text_temp(folder, index, index_json(self.output.shards)), folder / index))
        for name, text in self.output.texts:
            temps.append((write_text_temp(folder, name, text), folder / name))

    def _unplace(self) -> None:
        for final in self._placed:
            final.unlink(missing_ok=True)
        self._placed.clear()
        _remove_folders(self.created)

    def discard(self) -> None:
        """Remove every temp file (open or finished), and the folders `open` created: nothing of this output
        appears."""
        with contextlib.suppress(Exception):  # writers still open see an exception and remove their temp files
            self._stack.__exit__(_Discarded, _Discarded(), None)
        for w in self.writers:
            if w.done is not None:
                w.done.unlink(missing_ok=True)
        _remove_folders(self.created)

    def withdraw(self) -> None:
        """Remove the weights files of a committed output (another output of the same run failed to commit);
        in a folder this output created, every file it placed, and the folder."""
        for w in self.writers:
            w.path.unlink(missing_ok=True)
        if self.created:
            self._unplace()

    @property
    def files(self) -> list[WrittenFile]:
        return [WrittenFile(w.path, w.nbytes, w.sha256) for w in self.writers]
