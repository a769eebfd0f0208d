"""Where the weights are inside an unpickled training checkpoint, and the name prefixes to strip."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from ..errors import CheckpointFormatError, CkptavgWarning, listing, one_line
from .lazy import LazyTensor

# Where the weights usually hide inside training checkpoints, in the order we look.
WEIGHT_KEYS = ("state_dict", "model", "model_state_dict", "module", "net")
# A checkpoint that wraps everything one level down, as the PyTorch DCP recipe saves {"app": {"model", "optim"}}.
WRAPPERS = ("app",)
# Top-level entries that are training state: optimizer moments, schedulers, loss scalers and RNG state of timm,
# Lightning, fairseq, Megatron and plain loops (a copy of the checkpoint, --container, drops them).
TRAINING_STATE = frozenset((
    "optimizer", "optimizers", "optim", "optimizer_states", "optimizer_state_dict", "optim_state",
    "last_optimizer_state", "lr_scheduler", "lr_schedulers", "scheduler", "schedulers", "opt_param_scheduler",
    "scaler", "grad_scaler", "loss_scaler", "amp", "amp_scaler", "rng_state", "rng_states", "rng", "random_states",
))
# Entries that are never weights, whatever they hold: the training state, and the loop's and data loader's
# position (which a copy keeps).
NOT_WEIGHTS = TRAINING_STATE | {"dataloader", "train_state", "loops"}
# Pickled modules, best first: Ultralytics keeps both and its `ema` is the one it evaluates and exports.
MODULE_KEYS = ("ema", "model")
# ema-pytorch's EMA.state_dict(): two models under these prefixes in one flat dict.
EMA_PYTORCH = ("ema_model", "online_model")
PREFIXES = ("module.", "_orig_mod.")
T = TypeVar("T")


class ModuleState(dict[str, Any]):
    """The state_dict() of a pickled nn.Module (read only with trust_pickle); `kind` is its class name."""

    def __init__(self, kind: str, items: Any = ()) -> None:
        super().__init__(items)
        self.kind = kind


def locate_weights(path: Path, obj: Any, key: str | None) -> tuple[dict[str, LazyTensor], str, list[str]]:
    """Find the state dict inside an unpickled checkpoint.

    Returns the flattened tensors, a description of where they were found, and the other
    top-level entries (for `inspect`). Optimizer, scheduler, RNG and loss-scaler entries are never weights.
    """
    top = obj if isinstance(obj, dict) else {}
    holds = TensorFinder()
    if key is not None:
        return _at_key(path, obj, key, holds), key, [t for t in map(_key_text, top) if t != key.split(".")[0]]
    if not isinstance(obj, dict):
        raise CheckpointFormatError(
            f"{path}: holds a {type(obj).__name__}, not a dict of tensors; save model.state_dict() instead."
        )
    _refuse_optimizer(path, obj, "")
    found = _find(path, obj, holds)
    if found is not None:
        return found
    for wrapper in WRAPPERS:
        if isinstance(obj.get(wrapper), dict) and (inner := _find(path, obj[wrapper], holds)) is not None:
            tensors, location, _ = inner
            return tensors, f"{wrapper}.{location}", [_key_text(k) for k in obj if k != wrapper]
    rest = {k: v for k, v in obj.items() if not _training_state(k, v)}
    tensors = flatten(path, rest, holds)
    if not tensors:
        keys = one_line(", ".join(map(_key_text, list(obj)[:12])), 300) or "none"
        raise CheckpointFormatError(
            f"{path}: no model weights found (top-level keys: {keys}); pass key to say where the weights are.",
            params=("key",),
        )
    tops = {name.split(".", 1)[0] for name in tensors}
    if all(p in tops for p in EMA_PYTORCH):
        raise CheckpointFormatError(
            f"{path}: an ema-pytorch EMA file holds two models, ema_model.* and online_model.*; pass key "
            "ema_model (the EMA weights) or key online_model.", params=("key",)
        )
    return tensors, "(top level)", [_key_text(k) for k, v in obj.items() if not holds(v) or _training_state(k, v)]


def _find(path: Path, obj: dict[Any, Any], holds: TensorFinder) -> tuple[dict[str, LazyTensor], str, list[str]] | None:
    """The weights under a pickled module (`ema` first) or a usual key of `obj`; None when there are none."""
    modules = [n for n in MODULE_KEYS if isinstance(obj.get(n), ModuleState) and holds(obj[n])]
    for name in modules[:1] + [n for n in WEIGHT_KEYS if isinstance(obj.get(n), dict)]:
        _refuse_optimizer(path, obj[name], f"'{name}' ")
        tensors = flatten(path, obj[name], holds)
        if not tensors:
            continue
        if name == "state_dict" and "current_model_state" in obj:
            warnings.warn(
                f"{path}: 'state_dict' holds weights already averaged by Lightning's "
                "WeightAveraging callback; pass --key current_model_state to average the raw weights.",
                CkptavgWarning,
                stacklevel=3,
            )
        node = obj[name]
        where = f"{name} (the state_dict() of a pickled {node.kind})" if isinstance(node, ModuleState) else name
        return tensors, where, [_other(k, obj) for k in obj if k != name]
    return None


def _other(name: Any, obj: dict[Any, Any]) -> str:
    """An entry for `inspect`'s list; another weight set (timm's EMA copy) says how to choose it."""
    text = _key_text(name)
    if text.endswith("_ema") and isinstance(obj[name], dict) and TensorFinder()(obj[name]):
        return f"{text} (EMA weights: --key {text})"
    return text


def _training_state(name: Any, value: Any) -> bool:
    return (name in NOT_WEIGHTS and isinstance(value, dict | list)) or _is_optimizer(value)


def _is_optimizer(value: Any) -> bool:
    """An optimizer's state_dict(): `state` (per-parameter moments) and `param_groups`."""
    return isinstance(value, dict) and "param_groups" in value and "state" in value


