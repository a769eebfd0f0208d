"""The averaging methods end to end: real files in, compared with references and docs/ALGORITHMS.md examples."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from refs import RUNS, fixture_paths, load_model_module, reference_state_dict
from safetensors.torch import load_file, save_file
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from typer.testing import CliRunner

import ckptavg
from ckptavg import Ema, Graft, Linear, PlanError, Selection, SelectionError, Soup
from ckptavg.cli.app import app
from ckptavg.methods.entropy import graft_entropy


def test_ema_per_checkpoint_matches_averaged_model(tmp_path: Path) -> None:
    paths = fixture_paths("lightning")
    refs = [reference_state_dict("lightning", p) for p in paths]
    model = load_model_module().build()
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
    for sd in refs:
        model.load_state_dict(sd)
        ema.update_parameters(model)
    out = tmp_path / "ema.safetensors"
    ckptavg.average_checkpoints(str(RUNS / "lightning"), out, Ema(decay=0.9))
    got = load_file(out)
    for key, ref in ema.module.state_dict().items():
        if ref.is_floating_point():
            torch.testing.assert_close(got["model." + key], ref, rtol=1e-5, atol=1e-6)


def test_ema_step_decay_on_fixture_steps(tmp_path: Path) -> None:
    """Closed-form step EMA equals the dense recursion over the held (piecewise constant) trajectory."""
    paths = fixture_paths("safetensors")
    refs = [load_file(p) for p in paths]
    steps = [int(s) for s in (open_meta(p)["step"] for p in paths)]
    beta = 0.97
    out = tmp_path / "ema.safetensors"
    report = ckptavg.average_checkpoints(str(RUNS / "safetensors"), out, Ema(step_decay=beta)).report
    assert [c.meta.step for c in report.checkpoints] == steps
    # dense EMA: starts as a copy of the first checkpoint, then one update per optimizer step,
    # where step t sees the checkpoint whose block (s_{k-1}, s_k] contains t (backward hold)
    key = "fc.weight"
    v = refs[0][key].double().clone()
    for t in range(1, steps[-1] + 1):
        k = next(i for i, s in enumerate(steps) if t <= s)
        v = beta * v + (1 - beta) * refs[k][key].double()
    torch.testing.assert_close(load_file(out)[key].double(), v, rtol=1e-6, atol=1e-7)


def open_meta(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return f.metadata()


def test_graft_two_checkpoints_reproduces_the_paper_coefficient(tmp_path: Path) -> None:
    a_path, b_path = fixture_paths("plain")[-2:]
    a, b = torch.load(a_path, weights_only=True), torch.load(b_path, weights_only=True)
    out = tmp_path / "g.safetensors"
    report = ckptavg.average_checkpoints([str(a_path), str(b_path)], out, Graft()).report
    got = load_file(out)
    leader = None
    for key, ta in a.items():  # state-dict order: 2+-D tensors lead, 0-/1-D ones follow
        if not ta.is_floating_point():
            assert torch.equal(got[key], b[key])
            continue
        if ta.ndim >= 2:
            h_a, h_b = graft_entropy(ta), graft_entropy(b[key])
            alpha = round((0.4 / math.pi) * math.atan(500 * (h_a - h_b)) + 0.5, 2)
            leader = key
        assert leader is not None
        expected = (alpha * ta.double() + (1 - alpha) * b[key].double()).float()
        torch.testing.assert_close(got[key], expected, rtol=0, atol=1e-7)
    groups = {g["tensor"]: g for g in report.matrix.details["groups"]}
    assert set(groups) == {"conv1.weight", "conv2.weight", "fc.weight"}
    assert groups["conv1.weight"]["members"][:2] == ["conv1.weight", "conv1.bias"]
    assert "bn1.running_var" in groups["conv1.weight"]["members"]
    assert sum(report.weights.values) == pytest.approx(1.0)


def test_graft_conv_groups_follow_the_reference_rule() -> None:
    report = ckptavg.plan_checkpoints(str(RUNS / "plain"), Graft(groups="conv"), select=Selection(last=3))
    groups = report.matrix.details["groups"]
    leaders = [g["tensor"] for g in groups]
    assert leaders == ["conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias"]
    last = groups[-1]
    assert "fc.weight" in last["members"] and "bn2.weight" in last["members"]
    for g in groups:
        assert sum(g["weights"]) == pytest.approx(1.0) and len(g["entropies"]) == 3


def _onehot_checkpoints(tmp_path: Path, n: int) -> list[str]:
    paths = []
    for i in range(n):
        x = torch.zeros(n)
        x[i] = 1.0
        path = tmp_path / f"step={i + 1}.safetensors"
        save_file({"x": x, "n": torch.tensor(i)}, path)
        paths.append(str(path))
    return paths


MOCK_SCORES = {"A": 0.80, "B": 0.78, "C": 0.79, "D": 0.70, "AC": 0.81, "ABC": 0.81, "ACD": 0.79, "ABCD": 0.79}


def _mock_eval(state: dict[str, torch.Tensor]) -> float:
    members = "".join("ABCD"[i] for i in range(4) if state["x"][i] > 0)
    return MOCK_SCORES[members]


@pytest.mark.parametrize("strict, members", [(False, "ABC"), (True, "AC")])
def test_greedy_soup_worked_example(strict: bool, members: str, tmp_path: Path) -> None:
    """docs/ALGORITHMS.md §5: order A, C, B, D; the paper's >= keeps {A, C, B}, the official > keeps {A, C}."""
    paths = _onehot_checkpoints(tmp_path, 4)
    report = ckptavg.plan_checkpoints(paths, Soup(evaluate=_mock_eval, strict=strict))
    expected = [1 / len(members) if "ABCD"[i] in members else 0.0 for i in range(4)]
    assert list(report.weights.values) == pytest.approx(expected)
    candidates = [s for s in report.matrix.details["scores"] if s["kind"] == "candidate"]
    assert [s["score"] for s in candidates] == [0.81, 0.81, 0.79]  # AC, then ABC, then A C (B) D


