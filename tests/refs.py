"""Reference helpers for the tests: load fixtures WITHOUT ckptavg, so comparisons are independent."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"
RUNS = FIXTURES / "runs"
MANIFEST = json.loads((RUNS / "MANIFEST.json").read_text())["epochs"]
FORMATS = ["plain", "lightning", "ddp", "safetensors", "hf", "hf-sharded", "hf-bin", "legacy", "timm"]


def load_model_module():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("fixture_model", FIXTURES / "model.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def reference_state_dict(fmt: str, path: Path) -> dict[str, torch.Tensor]:
    """The plain model state dict of one fixture checkpoint, read with torch/safetensors directly."""
    if fmt in ("plain", "legacy"):
        return torch.load(path, weights_only=True)
    if fmt == "ddp":
        return {k.removeprefix("module."): v for k, v in torch.load(path, weights_only=True).items()}
    if fmt == "lightning":
        return {k.removeprefix("model."): v for k, v in torch.load(path, weights_only=True)["state_dict"].items()}
    if fmt == "timm":
        return torch.load(path, weights_only=True)["state_dict"]
    if fmt == "safetensors":
        return load_file(path)
    if fmt == "hf":
        return load_file(path / "model.safetensors")
    if fmt == "hf-bin":
        return torch.load(path / "pytorch_model.bin", weights_only=True)
    if fmt == "hf-sharded":
        out: dict[str, torch.Tensor] = {}
        for shard in sorted(path.glob("model-*.safetensors")):
            out.update(load_file(shard))
        return out
    raise ValueError(fmt)


def fixture_paths(fmt: str) -> list[Path]:
    """The checkpoints of one fixture format, oldest first (by the step/epoch in the name)."""
    base = RUNS / fmt
    if fmt.startswith("hf"):
        return sorted(base.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    items = [p for p in base.iterdir() if p.suffix in (".pt", ".ckpt", ".safetensors", ".tar")]

    def number(p: Path) -> int:
        digits = "".join(ch if ch.isdigit() else " " for ch in p.name).split()
        return int(digits[0])

    return sorted(items, key=number)


def ranged_bytes(t: Any, block: int) -> bytes:
    """A lazy tensor's bytes as the streaming reducer reads them: its `ranges` of `block` elements at a time."""
    got = bytearray()
    for start in range(0, t.numel, block):
        for path, offset, n in t.ranges(start, min(block, t.numel - start)):
            with open(path, "rb") as f:
                f.seek(offset)
                got += f.read(n)
    return bytes(got)