def _refuse_optimizer(path: Path, obj: Any, where: str) -> None:
    if _is_optimizer(obj):
        raise CheckpointFormatError(
            f"{path}: {where}holds an optimizer's state (state, param_groups), not model weights; ckptavg never "
            "averages optimizer state: give the model's weights file or checkpoint instead."
        )


def _at_key(path: Path, obj: Any, key: str, holds: TensorFinder) -> dict[str, LazyTensor]:
    """The tensors under dotted `key`: nested entries, or else a prefix of flat names (ema-pytorch's ema_model.*)."""
    try:
        node = _walk(path, obj, key)
    except CheckpointFormatError:
        if not isinstance(obj, dict):
            raise
        flat = flatten(path, {k: v for k, v in obj.items() if not _training_state(k, v)}, holds)
        if not any(name.startswith(key + ".") for name in flat):
            raise
        return select_prefix(path, flat, key)
    _refuse_optimizer(path, node, f"'{one_line(key, 120)}' ")
    tensors = flatten(path, node, holds)
    if not tensors:
        raise CheckpointFormatError(f"{path}: '{one_line(key, 120)}' holds no tensors.")
    return tensors


def _walk(path: Path, obj: Any, key: str) -> Any:
    node = obj
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            have = ", ".join(map(_key_text, list(node)[:12])) if isinstance(node, dict) else type(node).__name__
            raise CheckpointFormatError(
                f"{path}: no entry '{one_line(key, 120)}' (at '{one_line(part, 120)}', found: {one_line(have, 300)})."
            )
        node = node[part]
    return node


class TensorFinder:
    """Whether a node holds a tensor in its nested dicts, each dict judged once (shared ones included)."""

    def __init__(self) -> None:
        self._memo: dict[int, bool] = {}

    def __call__(self, node: Any) -> bool:
        if isinstance(node, LazyTensor):
            return True
        if not isinstance(node, dict):
            return False
        active: set[int] = set()  # a dict that holds itself (through others) adds nothing to its own answer
        stack: list[tuple[dict[Any, Any], bool]] = [(node, False)]
        while stack:
            d, expanded = stack.pop()
            if id(d) in self._memo:
                continue
            if expanded:
                active.discard(id(d))
                self._memo[id(d)] = any(isinstance(v, LazyTensor) or self._memo.get(id(v), False) for v in d.values())
                continue
            active.add(id(d))
            stack.append((d, True))
            stack.extend((v, False) for v in d.values()
                         if isinstance(v, dict) and id(v) not in self._memo and id(v) not in active)
        return self._memo[id(node)]


