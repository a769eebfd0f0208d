"""Where a checkpoint recorded its learning rate: the optimizer or scheduler state saved with it, or the
per-step log of a Hugging Face trainer_state.json (docs/ALGORITHMS.md §11)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .metadata import Meta, as_number, dig, rate

LR_PLACES = (
    "trainer_state.json log_history[*].learning_rate",
    "optimizer_states[0].param_groups[0].lr (Lightning)",
    "lr_schedulers[0]._last_lr[0] (Lightning)",
    "optimizer.param_groups[0].lr (also under optimizer_state_dict, optim)",
    "_last_lr[0] of a scheduler state (lr_scheduler, scheduler)",
    "'lr' or 'learning_rate' in safetensors metadata",
)
"""Where ckptavg looks for a checkpoint's learning rate, in order (docs/ALGORITHMS.md §11); for messages."""


_LR_PATHS: tuple[tuple[str | int, ...], ...] = (
    ("optimizer_states", 0, "param_groups", 0, "lr"),
    ("lr_schedulers", 0, "_last_lr", 0),
    *((key, "param_groups", 0, "lr") for key in ("optimizer", "optimizer_state_dict", "optim")),
    *((key, "_last_lr", 0) for key in ("lr_scheduler", "scheduler")),
)


def lr_from_checkpoint(obj: Mapping[Any, Any]) -> Meta:
    """The learning rate saved in a training checkpoint dict, in the order of `LR_PLACES` (first param group).

    Optimizer and scheduler states hold the rate for the next step as a plain float (a tensor is loaded).
    """
    for path in _LR_PATHS:
        lr = rate(dig(obj, path))
        if lr is not None:
            where = "".join(f"[{k}]" if isinstance(k, int) else f".{k}" for k in path).lstrip(".")
            return Meta(lr=lr, lr_source=f"checkpoint {where}")
    return Meta()


def lr_history_from_trainer_state(state: Mapping[str, Any]) -> Meta:
    """The (step, learning_rate) pairs of trainer_state.json's log_history, by step (a later entry wins), and
    the rate logged last at or before the checkpoint's global step."""
    logged: dict[int, float] = {}
    for entry in state.get("log_history") or ():
        if isinstance(entry, dict):
            step, lr = as_number(entry.get("step")), rate(entry.get("learning_rate"))
            if isinstance(step, int) and step >= 0 and lr is not None:
                logged[step] = lr
    if not logged:
        return Meta()
    history = tuple(sorted(logged.items()))
    end = as_number(state.get("global_step"))
    upto = [h for h in history if not isinstance(end, int) or h[0] <= end] or [history[0]]
    return Meta(lr=upto[-1][1], lr_source=f"trainer_state.json log_history (step {upto[-1][0]})", lr_history=history)
