"""DeepSpeed checkpoints: a tag folder (`global_stepN/`) read as one checkpoint of the fp32 weights that
DeepSpeed's `zero_to_fp32.py` rebuilds from the ZeRO partitions, each weight read only when asked for.

`engine.save_checkpoint(dir, tag)` writes `dir/latest` (the last tag's name) and `dir/<tag>/` with
- `mp_rank_00_model_states.pt` (ZeRO-0/1/2), or one `zero_pp_rank_R_mp_rank_00_model_states.pt` per rank (ZeRO-3):
  the module's state dict (whole, in the training dtype, for ZeRO <= 2; 0-element placeholders for ZeRO-3),
  `param_shapes`, `buffer_names`, `frozen_param_shapes`/`frozen_param_fragments`, `shared_params`, `global_steps`;
- per rank, `[bf16_|fp16_]zero_pp_rank_R_mp_rank_00_optim_states.pt`: the ZeRO stage, the partition count,
  the rank's fp32 master partition and the optimizer's own state (Adam moments: never read as weights).

The weights are, in zero_to_fp32's order: the buffers of the module state dict (floating ones as float32),
the frozen params, the trainable params rebuilt from the partitions (`deepspeed_zero`), and the tied names
of `shared_params`. Without ZeRO (no optimizer files, stage 0) the module state dict is the model.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import CheckpointFormatError, listing
from .checkpoint import Checkpoint, LoadOptions
from .deepspeed_pickle import entry, load_deepspeed_file, mapping, paddings, shape, shape_groups
from .deepspeed_zero import as_float32, zero3_frozen, zero3_weights, zero12_weights
from .lazy import LazyTensor
from .locate import select_prefix
from .metadata import Meta, meta_from_name

LATEST = "latest"
_OPTIM = re.compile(r"(?:(?:bf16|fp16)_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt")
_ZERO3_MODEL = re.compile(r"zero_pp_rank_(\d+)_mp_rank_(\d+)_model_states\.pt")
_MODEL = re.compile(r"mp_rank_(\d+)_model_states\.pt")
_EXPERTS = re.compile(r"(?:expp_rank_\d+_mp_rank_\d+_optim_states|layer_\d+_expert_\d+_mp_rank_\d+_model_states)\.pt")
# model states entries that the rebuild uses; the others are listed as other entries
_USED = ("module", "buffer_names", "param_shapes", "frozen_param_shapes", "frozen_param_fragments", "shared_params",
         "global_steps", "ds_version")


def is_deepspeed_tag(path: Path) -> bool:
    """True for a folder written by `engine.save_checkpoint` for one tag: it holds DeepSpeed model states
    (with the ZeRO optimizer partitions beside them, or alone without ZeRO)."""
    try:
        return path.is_dir() and any(
            _MODEL.fullmatch(p.name) or _ZERO3_MODEL.fullmatch(p.name) for p in path.iterdir() if p.is_file()
        )
    except OSError:
        return False


def deepspeed_tag_of(path: Path) -> Path | None:
    """The tag folder of a file that DeepSpeed wrote into one (model states or optimizer partitions), else
    None: such a file is never a checkpoint on its own (ZeRO-3 model states hold 0-element placeholders)."""
    names = (_OPTIM, _ZERO3_MODEL, _MODEL, _EXPERTS)
    if any(r.fullmatch(path.name) for r in names) and is_deepspeed_tag(path.parent):
        return path.parent
    return None


def is_deepspeed_run(path: Path) -> bool:
    """True for the folder DeepSpeed saves tags into: a `latest` file beside at least one tag folder."""
    try:
        return (path / LATEST).is_file() and any(is_deepspeed_tag(p) for p in path.iterdir())
    except OSError:
        return False


def deepspeed_tags(run: Path) -> list[Path]:
    """The tag folders of a DeepSpeed run folder, by step (then name); refuses a `latest` file that is empty
    or names a tag that is not there (an interrupted save, or a partial copy)."""
    latest = run / LATEST
    try:
        named = latest.read_text(encoding="utf-8", errors="replace").strip()
    except OSError as e:
        raise CheckpointFormatError(f"{latest}: cannot read ({e.strerror}).") from None
    tags = [p for p in run.iterdir() if is_deepspeed_tag(p)]
    if not named:
        raise CheckpointFormatError(
            f"{latest}: empty, but DeepSpeed writes the last saved tag's name there after saving it (an interrupted "
            "save?); pass the complete global_stepN/ tag folders explicitly."
        )
    if named not in {p.name for p in tags}:
        raise CheckpointFormatError(
            f"{latest}: names tag '{named[:80]}', which is not a DeepSpeed tag folder here (a partial copy?); "
            "pass the complete global_stepN/ tag folders explicitly."
        )
    steps = {p: deepspeed_step(p) for p in tags}
    return sorted(tags, key=lambda p: (steps[p] is None, steps[p] or 0, p.name))


def deepspeed_step(path: Path) -> int | None:
    """A tag's step: from its name (`global_stepN`), else the model states' `global_steps`."""
    step = meta_from_name(path.name, folder=True).step
    if step is not None:
        return step
    if not is_deepspeed_tag(path):
        return None
    files = _Files(path)
    steps = load_deepspeed_file(files.model, optimizer=False).get("global_steps")
    return steps if type(steps) is int and steps >= 0 else None


class _Files:
    """A tag's files by kind: model states (rank 0's), ZeRO-3 model states by rank, optimizer files by rank."""

    def __init__(self, tag: Path) -> None:
        self.tag = tag
        self.zero3_models: dict[int, Path] = {}
        self.optims: dict[int, Path] = {}
        model: Path | None = None
        for p in sorted(tag.iterdir()):
            if _EXPERTS.fullmatch(p.name):
                raise CheckpointFormatError(f"{p}: a mixture-of-experts DeepSpeed checkpoint, which ckptavg cannot "
                                            "rebuild; convert the tag with DeepSpeed's ds_to_universal.py first.")
            m = _OPTIM.fullmatch(p.name) or _ZERO3_MODEL.fullmatch(p.name) or _MODEL.fullmatch(p.name)
            if m is None or not p.is_file():
                continue
            if int(m.groups()[-1]) != 0:
                raise CheckpointFormatError(f"{p}: a model-parallel DeepSpeed checkpoint (mp_rank > 0), which "
                                            "ckptavg cannot merge; merge the model-parallel ranks with the training "
                                            "framework's own tool first.")
            if m.re is _OPTIM:
                self.optims[int(m.group(1))] = p
            elif m.re is _ZERO3_MODEL:
                self.zero3_models[int(m.group(1))] = p
            else:
                model = p
        model = model or self.zero3_models.get(0)
        if model is None:
            raise CheckpointFormatError(f"{tag}: DeepSpeed tag without rank 0's model states "
                                        "(*mp_rank_00_model_states.pt); copy the whole tag folder.")
        self.model: Path = model


def open_deepspeed(path: Path, options: LoadOptions = LoadOptions()) -> Checkpoint:
    """Open a DeepSpeed tag folder lazily: unpickle its model states and optimizer files (allow-list, no
    tensor data read) and map every fp32 weight to its byte ranges in the partitions.

    With ``options.key == "module"`` the model states' own module state dict is taken instead (the weights in
    the training dtype, for ZeRO <= 2); any other key selects a dotted prefix of the rebuilt weights.
    """
    if not is_deepspeed_tag(path):
        if is_deepspeed_run(path):
            raise CheckpointFormatError(f"{path}: a DeepSpeed run folder, not one tag; pass it as a folder of "
                                        "checkpoints (its global_stepN/ tags) or pass one tag folder.")
        raise CheckpointFormatError(f"{path}: not a DeepSpeed tag folder (no *_model_states.pt).")
    files = _Files(path)
    states = mapping(files.model, load_deepspeed_file(files.model, False, options.trust_pickle))
    optims = {r: mapping(p, load_deepspeed_file(p, True, options.trust_pickle)) for r, p in files.optims.items()}
    osd0 = mapping(files.optims[min(optims)], optims[min(optims)].get("optimizer_state_dict")) if optims else {}
    stage = osd0.get("zero_stage") if optims else _config_stage(states, files)
    if options.key == "module" or (not optims and stage == 0):
        tensors, location, stage = _module(files, states, stage), "module (model states)", stage or 0
    elif not optims or type(stage) is not int or not 1 <= stage <= 3:
        raise _no_partitions(files, stage)
    else:
        tensors, location = _rebuild(files, states, optims, stage, options.trust_pickle), "fp32 master partitions"
        if options.key is not None:
            tensors, location = select_prefix(path, tensors, options.key), f"fp32 master partitions, '{options.key}'"
    named = meta_from_name(path.name, folder=True)
    meta = Meta(named.step, "tag name") if named.step is not None else Meta()
    steps = states.get("global_steps")
    if type(steps) is int and steps >= 0:
        meta = meta.fill(Meta(steps, f"DeepSpeed {files.model.name} 'global_steps'"))
    meta = meta.fill(_lr(osd0, files))
    version = states.get("ds_version")
    others = [str(k) for k, v in states.items() if k not in _USED and v is not None]
    others += ["optimizer state in *_optim_states.pt"] if optims else []
    return Checkpoint(path, f"deepspeed (ZeRO-{stage})", tensors, location, meta,
                      file_metadata={"ds_version": version} if isinstance(version, str) else {}, other_entries=others)


def _config_stage(states: Mapping[Any, Any], files: _Files) -> Any:
    """The ZeRO stage of a tag without optimizer files, from the saved config (ZeRO-3 by its file names)."""
    if files.zero3_models:
        return 3
    config = states.get("ds_config")
    zero = config.get("zero_optimization") if isinstance(config, dict) else None
    stage = zero.get("stage", 0) if isinstance(zero, dict) else None
    if stage is None and states.get("optimizer") is not None:
        return 0  # without ZeRO the optimizer state is saved in the model states
    return stage


def _no_partitions(files: _Files, stage: Any) -> CheckpointFormatError:
    if files.optims:
        return CheckpointFormatError(
            f"{files.optims[min(files.optims)]}: DeepSpeed optimizer state without a ZeRO stage (its BF16_Optimizer, "
            "which zero_to_fp32 does not read either); pass --key module to average the module weights of the model "
            "states."
        )
    what = "0-element placeholders" if stage == 3 else "the module in the training dtype"
    fix = "pass the whole tag folder with every rank's file" if stage == 3 else (
        "pass the whole tag folder with every rank's file, or --key module to average the module weights")
    return CheckpointFormatError(
        f"{files.model}: DeepSpeed ZeRO-{stage if type(stage) is int else '?'} model states hold {what}; the fp32 "
        f"weights are in the tag's *_optim_states.pt partitions, which are missing: {fix}."
    )


def _module(files: _Files, states: Mapping[Any, Any], stage: Any) -> dict[str, LazyTensor]:
    """The model states' module state dict, refused when it holds ZeRO-3's 0-element placeholders."""
    module = states.get("module")
    if not isinstance(module, dict):
        raise CheckpointFormatError(f"{files.model}: no 'module' state dict in the DeepSpeed model states.")
    tensors = {str(k): v for k, v in module.items() if isinstance(v, LazyTensor)}
    shapes = {k: v for g in shape_groups(files.model, states) for k, v in g.items()}
    empty = [k for k, t in tensors.items() if t.numel == 0 and math.prod(shapes.get(k, (0,))) > 0]
    if files.zero3_models or stage == 3 or empty:
        raise CheckpointFormatError(
            f"{files.model}: the DeepSpeed ZeRO-3 module state dict holds only 0-element placeholders "
            f"({listing(empty, 3)}); the weights are in the tag's *_optim_states.pt partitions: pass the whole tag "
            "folder without --key."
        )
    return tensors


def _rebuild(files: _Files, states: Mapping[Any, Any], optims: Mapping[int, Mapping[Any, Any]], stage: int,
             trust: bool) -> dict[str, LazyTensor]:
    """The weights as zero_to_fp32 returns them: buffers, frozen params, trainable params, tied names."""
    osds = {r: mapping(files.optims[r], o.get("optimizer_state_dict")) for r, o in optims.items()}
    count = osds[min(osds)].get("partition_count")
    world = max(count) if isinstance(count, list) and count else count
    if type(world) is not int or world < 1:
        raise CheckpointFormatError(f"{files.optims[min(osds)]}: bad partition_count {count!r}; the file is corrupt.")
    missing = [r for r in range(world) if r not in osds]
    if missing or len(osds) != world:
        raise CheckpointFormatError(
            f"{files.tag}: DeepSpeed ZeRO-{stage} tag with {len(osds)} optimizer partition file(s) of the "
            f"{world} its ranks saved (rank {listing([str(r) for r in missing], 4) or 'numbers beyond the count'}); "
            "every rank's *_optim_states.pt is needed to rebuild the weights: copy the whole tag folder."
        )
    where = str(files.tag)
    groups = shape_groups(files.model, states)
    tensors: dict[str, LazyTensor] = {}
    buffers = states.get("buffer_names") or []
    for k, v in entry(files.model, states, "module").items():
        if k in buffers and isinstance(v, LazyTensor):
            tensors[str(k)] = as_float32(v)
    frozen = {str(k): shape(files.model, k, v) for k, v in entry(files.model, states, "frozen_param_shapes").items()}
    if stage == 3:
        models = [files.zero3_models.get(r) for r in range(world)]
        if None in models:
            raise CheckpointFormatError(
                f"{files.tag}: DeepSpeed ZeRO-3 tag without the model states of rank(s) "
                f"{', '.join(str(r) for r, m in enumerate(models) if m is None)}; copy the whole tag folder."
            )
        if frozen:
            fragments = [entry(m, load_deepspeed_file(m, False, trust), "frozen_param_fragments") for m in models if m]
            tensors.update(zero3_frozen(frozen, fragments, where))
        ranks = [osds[r].get("fp32_flat_groups") for r in range(world)]
        tensors.update(zero3_weights(groups, [r if isinstance(r, list) else [None] for r in ranks], where))
    else:
        whole = entry(files.model, states, "frozen_param_fragments")
        for name in frozen:
            if not isinstance(whole.get(name), LazyTensor):
                raise CheckpointFormatError(f"{files.model}: no fragment for the frozen param '{name}'; the file is corrupt.")
            tensors[name] = whole[name]
        ranks = [osds[r].get("single_partition_of_fp32_groups") for r in range(world)]
        pads = paddings(files.optims[min(osds)], osds[min(osds)].get("param_alignment_paddings"))
        tensors.update(zero12_weights(groups, [r if isinstance(r, list) else [None] for r in ranks], pads, where))
    for alias, target in entry(files.model, states, "shared_params").items():
        if target in tensors:
            tensors[str(alias)] = tensors[target]
    return tensors


def _lr(osd: Mapping[Any, Any], files: _Files) -> Meta:
    """The learning rate of the first param group, from rank 0's optimizer state (a plain float)."""
    for key in ("base_optimizer_state", "optimizer_state_dict"):
        inner = osd.get(key)
        groups = inner.get("param_groups") if isinstance(inner, dict) else None
        lr = groups[0].get("lr") if isinstance(groups, list) and groups and isinstance(groups[0], dict) else None
        if isinstance(lr, float | int) and not isinstance(lr, bool) and math.isfinite(lr) and lr >= 0:
            return Meta(lr=float(lr), lr_source=f"DeepSpeed {files.optims[min(files.optims)].name} {key}.param_groups[0].lr")
    return Meta()
