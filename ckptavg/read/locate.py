"""Where the weights are inside an unpickled training checkpoint, and the name prefixes to strip."""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from ..errors import CheckpointFormatError, CkptavgWarning, listing
from .lazy import LazyTensor

# Where the weights usually hide inside training checkpoints, in the order we look.
WEIGHT_KEYS = ("state_dict", "model", "model_state_dict", "module", "net")
PREFIXES = ("module.", "_orig_mod.")
T = TypeVar("T")


def locate_weights(path: Path, obj: Any, key: str | None) -> tuple[dict[str, LazyTensor], str, list[str]]:
    """Find the state dict inside an unpickled checkpoint.

    Returns the flattened tensors, a description of where they were found, and the other
    top-level entries (for `inspect`).
    """
    top = obj if isinstance(obj, dict) else {}
    if key is not None:
        node = _walk(path, obj, key)
        tensors = dict(flatten(node))
        if not tensors:
            raise CheckpointFormatError(f"{path}: '{key}' holds no tensors.")
        return tensors, key, [k for k in map(str, top) if k != key.split(".")[0]]
    if not isinstance(obj, dict):
        raise CheckpointFormatError(
            f"{path}: holds a {type(obj).__name__}, not a dict of tensors; save model.state_dict() instead."
        )
    for name in WEIGHT_KEYS:
        if isinstance(obj.get(name), dict):
            tensors = dict(flatten(obj[name]))
            if tensors:
                if name == "state_dict" and "current_model_state" in obj:
                    warnings.warn(
                        f"{path}: 'state_dict' holds weights already averaged by Lightning's "
                        "WeightAveraging callback; pass --key current_model_state to average the raw weights.",
                        CkptavgWarning,
                        stacklevel=2,
                    )
                return tensors, name, [str(k) for k in obj if k != name]
    tensors = dict(flatten(obj))
    if not tensors:
        keys = ", ".join(map(str, list(obj)[:12])) or "none"
        raise CheckpointFormatError(
            f"{path}: no tensors found (top-level keys: {keys}); pass --key to say where the weights are."
        )
    return tensors, "(top level)", [str(k) for k, v in obj.items() if not _holds_tensors(v)]


def _walk(path: Path, obj: Any, key: str) -> Any:
    node = obj
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            have = ", ".join(map(str, list(node)[:12])) if isinstance(node, dict) else type(node).__name__
            raise CheckpointFormatError(f"{path}: no entry '{key}' (at '{part}', found: {have}).")
        node = node[part]
    return node


def flatten(node: Any, prefix: str = "") -> Iterable[tuple[str, LazyTensor]]:
    """Yield (dotted name, tensor) for every tensor in nested dicts; other leaves are skipped."""
    if isinstance(node, LazyTensor):
        yield prefix, node
    elif isinstance(node, dict):
        for k, v in node.items():
            yield from flatten(v, f"{prefix}.{k}" if prefix else str(k))


def _holds_tensors(node: Any) -> bool:
    return next(iter(flatten(node)), None) is not None


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
