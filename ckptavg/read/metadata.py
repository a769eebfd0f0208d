"""What a checkpoint says about itself: step, epoch, metrics, learning rate, and the power-EMA profile of a
stored EMA snapshot, each with the place it was read from."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..errors import CheckpointFormatError
from .lazy import LazyTensor

STEP_KEYS = ("global_step", "step", "num_updates", "iteration")
EPOCH_KEYS = ("epoch",)

_BOUND = r"(?:^|(?<=[^A-Za-z]))"  # the word must not continue a longer word ("step" in "timestep" is fine)
_STEP_NAME = [
    re.compile(_BOUND + r"(?:global_)?steps?[=_-]?(\d+)", re.I),
    re.compile(_BOUND + r"iter(?:ation)?s?[=_-]?(\d+)", re.I),
]
_FOLDER_STEP = re.compile(r"^checkpoint-(\d+)$")
_EPOCH_NAME = [
    re.compile(_BOUND + r"epochs?[=_-]?(\d+)", re.I),
    re.compile(_BOUND + r"ep[=_-]?(\d+)", re.I),
]

# EDM2 snapshots: network-snapshot-{kimg:07d}-{std:.3f}.pkl (std is sigma_rel; t counted in kimg)
_EDM2_NAME = re.compile(r"^network-snapshot-(\d+)-(\d*\.?\d+)\.[A-Za-z]+$")
# ema-pytorch PostHocEMA snapshots: {profile index}.{step}.pt
_POSTHOC_NAME = re.compile(r"^(\d+)\.(\d+)\.pt$")
# fairseq: checkpoint_{epoch}_{updates}.pt (mid-epoch saves) and checkpoint{epoch}.pt (end of an epoch)
_FAIRSEQ_UPDATES = re.compile(r"^checkpoint_(\d{1,18})_(\d{1,18})\.pt$")
_FAIRSEQ_EPOCH = re.compile(r"^checkpoint(\d{1,18})\.pt$")

_NAME_METRIC = re.compile(r"([A-Za-z][A-Za-z0-9_]*)=(-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)")

Number = int | float


@dataclass(frozen=True)
class Meta:
    """Step and epoch of one checkpoint, and where each came from (None when unknown)."""

    step: int | None = None
    step_source: str | None = None
    epoch: Number | None = None
    epoch_source: str | None = None
    metrics: dict[str, tuple[float, str]] = field(default_factory=dict)  # name -> (value, source)
    lr: float | None = None
    lr_source: str | None = None
    lr_history: tuple[tuple[int, float], ...] = ()  # (step, lr) logged during training, by step; held until the next
    sigma_rel: float | None = None  # power-EMA profile of a stored EMA snapshot (docs/ALGORITHMS.md §14)
    gamma: float | None = None
    profile_source: str | None = None
    ema_index: int | None = None  # ema-pytorch PostHocEMA profile index, from the file name {index}.{step}.pt

    def metric(self, name: str) -> tuple[float, str] | None:
        """The value of metric `name` and its source; ``loss`` also finds Hugging Face's ``eval_loss``."""
        for candidate in (name, "eval_" + name, name.removeprefix("eval_")):
            if candidate in self.metrics:
                return self.metrics[candidate]
        return None

    def fill(self, other: Meta) -> Meta:
        """Fill the unknown fields of this Meta from `other` (metrics: add the names it lacks)."""
        out = replace(self, metrics={**other.metrics, **self.metrics})
        if out.step is None and other.step is not None:
            out = replace(out, step=other.step, step_source=other.step_source)
        if out.epoch is None and other.epoch is not None:
            out = replace(out, epoch=other.epoch, epoch_source=other.epoch_source)
        if out.lr is None and other.lr is not None:
            out = replace(out, lr=other.lr, lr_source=other.lr_source)
        if not out.lr_history and other.lr_history:
            out = replace(out, lr_history=other.lr_history)
        if out.sigma_rel is None and out.gamma is None and (other.sigma_rel is not None or other.gamma is not None):
            out = replace(out, sigma_rel=other.sigma_rel, gamma=other.gamma, profile_source=other.profile_source)
        if out.ema_index is None and other.ema_index is not None:
            out = replace(out, ema_index=other.ema_index)
        return out


# Steps and epochs beyond this are refused: no run takes 2**63 steps, and larger values overflow int64 and
# float conversions downstream.
MAX_COUNT = 2**63 - 1