# Dicts holding tensors nested deeper than this are refused (real checkpoints nest a few levels).
MAX_DEPTH = 1000
# A sub-dict referred to from several places is flattened once per reference; more visits than this many
# per distinct dict, plus an allowance, can only come from shared references nested in shared references,
# which multiply (2**45 names from a 2 KiB pickle).
_VISITS_PER_NODE = 4
_VISIT_ALLOWANCE = 100_000


def flatten(path: Path, node: Any, holds: TensorFinder | None = None) -> dict[str, LazyTensor]:
    """Every tensor in nested dicts by dotted name, in order; other leaves are skipped.

    Raises CheckpointFormatError when two entries give the same name (``{"a.b": t, "a": {"b": u}}``), for
    dicts nested past MAX_DEPTH, and for shared references that multiply the names past any real checkpoint.
    """
    holds = holds or TensorFinder()
    out: dict[str, LazyTensor] = {}
    origin: dict[str, tuple[str, ...]] = {}
    seen: set[int] = set()
    visits = 0
    stack: list[tuple[tuple[str, ...], Any]] = [((), node)]
    while stack:
        keys, n = stack.pop()
        visits += 1
        seen.add(id(n))
        if visits > _VISITS_PER_NODE * len(seen) + _VISIT_ALLOWANCE:
            raise CheckpointFormatError(
                f"{path}: the same entries are referred to from so many places, references nested in references, "
                "that the tensor names would not fit in memory; the file is corrupt or crafted."
            )
        if isinstance(n, LazyTensor):
            name = ".".join(keys)
            if name in out:
                raise CheckpointFormatError(
                    f"{path}: entries {_origin(origin[name])} and {_origin(keys)} both give the tensor name "
                    f"'{one_line(name, 120)}'; rename one of them."
                )
            out[name], origin[name] = n, keys
        elif isinstance(n, dict) and holds(n):
            if len(keys) >= MAX_DEPTH:
                raise CheckpointFormatError(
                    f"{path}: tensors are nested more than {MAX_DEPTH} dicts deep; the file is corrupt or crafted."
                )
            stack.extend((keys + (_key_text(k),), v) for k, v in reversed(n.items()))
    return out


def _key_text(key: Any) -> str:
    """A dict key as part of a dotted name (an integer key of a ModuleList gives '0')."""
    if isinstance(key, str):
        return key
    try:
        return str(key)
    except ValueError:  # an integer past Python's digit limit
        return f"<integer of {key.bit_length() if isinstance(key, int) else '?'} bits>"


def _origin(keys: tuple[str, ...]) -> str:
    return one_line(" > ".join(f"'{k}'" for k in keys), 160) if keys else "(top level)"


def select_prefix(path: Path, tensors: Mapping[str, T], key: str, tops: Sequence[str] | None = None) -> dict[str, T]:
    """--key on flat names (safetensors, DCP): keep the keys under that dotted prefix, without it.

    `tops` lists the top-level entries to suggest when nothing matches.
    """
    head = key + "."
    picked = {k[len(head):]: v for k, v in tensors.items() if k.startswith(head)}
    if not picked:
        if tops is None:
            raise CheckpointFormatError(f"{path}: no tensor names start with '{head}'.")
        raise CheckpointFormatError(
            f"{path}: no tensors under '{key}' (top-level entries: {listing(list(tops), 12)}); "
            "pass --key with one of them."
        )
    return picked


def strip_prefixes(tensors: dict[str, LazyTensor]) -> tuple[dict[str, LazyTensor], str]:
    stripped = ""
    changed = True
    while changed:
        changed = False
        for p in PREFIXES:
            if tensors and all(k.startswith(p) and len(k) > len(p) for k in tensors):
                tensors = {k[len(p):]: v for k, v in tensors.items()}
                stripped += p
                changed = True
    return tensors, stripped


def change_prefix(path: Path, tensors: dict[str, T], strip: str | None, add: str | None) -> dict[str, T]:
    """Remove `strip` from every name (each must start with it), then put `add` before every name."""
    if strip:
        bare = [k for k in tensors if not k.startswith(strip) or k == strip]
        if bare:
            raise CheckpointFormatError(
                f"{path}: the tensor '{one_line(bare[0], 120)}' does not start with strip_prefix "
                f"'{one_line(strip, 60)}' ({len(bare)} of {len(tensors)} names do not).", params=("strip_prefix",)
            )
        tensors = {k[len(strip):]: v for k, v in tensors.items()}
    if add:
        tensors = {add + k: v for k, v in tensors.items()}
    return tensors
