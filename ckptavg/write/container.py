"""`--container`: a copy of the newest input's training checkpoint with its weights replaced by the average.

The newest input's pickle is read as an inert tree (`read.container_tree`: no class of it is imported), the
tensors it holds where the weights were read from are replaced by the averaged ones, training state
(optimizer, scheduler, loss scaler, RNG) is dropped unless asked to keep it, and the tree is pickled again:
stand-ins are written back as the same globals, calls and states, so every other entry loads as it was.
The averaged tensors stream into the archive like a plain torch output's (`TorchWriter`); the storages of
the entries kept (another EMA copy, kept optimizer moments) are copied byte for byte from the source file.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointFormatError, CkptavgError, OutputError, PlanError, first_line, one_line
from ..layout import DTYPE_NAMES, TensorSpec
from ..read.checkpoint import Checkpoint, LoadOptions, PathLike
from ..read.container_tree import (
    PARAMETER,
    Tree,
    get,
    mapping_items,
    put,
    read_tree,
    tensor_leaves,
)
from ..read.lazy import LazyTensor
from ..read.locate import TRAINING_STATE, change_prefix
from ..read.torch_file import _SAFE_EXTRAS, load_torch
from .container_pickle import TreePickler
from .options import FORMATS
from .output import Output, is_folder_output, plan_output
from .torch_archive import tensor_ref
from .torch_file import Copied, TorchWriter
from .verify import check_read_back, check_spec, check_tensor_names


@dataclass
class ContainerPlan:
    """Where the average goes in the newest input's checkpoint, and what of it is kept."""

    tree: Tree
    targets: dict[str, tuple[Any, Any]]  # averaged tensor name -> (holder, slot) in the tree
    dropped: list[str]
    load: LoadOptions
    location: str
    stripped_prefix: str
    prefix: str = ""  # of the averaged names, not of the stored ones (a Megatron rank's "mp_rank_00/")
    plain: bool = True  # only globals torch's weights-only loader accepts (known once pickled)
    _used: bool = field(default=False, repr=False)

    @property
    def source(self) -> Path:
        return self.tree.path

    def writer(self, path: Path, specs: Sequence[TensorSpec], metadata: dict[str, str], rename: bool = False
               ) -> TorchWriter:
        """A `TorchWriter` of the checkpoint around the averaged `specs`; its `order` is the pickle's."""
        pickled, order, records = self.pickle(specs)
        return TorchWriter(path, order, metadata, rename, pickled=pickled, records=records)

    def verify(self, path: Path, specs: Sequence[TensorSpec], check_finite: bool) -> None:
        """`verify_container` of this plan's copy."""
        verify_container(self, path, specs, check_finite)

    def pickle(self, specs: Sequence[TensorSpec]) -> tuple[bytes, list[TensorSpec], list[str | Copied]]:
        """data.pkl of the copy; the averaged tensors in the order it refers to them; and its data records in
        that order too (as torch.load expects), each an averaged tensor's key or a record of the source."""
        if self._used:  # the tree is rewritten in place: one writer per plan
            raise AssertionError("a container plan pickled twice")
        self._used = True
        for i, spec in enumerate(specs):
            holder, slot = self.targets[spec.name[len(self.prefix):]]
            old, new = get(holder, slot), tensor_ref(spec, str(i))
            put(holder, slot, old.rebuilt((new, *old.args[1:])) if old.where == PARAMETER else new)
        buf = io.BytesIO()
        pickler = TreePickler(buf)
        pickler.dump(_without(self.tree.root, self.dropped))
        self.plain = pickler.plain
        order: list[TensorSpec] = []
        records: list[str | Copied] = []
        for (averaged, source), key in pickler.renamed.items():
            if averaged:
                order.append(specs[int(source)])
                records.append(key)
                continue
            at = self.tree.records.get(source)
            if at is None:
                raise CheckpointFormatError(f"{self.source}: the pickle references tensor data (storage "
                                            f"'{one_line(source, 40)}') that the archive does not hold; the file "
                                            "is corrupt.")
            records.append(Copied(key, self.source, *at))
        return buf.getvalue(), order, records


