"""The LoRA part of a plan (docs/ALGORITHMS.md §13): every output row's averaged factors of every adapter layer,
the shapes they change, the output's adapter_config.json, and the relative error of each layer's update.

Adapters are small, so each layer's factors are read whole from every checkpoint a row weighs (once for all rows),
averaged in float64 by `LoraAverage` and rounded to the output dtype; the other keys (modules_to_save, biases,
DoRA magnitudes) are left to the streaming reducer, as are the factors of ``factors``, which are plain means.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from ..errors import CkptavgWarning, IncompatibleCheckpointsError, PlanError
from ..layout import TensorSpec
from .base import Plan, TensorAccess, Weights
from .lora import LoraAverage, adapter_config_for, lora_pairs
from .lora_merge import MergedRow, merge_map
from .soup import Soup

FACTORS_NOTE = ("LoRA adapters are averaged factor by factor (the mean of the A and of the B matrices), which is not "
                "the mean of their updates B·A: close, late checkpoints come out close, distant ones do not "
                "(docs/ALGORITHMS.md §13).")
DORA_NOTE = ("DoRA adapters: the update B·A is averaged as said, but each layer's magnitude vector is averaged on "
             "its own, and DoRA rescales W + s·B·A by it, so the result is not the mean of the adapted weights.")
def sharded_note(parts: int) -> CkptavgWarning:
    """What a sharded adapter folder cannot do, and what sharded it: the options, or a torchrun job's ranks."""
    why = (f"a torchrun job of {parts} processes writes one shard each; run it in one process" if parts > 1
           else "leave out max_shard_size and shards_like_input")
    return CkptavgWarning("PEFT loads an adapter from one adapter_model.safetensors; this sharded adapter folder is "
                          f"for ckptavg and safetensors readers only ({why}).",
                          params=() if parts > 1 else ("max_shard_size", "shards_like_input"))
# What sets the scale s of every update: the adapters must agree on it, or Σ w_k B_k A_k mixes scales.
SCALE_FIELDS = ("r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern")

Config = tuple[Path, Mapping[str, Any]]  # an adapter_config.json and its contents


@dataclass(frozen=True)
class AdapterAverage:
    """The averaged adapter layers of every output row.

    Attributes:
        how: the way the average is stored (`LoraAverage`).
        layers: layer name -> (A key, B key).
        tensors: per row, factor key -> averaged factor in the output dtype; empty for ``factors`` (streamed).
        errors: per row, layer -> ``‖s·B·A − s Σ w_k B_k A_k‖_F / ‖s Σ w_k B_k A_k‖_F``.
        config: the output's adapter_config.json (r and lora_alpha updated), None when the inputs have none
            and for merge.
        notes: what the user should know (the factor-by-factor approximation).
        output_specs: merge: the layout of the merged model (the base's), which replaces the adapters'.
    """

    how: LoraAverage
    layers: Mapping[str, tuple[str, str]]
    tensors: tuple[Mapping[str, torch.Tensor], ...]
    errors: tuple[Mapping[str, float], ...]
    config: Mapping[str, Any] | None = None
    notes: tuple[CkptavgWarning, ...] = ()
    output_specs: tuple[TensorSpec, ...] | None = None

    def resized(self, specs: Sequence[TensorSpec]) -> list[TensorSpec]:
        """`specs` with the shapes of the averaged factors (concat: rank N·r; svd: the chosen rank); for merge,
        the base's."""
        if self.output_specs is not None:
            return list(self.output_specs)
        first = self.tensors[0] if self.tensors else {}
        return [replace(s, shape=tuple(first[s.name].shape)) if s.name in first else s for s in specs]

    def config_text(self) -> str | None:
        """The output's adapter_config.json, as PEFT writes it (indented, sorted keys), or None."""
        return None if self.config is None else json.dumps(self.config, indent=2, sort_keys=True) + "\n"

    def summary(self, row: int) -> dict[str, Any]:
        """Row `row`'s LoRA record (its output's ``ckptavg_lora`` metadata): mode, r, lora_alpha, the errors."""
        errors = self.errors[row]
        worst = max(errors, key=lambda k: errors[k]) if errors else None
        base = {"base": str(self.how.base)} if self.how.base is not None else {}
        return base | {"mode": self.how.mode, "rank": self.how.rank, "r": (self.config or {}).get("r"),
                "lora_alpha": (self.config or {}).get("lora_alpha"), "layers": len(self.layers),
                "max_error": errors[worst] if worst else None, "worst_layer": worst,  # None: graft weighed A, B apart
                "mean_error": sum(errors.values()) / len(errors) if errors else None, "errors": dict(errors)}

    def to_json(self) -> dict[str, Any]:
        """The ``lora`` entry of `plan --json`: the first row's record, and every row's errors."""
        first = self.summary(0)
        return {k: v for k, v in first.items() if k != "errors"} | {
            "outputs": [self.summary(r)["errors"] for r in range(len(self.errors))]}


