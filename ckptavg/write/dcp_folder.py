"""DCP folder outputs: the average as a PyTorch Distributed Checkpoint that `torch.distributed.checkpoint.load`,
`dcp_to_torch_save`, megatron-core's `dist_checkpointing.load` and ckptavg's reader accept.

The folder holds `__0_0.distcp` (or `__0_<i>.distcp` files of at most `max_shard_size`), `.metadata`, and
`ckptavg.json` (the provenance that a safetensors output keeps in its header; DCP readers ignore it). The
tensors keep the newest input's fully qualified names (`app.model.layer.weight`, Megatron's stacked
`decoder.layers.*` with their global shapes), each one chunk. The newest input's non-tensor entries that are not
training state (Transformer Engine's `_extra_state`, counters) are carried verbatim; optimizer, scheduler, RNG
and dataloader entries are not written.

Megatron torch_dist (the newest input is an `iter_N/` folder with `common.pt` and `metadata.json`): both files
are copied byte for byte (`common.pt` holds args, iteration and the scheduler state; Megatron saves optimizer
and RNG state in the sharded files, which are not carried). ``-o DIR/`` writes ``DIR/iter_000000N/`` and
``DIR/latest_checkpointed_iteration.txt`` naming N, the newest input's iteration, so that ``--load DIR`` finds
it; ``-o DIR/iter_000000N/`` (or ``release/``) writes just that folder.

Everything goes to temp names and is renamed in this order: data files, copies, `ckptavg.json`, `.metadata`,
the tracker file.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..errors import OutputError, PlanError
from ..layout import TensorSpec
from ..read.checkpoint import Checkpoint
from ..read.dcp import METADATA, PROVENANCE, TRAINING_ENTRIES, dcp_entries, is_dcp_folder
from ..read.dcp_chunks import BytesEntry, DcpTensor
from ..read.megatron import MEGATRON_COMMON, MEGATRON_METADATA, TRACKER, is_torch_dist, megatron_step
from .dcp_writer import Carried, DcpWriter, TensorArchive, metadata_pickle
from .hf_folder import Shard, check_folder, copy_temp, write_text_temp
from .output import OpenOutput, Output, Writer, _make_folder, _remove_folders
from .placing import check_replaceable

# Entries that are training state, never carried: torchtitan's and the DCP recipe's, Megatron's RNG state.
NOT_CARRIED = frozenset({*TRAINING_ENTRIES, "rng_state", "rng", "rng_states", "scaler", "grad_scaler"})
_ITER_NAME = re.compile(r"iter_\d+|release")


def wants_dcp(ckpts: Sequence[Checkpoint], fmt: str | None, to_folder: bool) -> bool:
    """An output is a DCP folder when asked (`fmt` ``dcp``), or by default when it is a folder (`to_folder`)
    and every input is a DCP folder."""
    if fmt is not None:
        return fmt == "dcp"
    return to_folder and bool(ckpts) and all(c.format == "dcp" and is_dcp_folder(c.path) for c in ckpts)


@dataclass(frozen=True)
class DcpPlan:
    """What a DCP output holds beyond its tensors, and where its tracker file goes."""

    names: dict[str, str] = field(default_factory=dict)  # spec name -> the fqn it is saved under
    carried: tuple[Carried, ...] = ()
    planner_data: dict[str, Any] | None = None  # fqn -> key path, as the newest input has it (None: Megatron's)
    tracker: Path | None = None  # Megatron's latest_checkpointed_iteration.txt
    iteration: int | None = None


def plan_dcp_output(output: str | os.PathLike[str], specs: Sequence[TensorSpec], ckpts: Sequence[Checkpoint], *,
                    to_folder: bool, max_bytes: int | None = None, like_input: bool = False, parts: int = 1,
                    make_parent: bool = False, fmt: str | None = "dcp", texts: Mapping[str, str] | None = None
                    ) -> DcpOutput:
    """The files of a DCP output at `output` for tensors `specs` from `ckpts` (the newest last); the same
    parameters as `output.plan_output` (`fmt`: ``dcp`` or None; `texts`, files ckptavg writes beside, must be
    empty: only a LoRA adapter folder has one), with a note of the input's state it leaves out, if any (`notes`:
    `api.prepare` gives it once every output has passed its checks)."""
    out = Path(output)
    if texts:
        raise PlanError(f"output {out}: a DCP folder cannot hold {', '.join(texts)}; give another format.",
                        params=("output", "format"))
    if not to_folder:
        raise PlanError(f"output {out}: format dcp writes a folder; give a folder (DIR/), or another format.",
                        params=("output", "format"))
    if like_input or parts > 1:
        raise PlanError("format dcp is written by one process into __0_*.distcp files: it takes max_shard_size, "
                        "not shards_like_input or a torchrun job.", params=("format", "shards_like_input"))
    newest = ckpts[-1]
    from_dcp = newest.format == "dcp" and is_dcp_folder(newest.path)
    names = {s.name: _fqn(s, newest) for s in specs}
    carried, planner_data = _carried(newest, set(names.values())) if from_dcp else ((), None)
    if planner_data is not None or not from_dcp:  # every written entry has a key path, as dcp.save gives them
        given = planner_data or {}
        planner_data = {fqn: _key_path(fqn, given.get(fqn)) for fqn in [*names.values(), *(c.fqn for c in carried)]}
    copies: tuple[Path, ...] = ()
    folder, tracker, step = out, None, None
    if from_dcp and is_torch_dist(newest.path):
        copies = tuple(newest.path / n for n in (MEGATRON_COMMON, MEGATRON_METADATA) if (newest.path / n).is_file())
        step = megatron_step(newest.path)
        if step is not None and not _ITER_NAME.fullmatch(out.name):
            folder, tracker = out / f"iter_{step:07d}", out / TRACKER
    shards = _files(specs, carried, max_bytes)
    plan = DcpPlan(names, carried, planner_data, tracker, step if tracker is not None else None)
    dropped = _training_state(newest) if from_dcp else []
    notes = (_not_written(newest, copies, dropped),) if copies or dropped else ()
    return DcpOutput(out, folder, True, tuple(shards), copies, make_parent, format="dcp", dcp=plan, notes=notes)


def _not_written(newest: Checkpoint, copies: Sequence[Path], dropped: Sequence[str]) -> str:
    """What a DCP output written from DCP input `newest` leaves out, for the user to know before resuming from it."""
    if copies:  # Megatron torch_dist: its optimizer and RNG state are in the sharded files
        return (f"DCP output: {' and '.join(p.name for p in copies)} are copied as they are from {newest.path} (its "
                "args, iteration and scheduler state); optimizer and RNG state are not written: load it without them "
                "(Megatron: --finetune, or --no-load-optim --no-load-rng).")
    return (f"DCP output: the training state of {newest.path} ({', '.join(dropped)}) is not written, "
            "only its weights; load the output as weights, not to resume that training.")


def _training_state(newest: Checkpoint) -> list[str]:
    """The names of the training-state entries (optimizer, scheduler, RNG) that DCP input `newest` holds."""
    entries, _ = dcp_entries(newest.path)
    return sorted({name for fqn in entries for name in _training(fqn)})


def _fqn(spec: TensorSpec, newest: Checkpoint) -> str:
    """The name a tensor is saved under: the newest input's own, for a DCP input (prefixes and all)."""
    lazy = newest.tensors.get(spec.name)
    return lazy.key if isinstance(lazy, DcpTensor) and lazy.key else spec.name


