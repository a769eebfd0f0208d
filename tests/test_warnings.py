"""Surprising answers are said out loud: one Warning line each on stderr, the same texts in --json, never -0."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import ckptavg
from ckptavg import CkptavgWarning, Ema, Selection, SelectionError
from ckptavg.cli.app import app

RUNS = Path(__file__).resolve().parent.parent / "fixtures" / "runs"


def _run(*args: object) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def _warnings(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("Warning: ")]


def test_an_old_checkpoint_outweighing_the_newest_is_said_with_the_fix() -> None:
    code, out, err = _run("plan", "ema", RUNS / "plain", "--decay", "0.9")
    assert code == 0
    [line] = [w for w in _warnings(err) if "more than the newest" in w]
    assert "epoch=0.pt" in line and "epoch=5.pt" in line and "--init bias-correct" in line and "--decay" in line
    code, out, err = _run("plan", "ema", RUNS / "plain", "--decay", "0.9", "--init", "bias-correct")
    assert not [w for w in _warnings(err) if "more than the newest" in w]  # the fix it names does fix it


def test_the_same_warnings_come_in_plan_json() -> None:
    code, out, err = _run("plan", "ema", RUNS / "plain", "--decay", "0.9", "--json")
    data = json.loads(out)
    assert data["warnings"] and all(f"Warning: {w}" in err for w in data["warnings"])
    assert any("--init bias-correct" in w for w in data["warnings"])


def test_a_scaled_output_is_said() -> None:
    with pytest.warns(CkptavgWarning, match=r"scaled by 0\.4\d*, running statistics included; use init first") as got:
        report = ckptavg.plan_checkpoints(RUNS / "plain", Ema(decay=0.9, init="zero"))
    assert report.weights.residual == pytest.approx(0.9**6)
    assert any("init" in w.message.params for w in got)  # type: ignore[union-attr]


def test_one_checkpoint_and_a_short_selection_are_said(tmp_path: Path) -> None:
    code, out, err = _run("plan", "swa", RUNS / "plain", "--last", "10")
    assert any("--last 10 asked for, but only 6 checkpoints" in w for w in _warnings(err))
    code, out, err = _run("plan", "swa", RUNS / "plain" / "epoch=3.pt")
    assert any("swa of one checkpoint (epoch=3.pt)" in w for w in _warnings(err))


def test_checkpoints_that_look_like_two_runs_are_said(tmp_path: Path) -> None:
    """A copy of a checkpoint in the folder counts once; a different checkpoint at the same step is an error;
    a checkpoint without a step beside stepped ones orders by name, with a warning."""
    for src in (RUNS / "ddp").iterdir():  # step=N-val_loss=... names
        shutil.copy(src, tmp_path / src.name)
    shutil.copy(RUNS / "ddp" / "step=48-val_loss=0.2070.pt", tmp_path / "other-step=48.pt")
    with pytest.warns(CkptavgWarning, match="left out 1 .*the same bytes as"):
        report = ckptavg.plan_checkpoints(tmp_path)
    assert len(report.checkpoints) == 6 and len(report.skipped) == 1
    state = torch.load(RUNS / "ddp" / "step=24-val_loss=0.9780.pt", weights_only=True)
    torch.save(state, tmp_path / "other-step=48.pt")  # distinct bytes, the step of the name
    with pytest.raises(SelectionError, match="two different checkpoints at step 48: two runs mixed"):
        ckptavg.plan_checkpoints(tmp_path)
    (tmp_path / "other-step=48.pt").rename(tmp_path / "final.pt")
    with pytest.warns(CkptavgWarning, match=r"ordered by file name, because the step of final\.pt is unknown"):
        ckptavg.plan_checkpoints(tmp_path)


def test_no_negative_zero_in_the_plan_table() -> None:
    code, out, err = _run("plan", "ema", RUNS / "plain", "--decay", "1.0")
    assert code == 0 and "-0.0" not in out
    report = ckptavg.plan_checkpoints(RUNS / "plain", Ema(decay=1.0))
    assert all(str(w) != "-0.0" for w in report.weights.values)


def test_the_run_json_has_inputs_weights_and_warnings(tmp_path: Path) -> None:
    code, out, err = _run("ema", RUNS / "plain", "--decay", "0.9", "-o", tmp_path / "o.safetensors", "--json")
    data = json.loads(out)
    weights = ckptavg.plan_checkpoints(RUNS / "plain", Ema(decay=0.9)).weights.values
    assert [i["weight"] for i in data["inputs"]] == list(weights)
    assert [Path(i["path"]).name for i in data["inputs"]][0] == "epoch=0.pt"
    assert any("--init bias-correct" in w for w in data["warnings"])


def test_quiet_results_carry_the_warnings_for_the_library() -> None:
    with pytest.warns(CkptavgWarning):
        report = ckptavg.plan_checkpoints(RUNS / "plain", Ema(decay=0.9), select=Selection(last=3))
    assert report.warnings and "init" in report.warnings[0].params


def test_a_metric_name_that_matches_two_values_is_an_error_listing_them() -> None:
    code, out, err = _run("plan", "swa", RUNS / "hf", "--best", "2", "--metric", "loss", "--metric-mode", "min")
    assert code == 1 and "matches loss (trainer_state.json log_history 'loss'), eval_loss" in err
    assert "--metric eval_loss" in err and "--metric =loss" in err
    for name, source in (("eval_loss", "eval_loss: trainer_state.json"), ("=loss", "loss: trainer_state.json")):
        code, out, err = _run("plan", "swa", RUNS / "hf", "--best", "2", "--metric", name, "--metric-mode", "min",
                              "--json")
        assert code == 0, err
        assert all(c["metric_source"].startswith(source) for c in json.loads(out)["checkpoints"])


def test_inspect_lists_every_metric_with_its_source() -> None:
    code, out, err = _run("inspect", RUNS / "timm" / "checkpoint-3.pth.tar", "--json")
    metrics = {m["name"]: m for m in json.loads(out)["metrics"]}
    assert metrics["metric"]["source"] == "checkpoint 'metric'" and 0 < metrics["metric"]["value"] < 1
    code, out, err = _run("inspect", RUNS / "hf" / "checkpoint-96")
    assert "eval_loss=0.197131 (trainer_state.json log_history 'eval_loss')" in out


def test_inspect_on_a_folder_points_to_plan_or_to_the_runs_inside() -> None:
    code, out, err = _run("inspect", RUNS / "plain")
    assert code == 1 and "a folder of 6 checkpoints" in err and f"ckptavg plan swa {RUNS / 'plain'}" in err
    code, out, err = _run("inspect", RUNS)
    assert code == 1 and "its subfolders hold checkpoints: ddp/ (6), hf/ (6)" in err


def test_summaries_say_what_happened(tmp_path: Path) -> None:
    model = Path(__file__).resolve().parent.parent / "fixtures" / "model.py"
    code, out, err = _run("soup", RUNS / "plain", "--eval", f"{model}:accuracy", "-o", tmp_path / "s.safetensors")
    assert code == 0 and "soup of 6 checkpoints: kept 1 (epoch=5.pt, score 0.9" in out, out
    code, out, err = _run("bn", tmp_path / "s.safetensors", "-o", tmp_path / "b.safetensors", "--bn-model",
                          f"{model}:build", "--bn-data", f"{model}:bn_loader")
    assert code == 0 and "recomputed BatchNorm statistics of s.safetensors over 8 batches" in out, out
    assert "Warning" not in err  # one input is the point of `ckptavg bn`, not a surprise


class _Recorder:
    """A progress callback that also takes the passes that are not reading (`step`)."""

    def __init__(self) -> None:
        self.reads: list[tuple[int, int]] = []
        self.steps: list[tuple[str, int, int]] = []

    def __call__(self, done: int, total: int) -> None:
        self.reads.append((done, total))

    def step(self, phase: str, done: int, total: int) -> None:
        self.steps.append((phase, done, total))


def test_long_passes_report_progress(tmp_path: Path) -> None:
    """Graft's entropy pass, soup's evaluations and the BatchNorm batches are reported, each up to its total."""
    from ckptavg import BatchNormOptions, Graft, Soup, average

    model = Path(__file__).resolve().parent.parent / "fixtures" / "model.py"
    graft = _Recorder()
    average(RUNS / "plain", tmp_path / "g.safetensors", Graft(), progress=graft)
    phases = [s for s in graft.steps if s[0] == "entropies"]
    assert phases and phases[-1][1] == phases[-1][2] == 3  # conv1, conv2, fc lead a group each
    assert graft.reads and graft.reads[-1][0] == graft.reads[-1][1]
    from fixtures.model import accuracy  # type: ignore[import-not-found]

    soup = _Recorder()
    average(RUNS / "plain", tmp_path / "s.safetensors", Soup(evaluate=accuracy), progress=soup)
    assert [s[1] for s in soup.steps] == list(range(1, 12)) and {s[2] for s in soup.steps} == {11}
    bn = _Recorder()
    average(RUNS / "plain", tmp_path / "b.safetensors", progress=bn,
            bn=BatchNormOptions(f"{model}:build", f"{model}:bn_loader", batches=5))
    assert [s[1:] for s in bn.steps if s[0] == "BatchNorm batches"] == [(i, 5) for i in range(1, 6)]


def test_the_bar_draws_each_pass_in_turn() -> None:
    import io

    from ckptavg.cli.progress import ProgressBar

    out = io.StringIO()
    bar = ProgressBar(out)
    bar.step("entropies", 1, 3)
    bar.step("entropies", 3, 3)
    bar(1024, 4096)
    bar(4096, 4096)
    bar.close()
    text = out.getvalue()
    assert "entropies" in text and "3/3" in text and "averaging" in text and "4.0 KiB of 4.0 KiB" in text