def refuse_scored_soup(plan: Plan, how: LoraAverage | None, specs: Sequence[TensorSpec]) -> None:
    """A soup that scores candidates builds each as the plain mean of its tensors, which for LoRA adapters is the
    factor-by-factor average: refused, before any scoring, unless that is what will be written (lora factors).

    Raises:
        PlanError: a scored soup of LoRA adapters with svd, concat or merge.
    """
    if isinstance(plan, Soup) and plan.evaluate is not None and (how is None or how.mode != "factors") \
            and lora_pairs(s.name for s in specs):
        mode = how.mode if how is not None else "svd"
        raise PlanError(f"soup scores each candidate as the mean of its tensors, which for LoRA adapters is the factor "
                        f"by factor average, not the lora {mode} that would be written; pass lora factors, so that what "
                        "is written is what was scored.", params=("lora",))


def average_adapters(how: LoraAverage | None, specs: Sequence[TensorSpec], rows: Sequence[Weights],
                     configs: Callable[[], Sequence[Config | None]], data: TensorAccess,
                     base: TensorAccess | None = None) -> AdapterAverage | None:
    """Average the LoRA layers found in `specs` for every row of weights; None when there are none.

    Args:
        how: how to store the average; None: svd at the input rank, when the inputs are LoRA adapters.
        specs: the output layout (factor shapes as the inputs have them).
        rows: the plan's weights, one row per output, over the checkpoints `data` reads.
        configs: each checkpoint's adapter_config.json, where it has one (read only for adapters).
        data: the checkpoints' tensors.
        base: merge: the base model's tensors.

    Raises:
        PlanError: `how` given for inputs without LoRA factors; graft weights that differ between a layer's A
            and B; concat or another svd rank without an adapter_config.json to record the new r and lora_alpha.
        IncompatibleCheckpointsError: the adapters' configs disagree on the scale (r, lora_alpha, rslora, patterns).
    """
    layers = lora_pairs(s.name for s in specs)
    if not layers:
        if how is not None:
            raise PlanError(f"lora {how.mode} applies to LoRA adapters, but the inputs hold no lora_A/lora_B "
                            "factors; leave out lora.", params=("lora",))
        return None
    how = how or LoraAverage()
    config = _agreed_config(configs())
    weights = [{layer: w for layer, keys in layers.items() if (w := _layer_weights(row, layer, keys, how)) is not None}
               for row in rows]
    if how.mode == "merge":
        assert base is not None, "the caller opens lora.base"
        plan = merge_map(layers, specs, config, base)
        merged = tuple(MergedRow(plan, row, data, base) for row in rows)
        return AdapterAverage(how, layers, merged, tuple({layer: 0.0 for layer in layers} for _ in rows),
                              output_specs=plan.specs)
    n = max((sum(x != 0 for x in w) for by_layer in weights for w in by_layer.values()), default=1) or 1
    out_config = _output_config(how, config, n, specs, layers)
    by_name = {sp.name: sp for sp in specs}
    tensors, errors = _average_layers(how, layers, weights, n, by_name, data)
    multiple = any(sum(x != 0 for x in row.values) > 1 for row in rows)
    notes = [CkptavgWarning(FACTORS_NOTE, params=("lora",))] if how.mode == "factors" and multiple else []
    if config and config.get("use_dora") and multiple:
        notes.append(CkptavgWarning(DORA_NOTE))
    most = n * max(by_name[a].shape[0] for a, _ in layers.values())
    if how.mode == "svd" and how.rank is not None and how.rank > most:
        notes.append(CkptavgWarning(f"lora.rank {how.rank} is more than the mean update can have (at most {n} "
                                    f"adapters x r = {most}): the last {how.rank - most} ranks are zeros; "
                                    f"lora.rank {most} stores the same update exactly.", params=("lora.rank",)))
    return AdapterAverage(how, layers, tuple(tensors), tuple(errors), out_config, tuple(notes))


