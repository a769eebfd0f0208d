"""Ordering and selection rules (--order, --last, --start, --every, --upto)."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
from refs import MANIFEST, RUNS
from safetensors.torch import save_file

from ckptavg import Selection, SelectionError, plan_checkpoints
from ckptavg.select import natural_key, parse_start


def _steps(report) -> list[int]:  # type: ignore[no-untyped-def]
    return [c.meta.step for c in report.checkpoints]


def _epochs(report) -> list[int]:  # type: ignore[no-untyped-def]
    return [c.meta.epoch for c in report.checkpoints]


ALL_STEPS = [e["global_step"] for e in MANIFEST]
N = len(ALL_STEPS)


@pytest.mark.parametrize(
    "sel, expected",
    [
        (Selection(), ALL_STEPS),
        (Selection(last=2), ALL_STEPS[-2:]),
        (Selection(last=100), ALL_STEPS),
        (Selection(start=3), [e["global_step"] for e in MANIFEST if e["epoch"] >= 3]),  # int start: epoch
        (Selection(start=0.5), ALL_STEPS[math.floor(0.5 * N):]),
        (Selection(start=0.8), ALL_STEPS[math.floor(0.8 * N):]),  # Lightning-like fraction
        (Selection(every=2), ALL_STEPS[::2]),
        (Selection(upto=96), [s for s in ALL_STEPS if s <= 96]),
        (Selection(upto=96, last=2), [s for s in ALL_STEPS if s <= 96][-2:]),
        (Selection(start=1, every=2, last=2), [e["global_step"] for e in MANIFEST if e["epoch"] >= 1][::2][-2:]),
    ],
)
def test_selection_on_lightning_fixtures(sel: Selection, expected: list[int]) -> None:
    report = plan_checkpoints(str(RUNS / "lightning"), select=sel)
    assert _steps(report) == expected
    assert report.order == "step"
    assert sum(report.weights.values) == pytest.approx(1.0, abs=1e-12)
    assert all(w == pytest.approx(1 / len(expected)) for w in report.weights.values)


def test_start_uses_step_when_there_is_no_epoch() -> None:
    report = plan_checkpoints(str(RUNS / "ddp"), select=Selection(start=100))
    assert _steps(report) == [s for s in ALL_STEPS if s >= 100]


def test_order_by_epoch_from_file_names_is_natural(tmp_path: Path) -> None:
    for e in (1, 9, 10, 2):
        save_file({"w": torch.full((2,), float(e))}, tmp_path / f"epoch={e}.safetensors")
    report = plan_checkpoints(str(tmp_path))
    assert report.order == "epoch"
    assert _epochs(report) == [1, 2, 9, 10]


def test_order_name_and_mtime(tmp_path: Path) -> None:
    names = ["b.safetensors", "a10.safetensors", "a9.safetensors"]
    for i, n in enumerate(names):
        save_file({"w": torch.full((1,), float(i))}, tmp_path / n)
        os.utime(tmp_path / n, ns=(10**18 + i * 10**9, 10**18 + i * 10**9))
    by_name = plan_checkpoints(str(tmp_path), select=Selection(order="name"))
    assert [c.name for c in by_name.checkpoints] == ["a9.safetensors", "a10.safetensors", "b.safetensors"]
    by_auto = plan_checkpoints(str(tmp_path))
    assert by_auto.order == "name"
    by_mtime = plan_checkpoints(str(tmp_path), select=Selection(order="mtime"))
    assert [c.name for c in by_mtime.checkpoints] == names


def test_mixed_inputs_files_dirs_and_globs() -> None:
    report = plan_checkpoints([
        str(RUNS / "ddp" / "step=72-val_loss=0.1962.pt"),
        str(RUNS / "hf-bin"),  # steps 96, 120, 144: two runs may not share a step
        str(RUNS / "safetensors" / "model_[01].safetensors"),  # steps 24, 48
    ])
    assert len(report.checkpoints) == 1 + 3 + 2


def test_duplicate_inputs_count_once() -> None:
    one = str(RUNS / "plain" / "epoch=1.pt")
    report = plan_checkpoints([one, one, str(RUNS / "plain")])
    assert len(report.checkpoints) == N


@pytest.mark.parametrize(
    "sel, message",
    [
        (Selection(start=99), "leaves no checkpoint"),
        (Selection(upto=1), "leaves no checkpoint"),
    ],
)
def test_empty_selection_is_an_error(sel: Selection, message: str) -> None:
    with pytest.raises(SelectionError, match=message):
        plan_checkpoints(str(RUNS / "lightning"), select=sel)


def test_upto_needs_steps() -> None:
    with pytest.raises(SelectionError, match="step of every checkpoint.*epoch=0.pt"):
        plan_checkpoints(str(RUNS / "plain"), select=Selection(upto=10))


@pytest.mark.parametrize("kwargs", [{"last": 0}, {"every": -1}, {"start": 1.5}, {"start": -1}, {"order": "size"}])
def test_bad_selection_values(kwargs: dict[str, object]) -> None:
    with pytest.raises(SelectionError):
        Selection(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("text, value", [("3", 3), ("0.5", 0.5), ("0", 0)])
def test_parse_start(text: str, value: float) -> None:
    assert parse_start(text) == value and type(parse_start(text)) is type(value)


@pytest.mark.parametrize("text", ["1.0", "1.5", "abc", "-0.5"])
def test_parse_start_rejects(text: str) -> None:
    with pytest.raises(SelectionError):
        parse_start(text)


def test_natural_key() -> None:
    names = ["epoch=10.pt", "epoch=9.pt", "epoch=100.pt", "Epoch=11.pt"]
    assert sorted(names, key=natural_key) == ["epoch=9.pt", "epoch=10.pt", "Epoch=11.pt", "epoch=100.pt"]
