"""PEFT loads what --lora writes, and its forward pass is that of the base with the mean update merged
(docs/ALGORITHMS.md §13). Skipped where peft or transformers is not installed."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import Result

from ckptavg.methods.lora import lora_pairs, scale

PEFT = Path(__file__).resolve().parent.parent / "fixtures" / "real" / "peft"
TRAINER = [PEFT / "lora-trainer" / f"checkpoint-{s}" for s in (3, 6, 9, 12)]
BASE = PEFT / "lora-trainer-base"
RSLORA = [PEFT / "rslora-manual" / f"step_{s}" for s in (3, 6, 9)]
PREFIX = "base_model.model."

pytestmark = pytest.mark.interop


def _libs() -> tuple[Any, Any]:
    return pytest.importorskip("peft"), pytest.importorskip("transformers")


def _mean_update(folders: Sequence[Path], rank: int | None = None) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Per module: the float64 mean update s Σ w_k B_k A_k (its best rank-`rank` part if given); and the float64
    mean of the other tensors (modules_to_save), under the base model's names."""
    states = [load_file(f / "adapter_model.safetensors") for f in folders]
    config = json.loads((folders[-1] / "adapter_config.json").read_text())
    s = scale(config["r"], config["lora_alpha"], config["use_rslora"])
    pairs = lora_pairs(states[0])
    updates = {}
    for layer, (a, b) in pairs.items():
        m = sum((s * (st[b].double() @ st[a].double()) for st in states), torch.zeros(())) / len(states)
        if rank is not None:
            u, sv, vh = torch.linalg.svd(m, full_matrices=False)
            m = (u[:, :rank] * sv[:rank]) @ vh[:rank]
        updates[layer.removeprefix(PREFIX) + ".weight"] = m
    factors = {k for ab in pairs.values() for k in ab}
    plain = {k.removeprefix(PREFIX): torch.stack([st[k].double() for st in states]).mean(0)
             for k in states[0] if k not in factors}
    return updates, plain


def _merged(model: torch.nn.Module, updates: dict[str, torch.Tensor], plain: dict[str, torch.Tensor]) -> torch.nn.Module:
    """`model` in float64 with the updates added to its weights and the saved modules replaced."""
    model = model.double()
    state = model.state_dict()
    with torch.no_grad():
        for name, m in updates.items():
            state[name] += m
        for name, t in plain.items():
            state[name].copy_(t)
    return model


def _bert_logits(model: torch.nn.Module, dtype: torch.dtype) -> torch.Tensor:
    ids = torch.tensor([[1, 5, 9, 33, 2, 17, 60, 0], [3, 3, 40, 12, 7, 8, 1, 2]])
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits.to(dtype)


@pytest.mark.parametrize(("mode", "rank", "tol"), [("concat", None, 1e-5), ("svd", 4, 1e-5)])
def test_peft_loads_the_average_and_runs_the_mean_update(cli: Callable[..., Result], tmp_path: Path, mode: str,
                                                         rank: int | None, tol: float) -> None:
    peft, transformers = _libs()
    out = tmp_path / mode
    assert cli("swa", *TRAINER, "--lora", mode, "-o", f"{out}/", "-q").exit_code == 0
    auto = transformers.AutoModelForSequenceClassification
    loaded = peft.PeftModel.from_pretrained(auto.from_pretrained(BASE), out)
    got = _bert_logits(loaded, torch.float64)
    want = _bert_logits(_merged(auto.from_pretrained(BASE), *_mean_update(TRAINER, rank)), torch.float64)
    assert float((got - want).norm() / want.norm()) < tol
    if mode == "svd":  # and the truncation is what the error says, not nothing: the exact mean differs
        exact = _bert_logits(_merged(auto.from_pretrained(BASE), *_mean_update(TRAINER)), torch.float64)
        assert not torch.allclose(got, exact, rtol=0, atol=1e-7)


def test_peft_loads_an_rslora_concat(cli: Callable[..., Result], tmp_path: Path) -> None:
    peft, _ = _libs()
    out = tmp_path / "rs"
    assert cli("swa", *RSLORA, "--lora", "concat", "-o", f"{out}/", "-q").exit_code == 0

    def base() -> torch.nn.Sequential:
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(),
                                    torch.nn.Linear(16, 8))
        model.load_state_dict(load_file(PEFT / "rslora-manual-base.safetensors"))
        return model.eval()

    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(0))
    loaded = peft.PeftModel.from_pretrained(base(), out).eval()
    with torch.no_grad():
        got = loaded(x).double()
        want = _merged(base(), *_mean_update(RSLORA))(x.double())
    assert float((got - want).norm() / want.norm()) < 1e-5


def test_merge_loads_with_transformers_and_equals_peft_merge(cli: Callable[..., Result], tmp_path: Path) -> None:
    """`--lora merge` writes a model folder that transformers loads, equal to peft's merge_and_unload of the
    exact (concat) average, and to the base with the float64 mean update merged."""
    peft, transformers = _libs()
    merged, concat = tmp_path / "merged", tmp_path / "concat"
    r = cli("swa", *TRAINER, "--lora", "merge", "--base", BASE, "-o", f"{merged}/")
    assert r.exit_code == 0, r.output
    assert "LoRA: merged into" in r.stdout
    assert cli("swa", *TRAINER, "--lora", "concat", "-o", f"{concat}/", "-q").exit_code == 0
    auto = transformers.AutoModelForSequenceClassification
    ours = auto.from_pretrained(merged)
    theirs = peft.PeftModel.from_pretrained(auto.from_pretrained(BASE), concat).merge_and_unload()
    got, want = ours.state_dict(), theirs.state_dict()
    assert set(got) == set(want)
    base = load_file(BASE / "model.safetensors")
    changed = {k for k in base if not torch.equal(load_file(merged / "model.safetensors")[k], base[k])}
    assert changed == {"bert.encoder.layer.0.attention.self.query.weight",
                       "bert.encoder.layer.0.attention.self.value.weight", "classifier.weight", "classifier.bias"}
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)
    exact = _bert_logits(_merged(auto.from_pretrained(BASE), *_mean_update(TRAINER)), torch.float64)
    logits = _bert_logits(ours, torch.float64)
    assert float((logits - exact).norm() / exact.norm()) < 1e-6