def _carried(newest: Checkpoint, written: set[str]) -> tuple[tuple[Carried, ...], dict[str, Any] | None]:
    """The newest input's non-tensor entries that are not training state, and its planner's key paths."""
    entries, md = dcp_entries(newest.path)
    carried = tuple(Carried(fqn, e.stored) for fqn, e in entries.items()
                    if isinstance(e, BytesEntry) and fqn not in written and not e.stored.transforms
                    and not _training(fqn))
    planner_data = getattr(md, "planner_data", None)
    return carried, planner_data if isinstance(planner_data, dict) else None


def _key_path(fqn: str, given: Any) -> tuple[str | int, ...]:
    """The input's key path for `fqn` when it is one (names and list indices that join to `fqn`), else `(fqn,)`."""
    if isinstance(given, tuple | list) and all(isinstance(p, str) or type(p) is int for p in given) \
            and ".".join(map(str, given)) == fqn:
        return tuple(given)
    return (fqn,)


def _training(fqn: str) -> frozenset[str]:
    """The training-state subtree an entry is under, if any: `optim.*`, `app.optim.*` (the DCP recipe),
    `rng_state/shard_*`."""
    parts = fqn.split("/")[0].split(".")
    return NOT_CARRIED & set(parts[:-1][:2] or parts[:1])


def _files(specs: Sequence[TensorSpec], carried: Sequence[Carried], max_bytes: int | None) -> list[Shard]:
    """Tensors in order into `__0_<i>.distcp` files of at most `max_bytes` (a larger tensor gets its own file);
    the first file starts with the carried entries (and may hold only them)."""
    groups: list[list[TensorSpec]] = [[]]
    size = sum(c.stored.length for c in carried)
    for spec in specs:
        n = TensorArchive.of(spec).size
        taken = bool(groups[-1]) or (len(groups) == 1 and bool(carried))  # the first file holds the carried entries
        if max_bytes is not None and taken and size + n > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(spec)
        size += n
    return [Shard(f"__0_{i}.distcp", tuple(g)) for i, g in enumerate(groups)]