def container_output(output: PathLike, specs: Sequence[TensorSpec], ckpts: Sequence[Checkpoint], rows: int,
                     load: LoadOptions, keep_training_state: bool, parts: int = 1) -> Output:
    """The one file of `--container`: a copy of the newest of `ckpts` (the last) around the averaged `specs`.

    Raises:
        PlanError: for a folder output, a safetensors name, several output rows, or folder inputs; a newest
            input that is a safetensors file.
        CheckpointFormatError: a newest input that is a legacy (non-zip) torch file.
    """
    refuse_container(output)
    if is_folder_output(output):
        raise PlanError(f"output {output}: container writes one file, not a folder; give a file name.",
                        params=("container", "output"))
    if rows != 1:
        raise PlanError(f"container writes one checkpoint, but the plan has {rows} output rows; give one value "
                        "(one decay, sigma_rel or window).", params=("container",))
    if parts > 1:
        raise PlanError(f"container writes one file, which the {parts} ranks of a torchrun job cannot share; run "
                        "it without torchrun.", params=("container",))
    folders = [c.path for c in ckpts if c.path.is_dir()]
    if folders:
        raise PlanError(f"{folders[0]}: a checkpoint folder has no training checkpoint file to copy; container "
                        "takes torch checkpoint files (leave out container to write the weights).",
                        params=("container",))
    newest = ckpts[-1]
    if newest.format == "safetensors":
        raise PlanError(f"{newest.path}: a safetensors file holds weights alone, no training checkpoint to copy; "
                        "leave out container.", params=("container",))
    if newest.format != "torch-zip":  # a legacy (non-zip) torch.save file: its storages are not records to copy
        raise CheckpointFormatError(f"{newest.path}: a legacy (non-zip) torch file; container copies a torch zip "
                                    "archive: re-save it with a current torch.save, or leave out container.",
                                    params=("container",))
    plan = plan_container(newest, specs, load, keep_training_state)
    out = plan_output(output, specs, ckpts, to_folder=False, fmt="torch")
    return replace(out, container=plan)


def refuse_container(output: PathLike) -> None:
    """Refuse, before any work, an output `container` cannot write: a safetensors file. (A folder is refused
    once the inputs are known: a legacy Megatron run's copies go to a folder.)"""
    text = os.fspath(output)
    if text.endswith(FORMATS["safetensors"]):
        raise PlanError(f"output {text}: container writes a torch checkpoint, not safetensors; give a name such as "
                        "avg.pt, or leave out container.", params=("container", "output"))


def is_training_state(key: Any, value: Any) -> bool:
    """A top-level entry `--container` drops unless asked to keep it: by name, or an optimizer's state_dict()."""
    items = mapping_items(value)
    keys = {k for k, _ in items} if items is not None else set()
    return key in TRAINING_STATE or {"state", "param_groups"} <= keys


def plan_container(newest: Checkpoint, specs: Sequence[TensorSpec], load: LoadOptions,
                   keep_training_state: bool, prefix: str = "") -> ContainerPlan:
    """Read `newest`'s checkpoint (no tensor data) and find, for each averaged tensor, the entry it replaces
    (the tensors of `specs` named `prefix` + a name of `newest`).

    Raises:
        CheckpointFormatError: for a file that is not a torch zip archive, holds a class outside the allow-list
            (without trust_pickle), or whose weights cannot be placed back (a layout this does not know).
    """
    tree = read_tree(newest.path, load.trust_pickle)
    wanted = {s.name[len(prefix):] for s in specs if s.name.startswith(prefix)}
    targets: dict[str, tuple[Any, Any]] = {}
    for full, holder, slot in tensor_leaves(tree.root):
        name = _averaged_name(full, newest, load)
        if name is not None and name in wanted and name not in targets:
            targets[name] = (holder, slot)
    missing = [n for n in wanted if n not in targets]
    if missing:
        raise CheckpointFormatError(
            f"{newest.path}: cannot place the averaged '{one_line(missing[0], 120)}' back into the checkpoint "
            f"({len(missing)} of {len(wanted)} tensors not found at '{one_line(newest.location, 80)}'); write the "
            "weights alone instead (leave out container).", params=("container",))
    top = mapping_items(tree.root) or []
    weights = set(_roots(newest.location))
    dropped = [] if keep_training_state else [k for k, v in top if k not in weights and is_training_state(k, v)]
    return ContainerPlan(tree, targets, dropped, load, newest.location, newest.stripped_prefix, prefix)


def _roots(location: str) -> list[str]:
    """The dotted entries the weights were read from (`Checkpoint.location`): one, or Megatron's stages."""
    if location == "(top level)":
        return [""]
    # "ema (the state_dict() of a pickled DetectionModel)": the entry is the first word
    return [part.strip() for part in location.split(" (")[0].split(",")]


