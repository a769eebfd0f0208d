"""Several outputs from one read through the API: sweeps and windows written to templates or folders, each
equal to its single-output run, committed together; evaluated rows keep the best (docs/ALGORITHMS.md §12)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors import safe_open
from safetensors.torch import load_file

import ckptavg
from ckptavg import Ema, PlanError, Swa
from ckptavg.api import RowEvaluation, average
from ckptavg.methods.windows import Windows, sweep

RUNS = Path(__file__).resolve().parent.parent / "fixtures" / "runs"
SIGMAS = [0.05, 0.1, 0.2]


def _same_tensors(a: Path, b: Path) -> None:
    x, y = load_file(a), load_file(b)
    assert x.keys() == y.keys()
    for k in x:
        assert x[k].dtype == y[k].dtype and x[k].equal(y[k]), k


def test_a_sweep_writes_one_file_per_value_equal_to_single_runs(tmp_path: Path) -> None:
    plan = sweep(Ema(sigma_rel=SIGMAS[0]), "sigma_rel", SIGMAS)
    result = average(RUNS / "hf", tmp_path / "ema-{sigma_rel}.safetensors", plan)
    assert [p.name for p in result.outputs] == [f"ema-{s}.safetensors" for s in SIGMAS]
    for s, path in zip(SIGMAS, result.outputs, strict=True):
        single = tmp_path / f"single-{s}.safetensors"
        average(RUNS / "hf", single, Ema(sigma_rel=s))
        _same_tensors(path, single)
        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
        assert json.loads(meta["ckptavg_row"]) == {"name": f"sigma_rel={s}", "params": {"sigma_rel": s}}
        assert json.loads(meta["ckptavg_inputs"])[0]["weight"] == ckptavg.plan_checkpoints(
            RUNS / "hf", Ema(sigma_rel=s)).weights.values[0]


def test_windows_go_to_a_folder_one_file_per_window(tmp_path: Path) -> None:
    out = tmp_path / "lawa"
    result = average(RUNS / "plain", str(out) + "/", Windows(Swa(), window=3, stride=2))
    assert len(result.outputs) == 2  # (6 - 3) // 2 + 1
    for o, path in enumerate(result.outputs):
        single = tmp_path / f"w{o}.safetensors"
        average([RUNS / "plain" / f"epoch={e}.pt" for e in range(2 * o, 2 * o + 3)], single, Swa())
        _same_tensors(path, single)


@pytest.mark.parametrize("template, message", [
    ("avg.safetensors", "gives 3 outputs"),
    ("avg-{decay}.safetensors", "no field {decay}"),
    ("avg-{name}-{index}-x.safetensors", None),
    ("{index}{index}.safetensors", None),
])
def test_templates_must_tell_the_rows_apart(tmp_path: Path, template: str, message: str | None) -> None:
    plan = sweep(Ema(sigma_rel=SIGMAS[0]), "sigma_rel", SIGMAS)
    if message is None:
        assert len(average(RUNS / "hf", tmp_path / template, plan).outputs) == 3
        return
    with pytest.raises(PlanError, match=message) as info:
        average(RUNS / "hf", tmp_path / template, plan)
    assert "output" in info.value.params
    assert list(tmp_path.iterdir()) == []


def test_same_path_for_two_rows_is_refused(tmp_path: Path) -> None:
    plan = Windows(sweep(Ema(sigma_rel=0.05), "sigma_rel", [0.05, 0.1]), window=5)  # 2 windows x 2 values
    with pytest.raises(PlanError, match="the same path"):
        average(RUNS / "hf", tmp_path / "x-{sigma_rel}.safetensors", plan)
    assert len(average(RUNS / "hf", tmp_path / "x-{sigma_rel}-{window}.safetensors", plan).outputs) == 4


def test_a_row_path_that_is_a_directory_is_refused_before_any_work(tmp_path: Path) -> None:
    plan = sweep(Ema(sigma_rel=SIGMAS[0]), "sigma_rel", SIGMAS[:2])
    (tmp_path / "ema-0.1.safetensors").mkdir()
    with pytest.raises(ckptavg.OutputError, match="is a directory"):
        average(RUNS / "hf", tmp_path / "ema-{sigma_rel}.safetensors", plan)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ema-0.1.safetensors"]


def test_a_failing_commit_leaves_no_output_at_all(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Outputs are committed together: when the second cannot be renamed into place, the first is removed."""
    from ckptavg.write.output import OpenOutput

    real, calls = OpenOutput.commit, []

    def second_fails(self: OpenOutput, lead: bool = True, force: bool = False) -> None:
        calls.append(self)
        if len(calls) == 2:
            raise ckptavg.OutputError("disk gone")
        real(self, lead, force)

    monkeypatch.setattr(OpenOutput, "commit", second_fails)
    with pytest.raises(ckptavg.OutputError, match="disk gone"):
        average(RUNS / "hf", tmp_path / "ema-{sigma_rel}.safetensors", sweep(Ema(sigma_rel=0.05), "sigma_rel", SIGMAS))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("mode", ["max", "min"])
def test_evaluation_keeps_the_best_row(tmp_path: Path, mode: str) -> None:
    from fixtures.model import accuracy  # type: ignore[import-not-found]

    plan = sweep(Ema(decay=0.5), "decay", [0.5, 0.9, 0.99])
    out = tmp_path / "best.safetensors"
    result = average(RUNS / "plain", out, plan, evaluation=RowEvaluation(accuracy, mode=mode))
    values = [s["score"] for s in result.scores]
    best = values.index(max(values) if mode == "max" else min(values))
    assert [s["kept"] for s in result.scores] == [i == best for i in range(3)]
    single = tmp_path / "single.safetensors"
    average(RUNS / "plain", single, Ema(decay=[0.5, 0.9, 0.99][best]))
    _same_tensors(out, single)
    assert accuracy(load_file(out)) == values[best]
