"""JSON that travels with checkpoints, checked against a small schema before any of it is used.

Hugging Face folders carry `model.safetensors.index.json` (which file holds which tensor) and
`trainer_state.json` (step, epoch, logged metrics); outputs of ckptavg carry their provenance as JSON in
the safetensors metadata. All of it is text from wherever the checkpoint came from: values of the wrong
type, integers of thousands of digits, NaN, nesting thousands deep, and paths that leave the folder are
refused here with a message naming the file and the entry, instead of failing later or reading a file
outside the checkpoint.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any

from ..errors import CheckpointFormatError, first_line, one_line
from .metadata import MAX_COUNT

# Sidecar files larger than this are refused before they are read (a long run's trainer_state.json is a few MB).
MAX_SIDECAR_BYTES = 256 * 1024 * 1024
# Provenance values nested deeper than this, or with more values than this, are not shown as provenance.
MAX_PROVENANCE_DEPTH = 32
MAX_PROVENANCE_VALUES = 1_000_000


def read_json(path: Path) -> dict[str, Any]:
    """Parse a JSON object from `path`: UTF-8, bounded size; deep nesting and oversized numbers are errors."""
    try:
        size = path.stat().st_size
        if size > MAX_SIDECAR_BYTES:
            raise CheckpointFormatError(f"{path}: {size} bytes of JSON, more than any checkpoint sidecar; refusing it.")
        data = json.loads(path.read_bytes().decode("utf-8"))
    except CheckpointFormatError:
        raise
    except OSError as e:
        raise CheckpointFormatError(f"{path}: cannot read ({e.strerror}).") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        # ValueError: JSONDecodeError, and integers past Python's digit limit; RecursionError: nesting
        raise CheckpointFormatError(f"{path}: unreadable JSON ({one_line(e, 160)}); fix or re-create the file.") from None
    if not isinstance(data, dict):
        raise CheckpointFormatError(f"{path}: expected a JSON object; fix or re-create the file.")
    return data


def _text(path: Path, value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise CheckpointFormatError(f"{path}: {what} is {_kind(value)}, not a string; fix or re-create the file.")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise CheckpointFormatError(f"{path}: {what} is not valid Unicode ('{one_line(value, 80)}').") from None
    return value


def _kind(value: Any) -> str:
    """A JSON value as a message shows it: short, whatever it is."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return f"an integer of {len(str(value))} digits" if abs(value) > 10**18 else str(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        return f"the string '{one_line(value, 40)}'"
    return "an object" if isinstance(value, dict) else "an array"


def parse_index(folder: Path, index: Path) -> dict[str, str]:
    """The `weight_map` of a sharded checkpoint's index: tensor name to shard file, each shard a path inside
    `folder` (no absolute paths, no '..', no symlink leading out; the Hugging Face cache's links from
    `snapshots/<revision>/` to its `blobs/` are followed)."""
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointFormatError(f"{index}: has no 'weight_map'; fix or re-create the file.")
    inside = _allowed_roots(folder)
    checked: dict[str, str] = {}
    out: dict[str, str] = {}
    for key, shard in weight_map.items():
        _text(index, key, "a tensor name")
        name = _text(index, shard, f"the shard of '{one_line(key, 80)}'")
        if name not in checked:
            checked[name] = _shard_path(folder, index, key, name, inside)
        out[key] = name
    return out


def _allowed_roots(folder: Path) -> list[Path]:
    roots = [folder.resolve()]
    if folder.resolve().parent.name == "snapshots":  # ~/.cache/huggingface/hub/models--x/snapshots/<rev>/
        roots.append(folder.resolve().parent.parent / "blobs")
    return roots