@dataclass(frozen=True)
class DcpOutput(Output):
    """A DCP folder output (see the module's notes); `folder` is the iteration folder of a Megatron run layout."""

    dcp: DcpPlan = field(default_factory=DcpPlan)

    @property
    def file_names(self) -> list[str]:
        """The names written in `folder`."""
        return [sh.name for sh in self.shards] + [p.name for p in self.copies] + [PROVENANCE, METADATA]

    def check(self, inputs: Sequence[Path], force: bool) -> None:
        """Refuse an output that is an input, would overwrite something (without `force`), or would mix with
        another save's data files."""
        if self.make_parent and not self.path.parent.exists() and self.path.parent.parent.is_dir():
            return
        top = self.path
        if self.dcp.tracker is not None:
            check_folder(top, [TRACKER], inputs, force)
            if not self.folder.exists():
                return
        stale = sorted(p.name for p in self.folder.iterdir()
                       if p.name.endswith(".distcp") and p.name not in self.file_names) if self.folder.is_dir() else []
        if stale:
            raise OutputError(f"{self.folder}: holds other DCP data files ({', '.join(stale[:3])}) that the new "
                              ".metadata would not list; remove them or choose an empty folder.")
        check_folder(self.folder, self.file_names, inputs, force)

    def open(self, metadata: dict[str, str], only: Sequence[Shard] | None = None) -> OpenDcpOutput:
        """Create the folders (recorded, and removed again on failure) and the temp data files."""
        if only is not None:
            raise AssertionError("a DCP output is written by one process")
        created: list[Path] = []
        try:
            if self.make_parent:
                _make_folder(self.path.parent, created)
            if self.dcp.tracker is not None:
                _make_folder(self.path, created)
            _make_folder(self.folder, created)
            return OpenDcpOutput(self, list(self.shards), metadata, created=created)
        except BaseException:
            _remove_folders(created)
            raise


@dataclass
class OpenDcpOutput(OpenOutput):
    """The temp files of a DCP output; `finish` can verify them with ckptavg's and torch's readers."""

    def __post_init__(self) -> None:
        out = self.dcp_output
        try:
            for i, sh in enumerate(self.shards):
                carried = out.dcp.carried if i == 0 else ()
                w: Writer = self._stack.enter_context(DcpWriter(out.folder / sh.name, sh.specs, self.metadata,
                                                                rename=False, carried=carried))
                self.writers.append(w)
        except BaseException:
            self._stack.close()
            _remove_folders(self.created)
            raise
        self._owner = {spec.name: w for w in self.writers for spec in w.order}

    @property
    def dcp_output(self) -> DcpOutput:
        assert isinstance(self.output, DcpOutput)
        return self.output

    def metadata_bytes(self) -> bytes:
        """The `.metadata` of the folder: every data file's items."""
        out = self.dcp_output
        files = [(sh.name, sh.specs, out.dcp.carried if i == 0 else ()) for i, sh in enumerate(out.shards)]
        return metadata_pickle(files, out.dcp.names, out.dcp.planner_data)

    def finish(self, verify: bool = False, check_finite: bool = True) -> None:
        """Complete every temp data file; with `verify`, read the folder back with ckptavg's and torch's readers."""
        self._stack.close()
        if verify:
            from .dcp_verify import verify_dcp

            out = self.dcp_output
            crcs: dict[str, int] = {}
            for w in self.writers:
                crcs.update(getattr(w, "crcs", {}))
            files = {w.path.name: w.done for w in self.writers if w.done is not None}
            specs = [replace(s, name=out.dcp.names[s.name]) for s in self.order]
            verify_dcp(out.folder, files, self.metadata_bytes(), specs,
                       {out.dcp.names.get(k, k): v for k, v in crcs.items()}, check_finite)

    def _lead_temps(self, temps: list[tuple[Path, Path]]) -> None:
        """Copies, then `.metadata` (readers look for it first: it goes last), then the tracker file."""
        out = self.dcp_output
        for src in out.copies:
            temps.append((copy_temp(src, out.folder), out.folder / src.name))
        provenance = json.dumps(dict(sorted(self.metadata.items())), indent=1, ensure_ascii=False) + "\n"
        temps.append((write_text_temp(out.folder, PROVENANCE, provenance), out.folder / PROVENANCE))
        meta = self.metadata_bytes()
        temps.append((_bytes_temp(out.folder, METADATA, meta), out.folder / METADATA))
        if out.dcp.tracker is not None:
            check_replaceable(out.dcp.tracker)
            temps.append((write_text_temp(out.path, TRACKER, str(out.dcp.iteration)), out.dcp.tracker))

    def withdraw(self) -> None:
        """Remove every file this output placed (another output of the same run failed to commit)."""
        self._unplace()


def _bytes_temp(folder: Path, name: str, data: bytes) -> Path:
    from .hf_folder import _filled_temp

    return _filled_temp(folder, name, lambda f: f.write(data), "cannot write")