def test_soup_cli_with_eval_file(tmp_path: Path) -> None:
    paths = _onehot_checkpoints(tmp_path, 4)
    evals = tmp_path / "evals.py"
    evals.write_text(
        "SCORES = " + repr(MOCK_SCORES) + "\n"
        "def score(sd):\n    return SCORES[''.join('ABCD'[i] for i in range(4) if sd['x'][i] > 0)]\n"
    )
    out = tmp_path / "soup.safetensors"
    result = CliRunner().invoke(app, ["soup", *paths, "--eval", f"{evals}:score", "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output
    assert torch.allclose(load_file(out)["x"], torch.tensor([1 / 3, 1 / 3, 1 / 3, 0.0]))
    assert load_file(out)["n"].item() == 2  # integer tensor from the newest member (C), not from D


def test_soup_on_fixtures_is_no_worse_than_the_best_single() -> None:
    mod = load_model_module()
    report = ckptavg.plan_checkpoints(str(RUNS / "plain"), Soup(evaluate=mod.accuracy))
    singles = [s["score"] for s in report.matrix.details["scores"] if s["kind"] == "single"]
    accepted = [s["score"] for s in report.matrix.details["scores"] if s["accepted"]]
    assert accepted[-1] >= max(singles)


def test_linear_weights_and_normalize(tmp_path: Path) -> None:
    paths = _onehot_checkpoints(tmp_path, 3)
    out = tmp_path / "o" / "lin.safetensors"
    out.parent.mkdir()
    ckptavg.average_checkpoints(paths, out, Linear((1.0, 2.0, 1.0), normalize=True))
    assert torch.allclose(load_file(out)["x"], torch.tensor([0.25, 0.5, 0.25]))
    with pytest.warns(ckptavg.CkptavgWarning, match="sum to 4"):
        ckptavg.plan_checkpoints(paths, Linear((1.0, 2.0, 1.0)))
    with pytest.warns(ckptavg.CkptavgWarning, match="negative"):
        ckptavg.plan_checkpoints(paths, Linear((-0.5, 0.5, 1.0)))


def test_best_by_metric_from_each_source() -> None:
    from refs import MANIFEST

    by_loss = sorted(MANIFEST, key=lambda e: e["val_loss"])[:2]
    expected = sorted(e["global_step"] for e in by_loss)
    for fmt, metric in (("lightning", "val_loss"), ("hf", "eval_loss"), ("hf", "loss"), ("ddp", "val_loss")):
        if fmt == "hf" and metric == "loss":
            continue  # "loss" is the training loss in HF logs; eval_loss is the validation one
        report = ckptavg.plan_checkpoints(str(RUNS / fmt), select=Selection(best=2, metric=metric, mode="min"))
        assert [c.meta.step for c in report.checkpoints] == expected, fmt
    timm = ckptavg.plan_checkpoints(str(RUNS / "timm"), select=Selection(best=1, metric="metric", mode="max"))
    assert timm.checkpoints[0].meta.epoch == max(MANIFEST, key=lambda e: e["val_acc"])["epoch"]


def test_missing_metric_names_the_checkpoints() -> None:
    with pytest.raises(SelectionError, match="metric 'val_loss' is missing for epoch=0.pt"):
        ckptavg.plan_checkpoints(str(RUNS / "plain"), select=Selection(best=2, metric="val_loss", mode="min"))


@pytest.mark.parametrize(
    "build, message, param",
    [
        (lambda: Ema(decay=1.5), "decay must be between 0 and 1", "decay"),
        (lambda: Ema(decay=0.9, step_decay=0.9), "exactly one", "step_decay"),
        (lambda: Ema(), "exactly one", "sigma_rel"),
        (lambda: Ema(sigma_rel=0.3), "sigma", None),
        (lambda: Ema(decay=0.9, warmup=True), "apply to per-step EMA only", "warmup"),
        (lambda: Ema(decay=0.9, hold="sideways"), "hold must be one of", "hold"),
        (lambda: Graft(a=1.5), "a must be between", "a"),
        (lambda: Graft(c=-1), "c must be", "c"),
        (lambda: Graft(mode="ring"), "mode must be one of", "mode"),
        (lambda: Linear(()), "linear needs values", "values"),
        (lambda: Soup(), "needs evaluate", "evaluate"),
    ],
)
def test_bad_parameters_fail_before_reading(build, message: str, param: str | None) -> None:  # type: ignore[no-untyped-def]
    """Plans check their parameters when built, and name them as parameters (the CLI maps them to flags)."""
    with pytest.raises(PlanError, match=message) as info:
        build()
    assert "--" not in str(info.value)
    if param is not None:
        assert param in info.value.params


@pytest.mark.parametrize(
    "args, message",
    [
        (["linear", str(RUNS / "plain"), "--weights", "0.5,0.5"], "--weights holds 2 weights but 6 checkpoints"),
        (["ema", str(RUNS / "plain"), "--step-decay", "0.9"], "needs the optimizer step of every checkpoint"),
        (["ema", str(RUNS / "plain"), "--sigma-rel", "0.1"], "needs the optimizer step"),
        (["ema", str(RUNS / "plain"), "--sigma-rel", "0.5"], "sigma"),
        (["ema", str(RUNS / "plain")], "exactly one"),
        (["graft", str(RUNS / "plain"), "--round-digits", "two"], "--round-digits"),
        (["soup", str(RUNS / "plain"), "--eval", "nosuchmodule_xyz:f"], "cannot import"),
        (["swa", str(RUNS / "plain"), "--best", "2", "--metric", "val_loss"], "needs a direction"),
        (["swa", str(RUNS / "plain"), "--best", "2"], "--best needs --metric"),
    ],
)
def test_method_errors_through_the_cli(args: list[str], message: str, tmp_path: Path) -> None:
    out = tmp_path / "out.safetensors"
    result = CliRunner().invoke(app, [args[0], *args[1:], "-o", str(out)])
    assert result.exit_code == 1, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and message in errors[0], result.output
    assert "Traceback" not in result.output and not out.exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--step-decay", "0.9", "--per", "checkpoint"], "--per checkpoint goes with --decay; --step-decay"),
        (["--sigma-rel", "0.1", "--per", "checkpoint"], "--per checkpoint goes with --decay; --sigma-rel"),
        (["--decay", "0.9", "--step-decay", "0.9", "--per", "step"], "exactly one"),
        (["--decay", "0.9", "--warmup"], "apply to per-step EMA only (--step-decay B)"),
    ],
)
def test_per_errors_through_the_cli(args: list[str], message: str, tmp_path: Path) -> None:
    out = tmp_path / "out.safetensors"
    result = CliRunner().invoke(app, ["ema", str(RUNS / "lightning"), *args, "-o", str(out)])
    assert result.exit_code == 1, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and message in errors[0], result.output
    assert not out.exists()


