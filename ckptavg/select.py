"""Order checkpoints (by step, epoch, name or mtime) and choose which of them to average."""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import CkptavgWarning, SelectionError, listing
from .read.checkpoint import Checkpoint
from .read.names import natural_key

ORDERS = ("auto", "step", "epoch", "name", "mtime")


@dataclass(frozen=True)
class Selection:
    """Which checkpoints to use, applied in this order: upto, start, every, best, last.

    Attributes:
        order: ``auto`` (step, else epoch, else natural name), ``step``, ``epoch``, ``name`` or ``mtime``.
        upto: keep checkpoints whose step is at most this.
        start: an int keeps checkpoints whose epoch (or step, without epochs) is at least it; a
            fraction 0 < start < 1 drops the first ``floor(start * N)`` checkpoints (like
            Lightning's ``swa_epoch_start``).
        every: keep every n-th checkpoint, counting from the first one left.
        best, metric, mode: keep the `best` checkpoints by `metric` (``min``: lower is better), in order.
        last: keep the newest k.
    """

    order: str = "auto"
    upto: int | None = None
    start: int | float | None = None
    every: int | None = None
    best: int | None = None
    metric: str | None = None
    mode: str | None = None
    last: int | None = None

    def __post_init__(self) -> None:
        if self.best is not None and self.metric is None:
            raise SelectionError("best needs metric NAME (e.g. metric val_loss).", params=("best", "metric"))
        if self.best is not None and self.mode not in ("min", "max"):
            raise SelectionError(
                f"best {self.best} with metric {self.metric} needs a direction: pass select.mode min (lower is "
                "better, e.g. a loss) or select.mode max (e.g. an accuracy).", params=("best", "metric", "select.mode")
            )
        if self.order not in ORDERS:
            raise SelectionError(f"order must be one of {', '.join(ORDERS)}, not {self.order!r}.", params=("order",))
        for name in ("every", "last", "best"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise SelectionError(f"{name} must be a positive integer, not {value!r}.", params=(name,))
        if self.upto is not None and self.upto < 0:
            raise SelectionError(f"upto must be a step >= 0, not {self.upto!r}.", params=("upto",))
        s = self.start
        if s is not None and not (
            (isinstance(s, int) and s >= 0) or (isinstance(s, float) and 0 < s < 1)
        ):
            raise SelectionError(f"start must be an integer >= 0 or a fraction 0 < S < 1, not {s!r}.", params=("start",))


def parse_start(text: str) -> int | float:
    """Parse ``--start``: ``"3"`` is epoch 3 (an int); ``"0.5"`` is a fraction."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        value = float(text)
    except ValueError:
        raise SelectionError(f"start must be an integer or a fraction, not {text!r}.", params=("start",)) from None
    if not 0 < value < 1:
        raise SelectionError(f"start as a fraction must be between 0 and 1 (exclusive), not {text}.", params=("start",))
    return value


def order_checkpoints(ckpts: Sequence[Checkpoint], order: str = "auto", identity: Mapping[Path, int] | None = None,
                      profiles: bool = False) -> tuple[list[Checkpoint], str]:
    """Sort checkpoints oldest first; return them and the order actually used.

    Two different checkpoints at one step are an error (two runs mixed, or two EMA profiles), but for
    `profiles` (a plan that combines the snapshots of several EMA profiles) when their profiles differ;
    checkpoints with one `identity` are one checkpoint named twice (see `refuse_twice`).
    """
    used = order
    if order == "auto":
        if all(c.meta.step is not None for c in ckpts):
            used = "step"
        elif all(c.meta.epoch is not None for c in ckpts):
            used = "epoch"
        else:
            used = "name"
    if used in ("step", "epoch"):
        _require(ckpts, used, f"order {used}", "order")

    def key(c: Checkpoint) -> tuple[object, ...]:
        name = natural_key(str(c.path))
        if used == "step":
            return (c.meta.step, name)
        if used == "epoch":
            return (c.meta.epoch, name)
        if used == "mtime":
            return (c.path.stat().st_mtime_ns, name)
        return (name,)

    ordered = sorted(ckpts, key=key)
    _refuse_same_step(ordered, identity or {}, profiles)
    _warn_mixed(ordered, order, used)
    return ordered, used


def _profile(c: Checkpoint) -> tuple[object, ...]:
    return (c.meta.ema_index, c.meta.sigma_rel, c.meta.gamma)


def _refuse_same_step(ordered: Sequence[Checkpoint], identity: Mapping[Path, int], profiles: bool) -> None:
    """Two different checkpoints at one step: two runs mixed, or the snapshots of two EMA profiles."""
    by_step: dict[int, Checkpoint] = {}
    for c in ordered:
        if c.meta.step is None:
            continue
        a = by_step.setdefault(c.meta.step, c)
        if a is c or (a.path in identity and identity.get(a.path) == identity.get(c.path)):
            continue
        differ = _profile(a) != _profile(c)
        if profiles and differ:
            continue
        what = ("snapshots of two EMA profiles: average one profile at a time" if differ else
                "two runs mixed? Give the checkpoints of one run")
        raise SelectionError(f"{a.path} ({a.meta.step_source}) and {c.path} ({c.meta.step_source}) are two different "
                             f"checkpoints at step {c.meta.step}: {what}.")


def refuse_twice(chosen: Sequence[Checkpoint], identity: Mapping[Path, int]) -> None:
    """Refuse a selection that counts one checkpoint twice (the same file or bytes, named twice)."""
    first: dict[int, Checkpoint] = {}
    for c in chosen:
        if c.path not in identity:
            continue
        a = first.setdefault(identity[c.path], c)
        if a is not c:
            raise SelectionError(f"{a.path} and {c.path} are one checkpoint (the same file or the same bytes): the "
                                 "selection would count it twice. Name it once, or narrow the selection (last, best).",
                                 params=("last", "best"))


def _warn_mixed(ordered: Sequence[Checkpoint], asked: str, used: str) -> None:
    """Warn when the checkpoints look like more than one run: epochs that repeat, or an automatic order that
    fell back to file names because only some checkpoints know their step."""
    if used == "epoch":
        same = [(a, b) for a, b in zip(ordered, ordered[1:], strict=False) if a.meta.epoch == b.meta.epoch]
        if same:
            a, b = same[0]
            warnings.warn(CkptavgWarning(
                f"{a.name} and {b.name} are both at epoch {a.meta.epoch}: two runs mixed, or one checkpoint "
                "saved twice? Give the checkpoints of one run."), stacklevel=3)
    elif asked == "auto" and used == "name" and any(c.meta.step is not None for c in ordered):
        unknown = [c.name for c in ordered if c.meta.step is None]
        warnings.warn(CkptavgWarning(
            f"ordered by file name, because the step of {listing(unknown, 3)} is unknown: are these checkpoints of "
            "one run? Pass order to choose.", params=("order",)), stacklevel=3)


def _require(ckpts: Sequence[Checkpoint], field: str, why: str, param: str) -> None:
    missing = [c.name for c in ckpts if getattr(c.meta, field) is None]
    if missing:
        raise SelectionError(f"{why} needs the {field} of every checkpoint, but it is unknown for {listing(missing, 5)}.",
                             params=(param,))


def select_checkpoints(ordered: Sequence[Checkpoint], sel: Selection) -> list[Checkpoint]:
    """Apply ``upto``, ``start``, ``every`` and ``last`` to checkpoints already in order."""
    chosen = list(ordered)
    if not chosen:
        raise SelectionError("no checkpoints to select from.")
    if sel.upto is not None:
        _require(chosen, "step", f"upto {sel.upto}", "upto")
        chosen = [c for c in chosen if c.meta.step is not None and c.meta.step <= sel.upto]
        _nonempty(chosen, f"upto {sel.upto}", "upto")
    if isinstance(sel.start, float):
        chosen = chosen[math.floor(sel.start * len(chosen)):]
        _nonempty(chosen, f"start {sel.start}", "start")
    elif isinstance(sel.start, int):
        field = "epoch" if all(c.meta.epoch is not None for c in chosen) else "step"
        _require(chosen, field, f"start {sel.start}", "start")
        chosen = [c for c in chosen if getattr(c.meta, field) >= sel.start]
        _nonempty(chosen, f"start {sel.start} (compared with each checkpoint's {field})", "start")
    if sel.every is not None:
        chosen = chosen[:: sel.every]
    for name in ("best", "last"):
        asked = getattr(sel, name)
        if asked is not None and asked > len(chosen):
            warnings.warn(CkptavgWarning(f"{name} {asked} asked for, but only {len(chosen)} checkpoints are left to "
                                         "choose from; all of them are used.", params=(name,)), stacklevel=2)
    if sel.best is not None:
        chosen = _best(chosen, sel)
    if sel.last is not None:
        chosen = chosen[-sel.last:]
    return chosen


def _nonempty(chosen: list[Checkpoint], why: str, param: str) -> None:
    if not chosen:
        raise SelectionError(f"{why} leaves no checkpoint to average.", params=(param,))


def find_metric(metrics: Mapping[str, tuple[float, str]], name: str) -> tuple[str, tuple[float, str]] | None:
    """The metric `name` means: ``=name`` exactly; ``eval_loss`` exactly; ``loss`` the one of ``loss`` and
    ``eval_loss`` that exists, and an error when both do (a training loss is rarely what ``--best`` wants)."""
    if name.startswith("="):
        exact = name[1:]
        return (exact, metrics[exact]) if exact in metrics else None
    candidates = [n for n in dict.fromkeys((name, "eval_" + name)) if n in metrics]
    if name.startswith("eval_") and name in metrics:
        candidates = [name]
    if len(candidates) > 1:
        found = ", ".join(f"{n} ({metrics[n][1]})" for n in candidates)
        raise SelectionError(f"metric '{name}' matches {found}; pass metric eval_{name} for the evaluation value, "
                             f"or metric ={name} for exactly '{name}'.", params=("metric",))
    return (candidates[0], metrics[candidates[0]]) if candidates else None


def metric_values(ckpts: Sequence[Checkpoint], name: str) -> list[float]:
    """The metric `name` of each checkpoint (see `find_metric`), or an error naming those that lack it."""
    found = [find_metric(c.meta.metrics, name) for c in ckpts]
    missing = [c.name for c, f in zip(ckpts, found, strict=True) if f is None]
    if missing:
        known = sorted({k for c in ckpts for k in c.meta.metrics})
        hint = f" Metrics found: {', '.join(known[:12])}." if known else ""
        raise SelectionError(f"metric '{name}' is missing for {listing(missing, 5)}.{hint}", params=("metric",))
    return [f[1][0] for f in found if f is not None]


def _best(chosen: list[Checkpoint], sel: Selection) -> list[Checkpoint]:
    assert sel.metric is not None and sel.best is not None
    values = metric_values(chosen, sel.metric)
    sign = 1.0 if sel.mode == "min" else -1.0
    # ties go to the newer checkpoint; the result keeps checkpoint order
    ranked = sorted(range(len(chosen)), key=lambda i: (sign * values[i], -i))[: sel.best]
    return [chosen[i] for i in sorted(ranked)]