def as_number(value: Any) -> Number | None:
    """A finite int or float, or None; ints too large for a float are None (a seed, a hash: not a metric)."""
    if isinstance(value, LazyTensor):
        if value.numel != 1 or value.dtype.is_complex:
            return None
        value = value.load().item()
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return None
    if isinstance(value, int):
        return value if value.bit_length() <= 1000 else None
    if isinstance(value, float) and math.isfinite(value):
        return int(value) if value.is_integer() else value
    return None


def _finite(value: Number) -> float | None:
    try:
        return float(value)
    except OverflowError:
        return None


def meta_from_mapping(obj: Mapping[Any, Any], source: str, path: Path | None = None) -> Meta:
    """Read step and epoch from the top level of a checkpoint dict or trainer_state.json (`path`: the file,
    for messages). A step or epoch past MAX_COUNT is a CheckpointFormatError."""
    step = epoch = None
    step_src = epoch_src = None
    for key in STEP_KEYS:
        n = as_number(obj.get(key))
        if isinstance(n, int) and n >= 0:
            _count(n, path, source, key)
            step, step_src = n, f"{source} '{key}'"
            break
    for key in EPOCH_KEYS:
        n = as_number(obj.get(key))
        if n is not None and n >= 0:
            epoch, epoch_src = _count(n, path, source, key), f"{source} '{key}'"
            break
    return Meta(step, step_src, epoch, epoch_src, _numeric_entries(obj, source)).fill(_fairseq(obj, source, path))


# fairseq keeps its update count in the optimizer history and its epoch in the iterator state
_FAIRSEQ_PLACES: tuple[tuple[str, tuple[str | int, ...]], ...] = (
    ("step", ("optimizer_history", -1, "num_updates")),
    ("epoch", ("extra_state", "train_iterator", "epoch")),
    ("epoch", ("extra_state", "epoch")),
)


def _fairseq(obj: Mapping[Any, Any], source: str, path: Path | None) -> Meta:
    """fairseq's stored counts: ``optimizer_history[-1]["num_updates"]`` and the ``extra_state`` epoch."""
    out = Meta()
    for field_name, where in _FAIRSEQ_PLACES:
        n = as_number(dig(obj, where))
        if n is None or n < 0 or getattr(out, field_name) is not None or (field_name == "step" and not isinstance(n, int)):
            continue
        text = "".join(f"[{k}]" if isinstance(k, int) else f"['{k}']" for k in where)
        _count(n, path, source, text)
        src = f"{source} {text} (fairseq)"
        out = replace(out, step=int(n), step_source=src) if field_name == "step" else replace(
            out, epoch=n, epoch_source=src)
    return out


def _count(n: Number, path: Path | None, source: str, key: str) -> Number:
    if n > MAX_COUNT:
        where = f"{path}: " if path is not None else ""
        raise CheckpointFormatError(
            f"{where}{source} '{key}' is {_digits(n)}, too large for a step or epoch; fix or remove that entry."
        )
    return n


def _digits(n: Number) -> str:
    text = f"{n:.3g}" if isinstance(n, float) else (str(n) if n.bit_length() < 200 else f"a {len(str(n))}-digit number")
    return text


def _numeric_entries(obj: Mapping[Any, Any], source: str) -> dict[str, tuple[float, str]]:
    skip = set(STEP_KEYS) | set(EPOCH_KEYS)
    found = {}
    for k, v in obj.items():
        # tensors at the top level are weights of a bare state dict, never metrics
        if isinstance(k, str) and k not in skip and not isinstance(v, dict | list | LazyTensor):
            n = as_number(v)
            f = _finite(n) if n is not None else None
            if f is not None:
                found[k] = (f, f"{source} '{k}'")
    return found


def metrics_from_checkpoint(obj: Mapping[Any, Any], file_name: str) -> dict[str, tuple[float, str]]:
    """Metrics stored in a training checkpoint: timm's `metric`/`metrics`, Lightning's ModelCheckpoint state."""
    found = {}
    nested = obj.get("metrics")
    if isinstance(nested, dict):
        found.update(_numeric_entries(nested, "checkpoint 'metrics'"))
    callbacks = obj.get("callbacks")
    for state in callbacks.values() if isinstance(callbacks, dict) else ():
        if not isinstance(state, dict) or not isinstance(state.get("monitor"), str):
            continue
        score = as_number(state.get("current_score"))
        if score is None and isinstance(state.get("best_k_models"), dict):
            score = next((as_number(v) for k, v in state["best_k_models"].items()
                          if str(k).replace("\\", "/").rsplit("/", 1)[-1] == file_name), None)
        value = _finite(score) if score is not None else None
        if value is not None:
            found[state["monitor"]] = (value, "Lightning ModelCheckpoint")
    return found