def _averaged_name(full: str, ckpt: Checkpoint, load: LoadOptions) -> str | None:
    """The name the reader gave the tensor at dotted `full`, or None when it is not under the weights."""
    roots = _roots(ckpt.location)
    name: str | None = full
    if roots == [""]:
        pass
    elif len(roots) > 1:  # virtual pipeline stages keep their entry's name
        name = full if any(full.startswith(r + ".") for r in roots) else None
    else:
        name = full[len(roots[0]) + 1:] if full.startswith(roots[0] + ".") else None
    if name is None or not name.startswith(ckpt.stripped_prefix):
        return None
    bare = name[len(ckpt.stripped_prefix):]
    if load.strip_prefix and not bare.startswith(load.strip_prefix):
        return None
    return next(iter(change_prefix(ckpt.path, {bare: None}, load.strip_prefix, load.add_prefix)))


def _without(root: Any, dropped: list[str]) -> Any:
    """The top-level container less the `dropped` entries (a new one: the tree's is not changed)."""
    if not dropped:
        return root
    if isinstance(root, dict):
        return type(root)((k, v) for k, v in root.items() if k not in dropped)
    kept = root.rebuilt(root.args)
    kept.pairs = [(k, v) for k, v in root.pairs if k not in dropped]
    return kept


def verify_container(plan: ContainerPlan, path: Path, specs: Sequence[TensorSpec], check_finite: bool) -> None:
    """Raise OutputError if the written copy at `path` does not hold exactly `specs` where the weights were.

    Read by torch's loader (weights_only unless the copy needs other classes: then only with trust_pickle, as
    the user trusts the source) and by ckptavg's reader, which also checks finiteness block by block."""
    trust = plan.load.trust_pickle
    if plan.plain or trust:
        try:
            with torch.serialization.safe_globals(_SAFE_EXTRAS):
                obj = torch.load(path, map_location="cpu", weights_only=not trust, mmap=True)
        except Exception as e:  # noqa: BLE001 - torch's loader raises many types on a bad file
            raise OutputError(f"{path}: torch.load cannot read the written file ({type(e).__name__}: "
                              f"{one_line(first_line(e), 200)}).") from None
        theirs = _named(path, obj, plan)
        check_tensor_names(path, set(theirs), specs, "torch.load")
        for spec in specs:
            t = theirs[spec.name]
            check_spec(path, spec, tuple(t.shape), DTYPE_NAMES.get(t.dtype, str(t.dtype)), "torch.load")
        del obj, theirs
    try:
        ours = _named(path, load_torch(path, "torch-zip", trust_pickle=trust), plan)
    except (CkptavgError, OSError) as e:
        if plan.plain or trust:
            raise OutputError(f"{path}: the written file does not read back ({e}).") from None
        return  # kept training state with NumPy or other classes: the reader refuses them, by design
    check_read_back(path, specs, ours, check_finite)


def _named(path: Path, obj: Any, plan: ContainerPlan) -> dict[str, Any]:
    """The weights of an unpickled copy (tensors or lazy tensors) by the names the average gave them."""
    tensors: dict[str, Any] = {}
    for root in _roots(plan.location):
        node = obj
        for part in root.split(".") if root else []:
            node = node.get(part) if isinstance(node, dict) else None
        if root == "":
            node = {k: v for k, v in obj.items() if not is_training_state(k, v)} if isinstance(obj, dict) else None
        if node is None:
            raise OutputError(f"{path}: the written file has no entry '{one_line(root, 80)}'.")
        _collect(node, f"{root}." if len(_roots(plan.location)) > 1 else "", tensors)
    strip = plan.stripped_prefix
    tensors = {k[len(strip):] if k.startswith(strip) else k: v for k, v in tensors.items()}
    tensors = change_prefix(path, tensors, plan.load.strip_prefix, plan.load.add_prefix)
    return {plan.prefix + k: v for k, v in tensors.items()}


def _collect(node: Any, prefix: str, out: dict[str, Any]) -> None:
    if isinstance(node, torch.nn.Module):  # with trust_pickle, torch.load gives a pickled module itself
        node = node.state_dict()
    if isinstance(node, torch.Tensor | LazyTensor):
        out[prefix[:-1]] = node
    elif isinstance(node, dict):
        for k, v in node.items():
            _collect(v, f"{prefix}{k}.", out)
