"""Weighting methods: each turns checkpoint metadata into a weight matrix (see `base.py`)."""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    if name == "PLANS":  # the registry is full once every method module is imported
        from . import ema, graft, linear, lr, phema, soup, uniform, wsm  # noqa: F401
        from .base import PLANS

        return PLANS
    raise AttributeError(f"module 'ckptavg.methods' has no attribute {name!r}")
