"""Learning-rate weights (ckptavg.methods.lr) and where the rates are read from (ckptavg.read.metadata):
docs/ALGORITHMS.md §11's worked example, a step-by-step brute force, and real files written here."""

from __future__ import annotations

import json
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from ckptavg.errors import PlanError
from ckptavg.methods.lr import LrWeighted, lr_weights
from ckptavg.read.layouts import open_checkpoint
from ckptavg.read.lr_records import LR_PLACES
from ckptavg.read.metadata import Meta

STEPS = [100, 200, 300, 400]
LRS = [0.1, 0.05, 0.025, 0.0125]
WORKED = {1.0: [0.533333, 0.266667, 0.133333, 0.066667], 2.0: [0.752941, 0.188235, 0.047059, 0.011765]}


@dataclass(frozen=True)
class Ckpt:
    name: str
    path: Path
    meta: Meta


def entries(steps: Sequence[int | None], lrs: Sequence[float | None], history: list[Any] | None = None) -> list[Ckpt]:
    hist = tuple(history or ())
    return [Ckpt(f"c{i}", Path(f"c{i}.pt"), Meta(step=s, lr=lr, lr_source="test", lr_history=hist))
            for i, (s, lr) in enumerate(zip(steps, lrs, strict=True))]


@pytest.mark.parametrize("power", sorted(WORKED))
def test_worked_example_saved_rates(power: float) -> None:
    matrix = LrWeighted(lr_power=power).weights(entries(STEPS, LRS))
    assert list(matrix.rows[0].values) == pytest.approx(WORKED[power], abs=1e-6)
    assert matrix.details["lr"] == LRS and matrix.details["lr_source"] == ["test"] * 4
    assert "held" in matrix.details["integration"]


@pytest.mark.parametrize("power", sorted(WORKED))
def test_worked_example_as_a_logged_record(power: float) -> None:
    """A record that changes at the first step of each block gives the same weights, integrated per step."""
    history = [(1, 0.1), (101, 0.05), (201, 0.025), (301, 0.0125)]
    matrix = LrWeighted(lr_power=power).weights(entries(STEPS, [None] * 4, history))
    assert list(matrix.rows[0].values) == pytest.approx(WORKED[power], abs=1e-6)
    assert "per step" in matrix.details["integration"]


def _rate_at(t: int, history: list[tuple[int, float]]) -> float:
    rate = history[0][1]
    for step, lr in history:
        if step <= t:
            rate = lr
    return rate


def _owner(t: int, steps: list[int], hold: str) -> int:
    """Which checkpoint stands for optimizer step t (docs/ALGORITHMS.md §2.3), decided step by step."""
    for k, s in enumerate(steps):
        last = k == len(steps) - 1
        end = s if hold == "backward" or last else (s + steps[k + 1]) // 2 if hold == "midpoint" else steps[k + 1] - 1
        if t <= end:
            return k
    raise AssertionError(t)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("hold", ["backward", "midpoint", "forward"])
def test_logged_record_against_a_step_by_step_sum(hold: str, seed: int) -> None:
    rng = random.Random(seed)
    steps = sorted(rng.sample(range(1, 600), 5))
    history = sorted({rng.randrange(0, 650): rng.uniform(0.0, 1e-3) for _ in range(rng.randrange(1, 30))}.items())
    power = rng.choice([0.5, 1.0, 2.0])
    sums = [0.0] * len(steps)
    for t in range(1, steps[-1] + 1):
        sums[_owner(t, steps, hold)] += _rate_at(t, history) ** power
    expected = [s / math.fsum(sums) for s in sums]
    got = lr_weights(steps, history=history, power=power, hold=hold)
    assert got == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_first_checkpoint_at_step_zero_gets_nothing() -> None:
    assert lr_weights([0, 10, 20], [1.0, 1.0, 1.0])[0] == 0.0


def test_mixed_records_fall_back_to_saved_rates() -> None:
    ckpts = entries(STEPS, LRS)
    ckpts[0] = Ckpt("c0", Path("c0"), Meta(step=100, lr=0.1, lr_source="x", lr_history=((1, 5.0),)))
    values = LrWeighted().weights(ckpts).rows[0].values
    assert list(values) == pytest.approx(WORKED[1.0], abs=1e-6)


# ---------------------------------------------------------------- real files

def _state() -> dict[str, torch.Tensor]:
    return {"layer.weight": torch.ones(2, 3), "layer.bias": torch.zeros(2)}