def metrics_from_trainer_state(state: Mapping[str, Any]) -> dict[str, tuple[float, str]]:
    """The log_history entries of trainer_state.json logged at this checkpoint's global step."""
    found: dict[str, tuple[float, str]] = {}
    step = state.get("global_step")
    for entry in state.get("log_history") or ():
        if isinstance(entry, dict) and entry.get("step") == step:
            found.update(_numeric_entries(entry, "trainer_state.json log_history"))
    return found


def dig(obj: Any, path: tuple[str | int, ...]) -> Any:
    """The entry at `path` (keys and list indices) inside nested checkpoint containers, or None."""
    for key in path:
        if isinstance(key, int):
            if not isinstance(obj, list | tuple) or not -len(obj) <= key < len(obj):
                return None
        elif not isinstance(obj, Mapping) or key not in obj:
            return None
        obj = obj[key]
    return obj


def rate(value: Any) -> float | None:
    """A learning rate as stored (a number or a one-element tensor), when it is finite and >= 0."""
    n = as_number(value)
    return float(n) if n is not None and math.isfinite(n) and n >= 0 else None


def extras_from_metadata(file_meta: Mapping[str, str], source: str = "safetensors metadata") -> Meta:
    """Learning rate (``lr``, ``learning_rate``) and power-EMA profile (``sigma_rel``, ``ema_sigma_rel``, ``gamma``,
    ``ema_gamma``) from a safetensors header's string metadata."""
    out = Meta()
    lr_key = next((k for k in ("lr", "learning_rate") if rate(file_meta.get(k)) is not None), None)
    if lr_key is not None:
        out = replace(out, lr=rate(file_meta[lr_key]), lr_source=f"{source} '{lr_key}'")
    for key, is_sigma in (("sigma_rel", True), ("ema_sigma_rel", True), ("gamma", False), ("ema_gamma", False)):
        value = rate(file_meta.get(key))
        if value is not None:
            return replace(out, sigma_rel=value if is_sigma else None, gamma=None if is_sigma else value,
                           profile_source=f"{source} '{key}'")
    return out


def meta_from_name(name: str, folder: bool = False) -> Meta:
    """Read step and epoch from a file or folder name (``step=1200``, ``epoch=3``, ``checkpoint-1200/``), and the
    snapshot names of EDM2 (``network-snapshot-0065536-0.100.pkl``: step in kimg, sigma_rel) and of ema-pytorch's
    PostHocEMA (``{index}.{step}.pt``: profile index and step)."""
    if not folder and (edm2 := _EDM2_NAME.match(name)):
        return Meta(int(edm2.group(1)), "file name (EDM2 kimg)", sigma_rel=float(edm2.group(2)),
                    profile_source="file name (EDM2 std)")
    if not folder and (posthoc := _POSTHOC_NAME.match(name)):
        return Meta(int(posthoc.group(2)), "file name (PostHocEMA {index}.{step}.pt)",
                    ema_index=int(posthoc.group(1)))
    if not folder and (fairseq := _FAIRSEQ_UPDATES.match(name)):
        return Meta(int(fairseq.group(2)), "file name (fairseq checkpoint_{epoch}_{updates}.pt)",
                    int(fairseq.group(1)), "file name (fairseq checkpoint_{epoch}_{updates}.pt)")
    if not folder and (fairseq := _FAIRSEQ_EPOCH.match(name)):
        return Meta(epoch=int(fairseq.group(1)), epoch_source="file name (fairseq checkpoint{epoch}.pt)")
    m = _FOLDER_STEP.match(name) if folder else None
    if m is None:
        m = next((found for p in _STEP_NAME if (found := p.search(name))), None)
    e = next((found for p in _EPOCH_NAME if (found := p.search(name))), None)
    step = int(m.group(1)) if m and len(m.group(1)) < 19 else None  # longer digit runs are no step (a hash?)
    epoch = int(e.group(1)) if e and len(e.group(1)) < 19 else None
    metrics = {k: (float(v), "file name") for k, v in _NAME_METRIC.findall(name)
               if k.lower() not in ("step", "global_step", "epoch", "iter", "iteration") and math.isfinite(float(v))}
    return Meta(step, "file name" if step is not None else None, epoch, "file name" if epoch is not None else None, metrics)
