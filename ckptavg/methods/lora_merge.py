"""``lora merge`` (docs/ALGORITHMS.md §13): full weights instead of an adapter. Every adapted layer becomes
``W + s Σ w_k B_k A_k`` (exact, in float64, rounded once; the out × in update is formed, one layer at a time), the
adapters' other tensors (modules_to_save) replace the base's, and every other base tensor is copied.

PEFT saves ``base_model.model.<module>.lora_A.weight``; the base holds ``<module>.weight``. The update is oriented
as PEFT applies it: transposed for embeddings and for GPT-2's Conv1D (``fan_in_fan_out``), reshaped for conv kernels.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import IncompatibleCheckpointsError, PlanError, listing
from ..layout import TensorSpec
from .base import TensorAccess, Weights
from .lora import average_concat, delta, scale

PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class MergeMap:
    """Where each tensor of the merged model comes from.

    Attributes:
        specs: the output layout: the base's tensors, in its order.
        layers: base key -> (layer, A key, B key) of the adapters: the weights that get the update.
        replaced: base key -> adapter key: tensors the adapters hold whole (modules_to_save).
        scales: layer -> s, the scale of its update.
        fan_in_fan_out: the adapters' config says the base stores linear weights as in × out (Conv1D).
    """

    specs: tuple[TensorSpec, ...]
    layers: Mapping[str, tuple[str, str, str]]
    replaced: Mapping[str, str]
    scales: Mapping[str, float]
    fan_in_fan_out: bool = False


def merge_map(layers: Mapping[str, tuple[str, str]], specs: Sequence[TensorSpec], config: Mapping[str, Any] | None,
              base: TensorAccess) -> MergeMap:
    """Match every adapter tensor (of `specs`, grouped into `layers`) to the base tensor it changes.

    Raises:
        PlanError: no adapter_config.json (the scales), or DoRA / LoRA biases, which merge otherwise.
        IncompatibleCheckpointsError: an adapter tensor with no base tensor of its name, or of another shape.
    """
    if config is None:
        raise PlanError("lora merge needs the adapters' adapter_config.json (lora_alpha, the scale of the updates), "
                        "and none was found beside the inputs; average adapter folders.", params=("lora",))
    if config.get("use_dora") or config.get("lora_bias"):
        raise PlanError("lora merge does not merge DoRA or LoRA-bias adapters; use lora concat or svd, and merge "
                        "with peft's merge_and_unload.", params=("lora",))
    names = {s.name: s for s in base.specs}
    keys = list(names)
    by_name = {s.name: s for s in specs}
    fan_in_fan_out = bool(config.get("fan_in_fan_out", False))
    merged: dict[str, tuple[str, str, str]] = {}
    scales: dict[str, float] = {}
    for layer, (a_key, b_key) in layers.items():
        module = layer.split("[")[0].removeprefix(PEFT_PREFIX)
        key = _base_key(module + ".weight", a_key, keys)
        merged[key] = (layer, a_key, b_key)
        scales[layer] = scale(by_name[a_key].shape[0], _alpha(config, module), bool(config.get("use_rslora", False)))
        _check_shape(by_name[a_key], by_name[b_key], names[key], fan_in_fan_out)
    factors = {k for pair in layers.values() for k in pair}
    replaced = {_base_key(s.name.removeprefix(PEFT_PREFIX), s.name, keys): s.name
                for s in specs if s.name not in factors}
    for key, adapter_key in replaced.items():
        if tuple(names[key].shape) != tuple(by_name[adapter_key].shape):
            raise IncompatibleCheckpointsError(f"adapter tensor {adapter_key} has shape {by_name[adapter_key].shape}, "
                                               f"base tensor {key} {names[key].shape}; give base, the model the "
                                               "adapters were trained on.", params=("base",))
    return MergeMap(tuple(base.specs), merged, replaced, scales, fan_in_fan_out)


def _check_shape(a: TensorSpec, b: TensorSpec, weight: TensorSpec, fan_in_fan_out: bool) -> None:
    """Refuse, before any work, a layer whose update does not fit its base weight (however it is oriented)."""
    update = torch.empty((b.shape[0], math.prod(a.shape[1:])), device="meta")  # a shape, no data
    _oriented(update, torch.Size(weight.shape), "lora_embedding_A" in a.name, fan_in_fan_out, weight.name)


def _base_key(name: str, adapter_key: str, names: Sequence[str]) -> str:
    """The base tensor `name` stands for: itself, or the one base key that it ends (or that ends it) at a dot,
    since a base may be saved with or without its model prefix (``bert.``, ``model.``)."""
    if name in names:
        return name
    found = [n for n in names if n.endswith("." + name) or name.endswith("." + n)]
    if len(found) == 1:
        return found[0]
    which = f"several: {listing(found, 3)}" if found else "none"
    raise IncompatibleCheckpointsError(f"adapter tensor {adapter_key}: base has no tensor {name} ({which} match); "
                                       "give base, the model the adapters were trained on.",
                                       params=("base",))


def _alpha(config: Mapping[str, Any], module: str) -> float:
    """lora_alpha of one module: its alpha_pattern entry (PEFT's get_pattern_key), else the config's."""
    for pattern, alpha in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return float(alpha)
    return float(config["lora_alpha"])


class MergedRow(Mapping[str, torch.Tensor]):
    """One output row's merged model as a state dict whose tensors are computed when read, one at a time."""

    def __init__(self, plan: MergeMap, row: Weights, data: TensorAccess, base: TensorAccess) -> None:
        self._plan, self._row, self._data, self._base = plan, row, data, base
        self._specs = {s.name: s for s in plan.specs}

    def __contains__(self, key: object) -> bool:
        return key in self._specs

    def __iter__(self) -> Iterator[str]:
        return iter(self._specs)

    def __len__(self) -> int:
        return len(self._specs)

    def __getitem__(self, key: str) -> torch.Tensor:
        spec = self._specs[key]
        if key in self._plan.replaced:
            return self._averaged(spec, self._plan.replaced[key])
        if key not in self._plan.layers:
            return self._base.load(0, key).to(spec.out_dtype)
        layer, a_key, b_key = self._plan.layers[key]
        w = self._row.for_tensor(a_key)
        used = [(k, x) for k, x in enumerate(w) if x != 0]
        weight = self._base.load(0, key).to(torch.float64, copy=True)
        if used:
            a, b = average_concat([self._data.load(k, a_key) for k, _ in used],
                                  [self._data.load(k, b_key) for k, _ in used], [x for _, x in used])
            weight += _oriented(delta(a, b, self._plan.scales[layer]), weight.shape, "lora_embedding_A" in a_key, self._plan.fan_in_fan_out,
                                key)
        return weight.to(spec.out_dtype)

    def _averaged(self, spec: TensorSpec, adapter_key: str) -> torch.Tensor:
        """A tensor the adapters hold whole: their weighted sum (non-floating: the newest weighed one's)."""
        w = self._row.for_tensor(adapter_key)
        if not spec.averaged:
            return self._data.load(max(k for k, x in enumerate(w) if x != 0), adapter_key)
        total = torch.zeros(spec.shape, dtype=torch.float64)
        for k, x in enumerate(w):
            if x != 0:
                total += x * self._data.load(k, adapter_key).to(torch.float64)
        return total.to(spec.out_dtype)


def _oriented(update: torch.Tensor, shape: torch.Size, embedding: bool, fan_in_fan_out: bool, key: str) -> torch.Tensor:
    """The out × in update in the base weight's layout: transposed for an embedding (num × dim) and for
    Conv1D (fan_in_fan_out, or the only way it fits), reshaped for a conv kernel."""
    if embedding or (len(shape) == 2 and (fan_in_fan_out or update.shape != shape) and update.T.shape == shape):
        update = update.T
    elif len(shape) > 2 and update.numel() == shape.numel() and update.shape[0] == shape[0]:
        update = update.reshape(shape)
    if update.shape != shape:
        raise IncompatibleCheckpointsError(f"base tensor {key} has shape {tuple(shape)}, but the adapters' update "
                                           f"is {tuple(update.shape)}; give base, the model the adapters were "
                                           "trained on.", params=("base",))
    return update