def _shard_path(folder: Path, index: Path, key: str, name: str, roots: list[Path]) -> str:
    pure = PurePosixPath(name)
    bad = not name or "\0" in name or pure.is_absolute() or os.path.isabs(name) or ".." in pure.parts
    if not bad:
        try:
            target = (folder / name).resolve()
        except (OSError, RuntimeError) as e:  # a name past NAME_MAX or PATH_MAX; RuntimeError: a symlink loop
            why = e.strerror if isinstance(e, OSError) else first_line(e)
            raise CheckpointFormatError(
                f"{index}: the shard of '{one_line(key, 80)}' is '{one_line(name, 120)}', which cannot be opened "
                f"({why}); fix or re-create the index."
            ) from None
        bad = not any(target == root or root in target.parents for root in roots)
    if bad:
        raise CheckpointFormatError(
            f"{index}: the shard of '{one_line(key, 80)}' is '{one_line(name, 120)}', which lies outside the "
            "checkpoint folder; an index may only name files inside its folder."
        )
    return name


def parse_trainer_state(path: Path) -> dict[str, Any]:
    """The entries of `trainer_state.json` that ckptavg uses, checked: `global_step` (a count), `epoch` (a
    finite number >= 0) and `log_history` (a list of objects); absent or null entries are left out."""
    data = read_json(path)
    out: dict[str, Any] = {}
    step = data.get("global_step")
    if step is not None:
        if type(step) is not int or not 0 <= step <= MAX_COUNT:
            raise CheckpointFormatError(
                f"{path}: 'global_step' is {_kind(step)}, not a step count; fix or remove the entry."
            )
        out["global_step"] = step
    epoch = data.get("epoch")
    if epoch is not None:
        if type(epoch) not in (int, float) or not (math.isfinite(epoch) and 0 <= epoch <= MAX_COUNT):
            raise CheckpointFormatError(f"{path}: 'epoch' is {_kind(epoch)}, not an epoch; fix or remove the entry.")
        out["epoch"] = epoch
    history = data.get("log_history")
    if history is not None:
        if not isinstance(history, list) or not all(isinstance(e, dict) for e in history):
            raise CheckpointFormatError(
                f"{path}: 'log_history' is not a list of objects; fix or remove the entry."
            )
        out["log_history"] = history
    return out


def parse_provenance(metadata: Mapping[str, str]) -> dict[str, Any] | None:
    """ckptavg's provenance in a safetensors file's metadata (see results.provenance), for `inspect`:
    version, method, params, order and inputs, or None when there is none or it is damaged (then the raw
    metadata is all there is to show). Parsed values are checked: JSON of the expected shape, finite numbers,
    integers within int64, valid Unicode, bounded nesting and size."""
    if "ckptavg_version" not in metadata:
        return None
    try:
        version, method, order = (_plain_text(metadata.get(k)) for k in ("ckptavg_version", "ckptavg_method",
                                                                          "ckptavg_order"))
        params = _json_value(metadata.get("ckptavg_params", "{}"))
        inputs = _json_value(metadata.get("ckptavg_inputs", "[]"))
    except ValueError:
        return None
    if version is None or not isinstance(params, dict) or not isinstance(inputs, list):
        return None
    return {"version": version, "method": method, "params": params, "order": order, "inputs": inputs}


def _plain_text(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > 10_000:
        raise ValueError("not a short string")
    value.encode("utf-8")  # UnicodeEncodeError is a ValueError
    return value


def _json_value(text: Any) -> Any:
    """Parse and check one provenance JSON value; ValueError for anything outside the schema."""
    if not isinstance(text, str):
        raise ValueError("not JSON text")
    try:
        value = json.loads(text, parse_constant=_no_constant)
    except RecursionError:
        raise ValueError("nested too deep") from None
    count = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        node, depth = stack.pop()
        count += 1
        if depth > MAX_PROVENANCE_DEPTH or count > MAX_PROVENANCE_VALUES:
            raise ValueError("too deep or too large")
        if isinstance(node, dict):
            stack.extend((k, depth + 1) for k in node)
            stack.extend((v, depth + 1) for v in node.values())
        elif isinstance(node, list):
            stack.extend((v, depth + 1) for v in node)
        elif isinstance(node, str):
            node.encode("utf-8")
        elif isinstance(node, float) and not math.isfinite(node):  # 1e999 parses as inf
            raise ValueError("not finite")
        elif isinstance(node, int) and not isinstance(node, bool) and abs(node) > MAX_COUNT:
            raise ValueError("integer out of range")
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")
