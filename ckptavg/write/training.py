"""Outputs that are copies of training checkpoints with the average in place of their weights: `--container`
(one file, `container.container_output`) and a legacy Megatron run, averaged rank by rank into a folder that
Megatron's `--load` reads: ``iter_<N>/mp_rank_XX/model_optim_rng.pt`` for every rank, each a copy of that rank's
newest file, and ``latest_checkpointed_iteration.txt`` naming N. With keep_training_state each rank's
``distrib_optim.pt`` (Megatron's distributed optimizer state) is copied beside it byte for byte.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import OutputError, PlanError
from ..layout import TensorSpec
from ..read.checkpoint import Checkpoint, LoadOptions, PathLike
from ..read.megatron import LEGACY_FILE, TRACKER, legacy_rank_files, megatron_step
from ..read.megatron_legacy import LEGACY_FORMAT, open_megatron_legacy
from .container import ContainerPlan, container_output, plan_container
from .hf_folder import Shard
from .options import WriteOptions
from .output import Output, is_folder_output
from .torch_file import TorchWriter

DISTRIB_OPTIM = "distrib_optim.pt"  # Megatron's distributed optimizer state, beside a rank's model_optim_rng.pt


def training_output(output: PathLike, specs: Sequence[TensorSpec], ckpts: Sequence[Checkpoint], rows: int,
                    load: LoadOptions, write: WriteOptions, parts: int = 1, named: object = None) -> Output | None:
    """The output that copies training checkpoints, when one is asked for (`container`) or the inputs call for it
    (legacy Megatron ranks: their folder output is a copy of every rank's file, with or without `container`);
    None for the usual outputs. `named`: what else reads the averaged tensors by name (BatchNorm recalibration,
    an evaluation function), for which the prefix options still rename them.

    Raises:
        PlanError: prefix options for a legacy Megatron run, or with container and nothing that reads the names
            (a copy keeps its own); a format other than torch for a legacy Megatron run; keep_training_state
            without container.
    """
    legacy = any(c.format == LEGACY_FORMAT for c in ckpts)
    renaming = [p for p in ("strip_prefix", "add_prefix", "keep_prefix") if getattr(load, p)]
    if renaming and legacy:
        raise PlanError(f"a legacy Megatron run is written as copies of its rank files, which keep their own tensor "
                        f"names; leave out {' and '.join(renaming)}.", params=tuple(renaming))
    if renaming and write.container and not named:
        raise PlanError(f"container keeps the checkpoint's own tensor names, so {renaming[0]} changes nothing in it; "
                        f"leave out {' and '.join(renaming)} (they rename the weights only for bn_model or evaluate).",
                        params=("container", "bn_model", "evaluate", *renaming))
    if legacy:
        if write.format not in (None, "torch"):
            raise PlanError(f"output {output}: a legacy Megatron run is written as a Megatron folder of rank files "
                            f"(iter_N/mp_rank_XX/{LEGACY_FILE}, torch files), not {write.format}; leave out format, or "
                            f"average one rank's files (iter_*/mp_rank_00/{LEGACY_FILE}) to a .safetensors file.",
                            params=("format",))
        return legacy_output(output, specs, ckpts, rows, load, write.keep_training_state, parts)
    if write.container:
        return container_output(output, specs, ckpts, rows, load, write.keep_training_state, parts)
    if write.keep_training_state:
        raise PlanError("keep_training_state keeps the training state of a copied checkpoint; pass container too.",
                        params=("keep_training_state", "container"))
    return None


@dataclass(frozen=True)
class RankPlans:
    """The container plan of each rank; a rank's file holds the tensors named ``<rank>/...``."""

    plans: dict[str, ContainerPlan]

    def _of(self, specs: Sequence[TensorSpec]) -> ContainerPlan:
        return self.plans[specs[0].name.split("/", 1)[0]]

    def writer(self, path: Path, specs: Sequence[TensorSpec], metadata: dict[str, str], rename: bool = False
               ) -> TorchWriter:
        return self._of(specs).writer(path, specs, metadata, rename)

    def verify(self, path: Path, specs: Sequence[TensorSpec], check_finite: bool) -> None:
        self._of(specs).verify(path, specs, check_finite)


def legacy_output(output: PathLike, specs: Sequence[TensorSpec], ckpts: Sequence[Checkpoint], rows: int,
                  load: LoadOptions, keep_training_state: bool, parts: int = 1) -> Output:
    """A Megatron folder of every rank's average, each in a copy of that rank's newest file.

    Raises:
        PlanError: for a file output, several output rows, a torchrun job, or legacy iterations mixed with
            other inputs.
        OutputError: for an output folder that holds the inputs.
    """
    newest = ckpts[-1]
    if not all(c.format == LEGACY_FORMAT for c in ckpts):
        raise PlanError(f"{newest.path}: legacy Megatron iteration folders cannot be averaged with other checkpoints; "
                        "give only the run's iter_N/ folders.", params=("inputs",))
    out = Path(output)
    if not is_folder_output(output):
        raise PlanError(f"output {output}: legacy Megatron ranks are averaged rank by rank into a Megatron folder; "
                        "give a folder (DIR/), or one rank's files (iter_*/mp_rank_00/model_optim_rng.pt) for "
                        "a file.", params=("output",))
    if rows != 1 or parts != 1:
        raise PlanError(f"output {output}: a Megatron folder holds one average; give one value (one decay, "
                        "sigma_rel or window), and run it without torchrun.", params=("output",))
    inputs = [t.path.resolve() for c in ckpts for t in c.tensors.values()]
    if any(out.resolve() in p.parents for p in inputs):
        raise OutputError(f"{out}: holds the input checkpoints; choose another output folder.")
    step = megatron_step(newest.path) or 0
    shards, plans, copies = [], {}, []
    with warnings.catch_warnings():  # said when the inputs were opened
        warnings.simplefilter("ignore")
        for rank, file in legacy_rank_files(newest.path).items():
            mine = tuple(s for s in specs if s.name.startswith(rank + "/"))
            shards.append(Shard(f"iter_{step:07d}/{rank}/{LEGACY_FILE}", mine))
            plans[rank] = plan_container(open_megatron_legacy(file, load), mine, load, keep_training_state,
                                         prefix=rank + "/")
            if keep_training_state and (file.parent / DISTRIB_OPTIM).is_file():
                copies.append((f"iter_{step:07d}/{rank}/{DISTRIB_OPTIM}", file.parent / DISTRIB_OPTIM))
    return Output(out, out, True, tuple(shards), format="torch", container=RankPlans(plans),
                  texts=((TRACKER, str(step)),), placed_copies=tuple(copies))