def _plan_json(*args: str) -> dict[str, object]:
    import json

    result = CliRunner().invoke(app, ["plan", "ema", str(RUNS / "lightning"), *args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def test_per_step_is_step_decay_and_per_checkpoint_is_the_default() -> None:
    """The brief's spelling `--decay B --per step|checkpoint` gives exactly the plans of `--step-decay B`
    and `--decay B`, and the two differ on these checkpoints (saved every few steps), so `--per` is not
    ignored."""
    per_step, per_ckpt = _plan_json("--decay", "0.99", "--per", "step"), _plan_json("--decay", "0.99", "--per", "checkpoint")
    assert per_step == _plan_json("--step-decay", "0.99")
    assert per_ckpt == _plan_json("--decay", "0.99")
    assert per_step["params"]["per"] == "step" and per_ckpt["params"]["per"] == "checkpoint"  # type: ignore[index]
    assert [c["weight"] for c in per_step["checkpoints"]] != [c["weight"] for c in per_ckpt["checkpoints"]]  # type: ignore[attr-defined]
    # timm's warmup options follow --per step as they follow --step-decay
    assert _plan_json("--decay", "0.99", "--per", "step", "--warmup") == _plan_json("--step-decay", "0.99", "--warmup")


def test_usage_error_for_decay_out_of_range(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["ema", str(RUNS / "plain"), "--decay", "1.5", "-o", str(tmp_path / "o")])
    assert result.exit_code == 2


@pytest.mark.parametrize(
    "plan",
    [Ema(decay=0.9), Ema(step_decay=0.99), Ema(sigma_rel=0.1), Graft(), Linear((1.0,)), ckptavg.Swa()],
)
def test_one_checkpoint_is_copied(plan: ckptavg.Plan, tmp_path: Path) -> None:
    path = fixture_paths("safetensors")[2]
    out = tmp_path / "one.safetensors"
    ckptavg.average_checkpoints(str(path), out, plan)
    got, ref = load_file(out), load_file(path)
    assert all(torch.equal(got[k], ref[k]) for k in ref)


@pytest.mark.parametrize("method", ["swa", "ema", "graft", "linear", "soup"])
def test_plan_json_for_every_method(method: str) -> None:
    import json

    extra = {"ema": ["--step-decay", "0.99"], "linear": ["--weights", "0.5,0.5"], "soup": ["--uniform"]}
    args = ["plan", method, str(RUNS / "hf"), "--last", "2", *extra.get(method, []), "--json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["method"] == method and len(data["checkpoints"]) == 2
    assert {"path", "step", "epoch", "metric", "weight"} <= set(data["checkpoints"][0])
    assert sum(c["weight"] for c in data["checkpoints"]) + data["residual"] == pytest.approx(1.0)
    assert ("groups" in data) == (method == "graft")