def _average_layers(how: LoraAverage, layers: Mapping[str, tuple[str, str]],
                    weights: Sequence[Mapping[str, tuple[float, ...]]], n: int, by_name: Mapping[str, TensorSpec],
                    data: TensorAccess) -> tuple[list[dict[str, torch.Tensor]], list[dict[str, float]]]:
    """Each row's averaged factors (none for factors: streamed) and errors, reading each layer's factors once
    for all rows; `n`: the most adapters a row weighs (concat's rank N·r)."""
    tensors: list[dict[str, torch.Tensor]] = [{} for _ in weights]
    errors: list[dict[str, float]] = [{} for _ in weights]
    for i, (layer, (a_key, b_key)) in enumerate(layers.items()):
        used = sorted({k for by_layer in weights for k, x in enumerate(by_layer.get(layer, ())) if x != 0})
        loaded = {k: (data.load(k, a_key), data.load(k, b_key)) for k in used}
        for r, by_layer in enumerate(weights):
            if layer not in by_layer:  # factors weighed apart (graft): no single update to measure against
                continue
            w = by_layer[layer]
            pairs = [(loaded[k], x) for k, x in enumerate(w) if x != 0]
            a, b, errors[r][layer] = _average_layer(how, [p for p, _ in pairs], [x for _, x in pairs], n,
                                                    by_name[a_key], by_name[b_key])
            if how.mode != "factors":  # factors are plain means: the streaming reducer writes them
                tensors[r][a_key], tensors[r][b_key] = a, b
        data.progress("LoRA layers", i + 1, len(layers))
    return tensors, errors


def _layer_weights(row: Weights, layer: str, keys: tuple[str, str], how: LoraAverage) -> tuple[float, ...] | None:
    """One weight per checkpoint for both factors of a layer. Graft may weigh tensors apart: refused, but for
    factors, which are averaged one by one anyway (None: the layer's error is not computed)."""
    w_a, w_b = row.for_tensor(keys[0]), row.for_tensor(keys[1])
    if w_a != w_b and how.mode == "factors":
        return None
    if w_a != w_b:
        raise PlanError(f"LoRA layer {layer}: its A and B factors get different weights ({keys[0]}, {keys[1]}); "
                        "an update B·A needs one weight per layer: use lora factors.", params=("lora",))
    return w_a


def _agreed_config(configs: Sequence[Config | None]) -> Mapping[str, Any] | None:
    """The newest adapter_config.json, once every other one agrees with it on the scale of the updates."""
    found = [c for c in configs if c is not None]
    if not found:
        return None
    newest_path, newest = found[-1]
    for path, config in found[:-1]:
        differ = [f for f in SCALE_FIELDS if (config.get(f) or None) != (newest.get(f) or None)]
        if differ:
            f = differ[0]
            raise IncompatibleCheckpointsError(
                f"{path} has {f} {config.get(f)!r} but {newest_path} has {newest.get(f)!r}: adapters of different "
                "scales cannot be averaged as LoRA updates; select adapters of one configuration.")
    return newest


def _output_config(how: LoraAverage, config: Mapping[str, Any] | None, n: int, specs: Sequence[TensorSpec],
                   layers: Mapping[str, tuple[str, str]]) -> dict[str, Any] | None:
    """The output's adapter_config.json; refused for a change of rank that nothing would record."""
    ranks = {s.shape[0] for s in specs if s.name in {a for a, _ in layers.values()}}
    changes = how.mode == "concat" and n > 1 or how.mode == "svd" and how.rank is not None and ranks != {how.rank}
    if config is None:
        if changes:
            raise PlanError(f"lora {how.mode} changes the adapters' rank, so lora_alpha must change with it, but no "
                            "adapter_config.json was found beside the inputs: average adapter folders, or use lora "
                            "svd without lora.rank.", params=("lora.rank", "lora"))
        return None
    return adapter_config_for(dict(config), how.mode, n, rank=how.rank if how.mode == "svd" else None)


def _average_layer(how: LoraAverage, pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], w: Sequence[float], n: int,
                   a_spec: TensorSpec, b_spec: TensorSpec) -> tuple[torch.Tensor, torch.Tensor, float]:
    """One layer of one row, rounded to the output dtypes: A, B and the relative error of the update."""
    r = a_spec.shape[0]
    if not pairs:  # no weight on this layer: a zero update
        k = r * n if how.mode == "concat" else how.rank or r
        return (torch.zeros((k, *a_spec.shape[1:]), dtype=a_spec.out_dtype),
                torch.zeros((b_spec.shape[0], k, *b_spec.shape[2:]), dtype=b_spec.out_dtype), 0.0)
    if how.mode == "svd" and len(pairs) == 1 and how.rank in (None, r):
        how = LoraAverage("concat")  # one adapter at its own rank: stored exactly, not refactored
        n = 1
    layer = how.average(pairs, w)
    a, b = layer.A, layer.B
    if how.mode == "concat" and a.shape[0] < n * r:  # a row weighing fewer adapters than another: zero-padded
        missing = n * r - a.shape[0]
        a = torch.cat([a, a.new_zeros((missing, *a.shape[1:]))], dim=0)
        b = torch.cat([b, b.new_zeros((b.shape[0], missing, *b.shape[2:]))], dim=1)
    return a.to(a_spec.out_dtype), b.to(b_spec.out_dtype), layer.error