TORCH_FILES: list[tuple[str, Any, str]] = [
    ("lightning-optimizer", lambda lr: {"optimizer_states": [{"state": {}, "param_groups": [{"lr": lr, "momentum": 0.9}]}],
                                        "lr_schedulers": [{"_last_lr": [99.0]}]},
     "checkpoint optimizer_states[0].param_groups[0].lr"),
    ("lightning-scheduler", lambda lr: {"optimizer_states": [], "lr_schedulers": [{"_last_lr": [lr, 1.0]}]},
     "checkpoint lr_schedulers[0]._last_lr[0]"),
    ("plain-optimizer", lambda lr: {"optimizer": {"state": {}, "param_groups": [{"lr": lr}, {"lr": 7.0}]}},
     "checkpoint optimizer.param_groups[0].lr"),
    ("tensor-lr", lambda lr: {"optimizer_state_dict": {"state": {}, "param_groups": [{"lr": torch.tensor(lr)}]}},
     "checkpoint optimizer_state_dict.param_groups[0].lr"),
    ("scheduler", lambda lr: {"scheduler": {"_last_lr": [lr], "last_epoch": 3}}, "checkpoint scheduler._last_lr[0]"),
]


@pytest.mark.parametrize(("kind", "build", "source"), TORCH_FILES, ids=[f[0] for f in TORCH_FILES])
def test_rates_from_torch_checkpoints(kind: str, build: Any, source: str, tmp_path: Path) -> None:
    paths = []
    for step, lr in zip(STEPS, LRS, strict=True):
        path = tmp_path / f"run-step={step}.ckpt"
        torch.save({"state_dict": _state(), "global_step": step, **build(lr)}, path)
        paths.append(path)
    ckpts = [open_checkpoint(p) for p in paths]
    assert [c.meta.lr for c in ckpts] == pytest.approx(LRS, rel=1e-7)
    assert {c.meta.lr_source for c in ckpts} == {source}
    values = LrWeighted(lr_power=2).weights(ckpts).rows[0].values
    assert list(values) == pytest.approx(WORKED[2.0], abs=1e-6)


def test_rates_from_a_hugging_face_log(tmp_path: Path) -> None:
    """Each checkpoint folder's trainer_state.json logs the rate every 50 steps (a linear decay)."""
    log = [(s, 0.1 * (1 - s / 500)) for s in range(50, 401, 50)]
    for step in STEPS:
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        save_file(_state(), folder / "model.safetensors")
        history = [{"step": s, "learning_rate": lr, "loss": 1.0} for s, lr in log if s <= step]
        history.append({"step": step, "eval_loss": 0.5})  # an evaluation entry without a rate
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": history}))
    ckpts = [open_checkpoint(tmp_path / f"checkpoint-{s}") for s in STEPS]
    assert [c.meta.lr for c in ckpts] == pytest.approx([0.1 * (1 - s / 500) for s in STEPS])
    assert ckpts[-1].meta.lr_history == tuple(log)
    assert ckpts[0].meta.lr_source == "trainer_state.json log_history (step 100)"
    matrix = LrWeighted().weights(ckpts)
    sums = [0.0] * 4
    for t in range(1, 401):
        sums[(t - 1) // 100] += _rate_at(t, log)
    assert list(matrix.rows[0].values) == pytest.approx([s / sum(sums) for s in sums], rel=1e-12)
    assert "per step" in matrix.details["integration"]


def test_rate_from_safetensors_metadata(tmp_path: Path) -> None:
    path = tmp_path / "a.safetensors"
    save_file(_state(), path, metadata={"step": "100", "learning_rate": "0.003"})
    meta = open_checkpoint(path).meta
    assert (meta.lr, meta.lr_source) == (0.003, "safetensors metadata 'learning_rate'")


def test_missing_rate_names_where_ckptavg_looked(tmp_path: Path) -> None:
    paths = []
    for step in STEPS[:2]:
        path = tmp_path / f"m-step={step}.pt"
        torch.save({"state_dict": _state(), "global_step": step, "optimizer": {"param_groups": []}}, path)
        paths.append(path)
    with pytest.raises(PlanError) as info:
        LrWeighted().weights([open_checkpoint(p) for p in paths])
    message = str(info.value)
    assert "m-step=100.pt, m-step=200.pt" in message
    assert all(place in message for place in LR_PLACES)


@pytest.mark.parametrize(("kwargs", "message", "params"), [
    ({"lr_power": 0.0}, "lr_power must be a finite number > 0, not 0.0", ("lr_power",)),
    ({"lr_power": math.inf}, "lr_power must be", ("lr_power",)),
    ({"hold": "sideways"}, "hold must be one of", ("hold",)),
])
def test_bad_parameters(kwargs: dict[str, Any], message: str, params: tuple[str, ...]) -> None:
    with pytest.raises(PlanError, match=message) as info:
        LrWeighted(**kwargs)
    assert info.value.params == params


@pytest.mark.parametrize(("steps", "lrs", "message"), [
    ([100, None], [0.1, 0.1], "optimizer step .* unknown for c1"),
    ([100, 100], [0.1, 0.1], "strictly increasing"),
    ([100, 200], [0.0, 0.0], "learning rate 0"),
])
def test_bad_metadata(steps: list[int | None], lrs: list[float], message: str) -> None:
    with pytest.raises(PlanError, match=message):
        LrWeighted().weights(entries(steps, lrs))
