"""The commands of issue 19 on the fixtures: `wsm`, `linear --weights lr`, `phema` (against ema-pytorch's own
synthesis), and `plan` for several outputs (the matrix, `--json` outputs, `--plot`)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner, Result

import ckptavg
from ckptavg.cli.app import app
from ckptavg.methods.lr import LrWeighted
from ckptavg.methods.phema import Phema
from ckptavg.methods.wsm import Wsm

REPO = Path(__file__).resolve().parent.parent
HF = str(REPO / "fixtures" / "runs" / "hf")
BERT = sorted((REPO / "fixtures" / "real" / "transformers" / "bert-cls").glob("checkpoint-*"))
POSTHOC = REPO / "fixtures" / "real" / "ema_pytorch" / "post_hoc"
EXPECTED = REPO / "fixtures" / "real" / "ema_pytorch" / "expected" / "post_hoc"
MANIFEST = json.loads((REPO / "fixtures" / "real" / "MANIFEST.json").read_text())
TODAY = {"method", "params", "order", "checkpoints", "residual", "tensors", "bytes"}  # plan --json before issue 19


def ok(*args: object) -> Result:
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


def plan_json(*args: object) -> dict[str, object]:
    return json.loads(ok("plan", *args, "--json").stdout)  # type: ignore[no-any-return]


def megatron_minus_sqrt(n: int) -> list[float]:
    """Megatron-LM's schedule_to_merge_coefficients for 1 - sqrt(x) at x = i / n, written out again."""
    d = [1.0 - math.sqrt(i / n) for i in range(n)]
    c = [0.0] * n
    c[-1] = d[-1]
    for i in range(1, n - 1):
        c[i] = d[i] - d[i + 1]
    c[0] = 1.0 - sum(c)
    return c


# ---------------------------------------------------------------- wsm


def test_wsm_minus_sqrt_is_megatrons_and_equals_the_library_run(tmp_path: Path) -> None:
    out, ref = tmp_path / "wsm.safetensors", tmp_path / "ref.safetensors"
    ok("wsm", HF, "--last", "8", "--schedule", "minus-sqrt", "-o", out)
    ckptavg.api.average(HF, ref, Wsm())
    assert load_file(out).keys() == load_file(ref).keys()
    assert all(load_file(out)[k].equal(v) for k, v in load_file(ref).items())
    with safe_open(str(out), "pt") as f:
        weights = [i["weight"] for i in json.loads(f.metadata()["ckptavg_inputs"])]
    assert weights == pytest.approx(megatron_minus_sqrt(6), abs=1e-12)


def test_wsm_cosine_final_and_the_plan_says_the_spacing(tmp_path: Path) -> None:
    ok("wsm", HF, "--schedule", "cosine", "--final", "0.1", "-o", tmp_path / "wsm.safetensors")
    text = ok("plan", "wsm", HF, "--schedule", "cosine", "--final", "0.1").stdout
    assert "positions: even: x_i = i / n" in text and "x" in text.splitlines()[3].split()
    by_step = ok("plan", "wsm", HF, "--by-step").stdout
    assert "positions: by step" in by_step


def test_plan_wsm_sweep_json_keeps_todays_keys_and_adds_outputs() -> None:
    data = plan_json("wsm", HF, "--schedule", "linear,minus-sqrt,cosine")
    assert set(data) >= TODAY
    outputs = data["outputs"]
    assert [o["name"] for o in outputs] == ["schedule=linear", "schedule=minus-sqrt", "schedule=cosine"]  # type: ignore[index]
    assert [o["params"] for o in outputs] == [{"schedule": s} for s in ("linear", "minus-sqrt", "cosine")]  # type: ignore[index]
    assert [c["weight"] for c in data["checkpoints"]] == outputs[0]["weights"]  # type: ignore[index, attr-defined]
    assert outputs[1]["weights"] == pytest.approx(megatron_minus_sqrt(6), abs=1e-12)  # type: ignore[index]
    for o, shape in zip(outputs, ("linear", "minus-sqrt", "cosine"), strict=True):  # type: ignore[call-overload]
        assert o["weights"] == list(Wsm(schedule=shape).coefficients(shape, [i / 6 for i in range(6)]))


def test_plan_json_of_one_row_lists_it_too() -> None:
    data = plan_json("swa", HF)
    assert data["outputs"] == [{"name": "", "params": {}, "weights": [c["weight"] for c in data["checkpoints"]],  # type: ignore[attr-defined]
                                "residual": 0.0}]


def test_plan_shows_the_matrix_with_one_bar_column_per_output() -> None:
    text = ok("plan", "ema", HF, "--sigma-rel", "0.05,0.1").stdout
    assert "sweep over sigma_rel: 0.05, 0.1" in text
    assert "[1] sigma_rel=0.05" in text and "[2] sigma_rel=0.1" in text
    rows = [line for line in text.splitlines() if line.split()[:1] and line.split()[0].isdigit()]
    assert len(rows) == 6 and all(len(line) <= 80 for line in text.splitlines() if "█" in line or "▁" in line)
    assert "█" in rows[-1]  # the largest weight has the full bar
    many = ok("plan", "swa", HF, "--window", "1").stdout  # 6 outputs: still fits 80 columns
    assert all(len(line) <= 80 for line in many.splitlines() if "[" in line)


# ---------------------------------------------------------------- linear --weights lr


def test_linear_weights_lr_equals_linear_with_those_weights(tmp_path: Path) -> None:
    data = plan_json("linear", *BERT, "--weights", "lr")
    weights = [c["weight"] for c in data["checkpoints"]]  # type: ignore[attr-defined]
    assert data["method"] == "lr" and weights == list(ckptavg.plan_checkpoints(BERT, LrWeighted()).weights.values)
    assert all("log_history" in s for s in data["lr_source"])  # type: ignore[attr-defined]
    out, ref = tmp_path / "lrw.safetensors", tmp_path / "ref.safetensors"
    ok("linear", *BERT, "--weights", "lr", "-o", out)
    ok("linear", *BERT, "--weights", ",".join(repr(w) for w in weights), "-o", ref)
    assert all(load_file(out)[k].equal(v) for k, v in load_file(ref).items())
    squared = plan_json("linear", *BERT, "--weights", "lr", "--lr-power", "2")
    assert [c["weight"] for c in squared["checkpoints"]] == list(  # type: ignore[attr-defined]
        ckptavg.plan_checkpoints(BERT, LrWeighted(lr_power=2)).weights.values)
    ok("linear", *BERT, "--weights", "lr", "--lr-power", "2", "-o", tmp_path / "lr2.safetensors")


def test_plan_shows_each_learning_rate_and_its_source() -> None:
    text = ok("plan", "linear", HF, "--weights", "lr").stdout
    assert "lr (source)" in text and "learning rate:" in text


def test_a_checkpoint_without_a_learning_rate_names_where_ckptavg_looked(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["linear", str(REPO / "fixtures/runs/ddp"), "--weights", "lr",
                                      "-o", str(tmp_path / "x.safetensors")])
    assert result.exit_code == 1
    (line,) = result.stderr.splitlines()
    assert line.startswith("Error: ") and "ckptavg looked in: trainer_state.json" in line


# ---------------------------------------------------------------- phema


def _reference(sigma_rel: str) -> dict[str, torch.Tensor]:
    return load_file(EXPECTED / f"synth_sigma_rel{sigma_rel}_step12.safetensors")


@pytest.mark.parametrize("sigma_rel", ["0.15", "0.10"])
def test_phema_raw_equals_ema_pytorch_synthesize_ema_model(tmp_path: Path, sigma_rel: str) -> None:
    """ema-pytorch's own synthesis (its unnormalised solution) to float32 rounding; the counters are the newest
    snapshot's, never combined (ema-pytorch's synthesis takes num_batches_tracked from the online model)."""
    out = tmp_path / "ema.safetensors"
    ok("phema", POSTHOC, "--snapshot-sigma-rel", "0.05,0.28", "--sigma-rel", sigma_rel, "--raw", "--dtype", "float32",
       "-o", out)
    got, ref = load_file(out), _reference(sigma_rel)
    for key, expected in ref.items():
        if key.endswith("num_batches_tracked"):
            continue
        torch.testing.assert_close(got[f"ema_model.{key}"], expected, rtol=0, atol=1e-6)
    assert (got["step"].item(), got["initted"].item(), got["ema_model.1.num_batches_tracked"].item()) == (12, 1, 0)
    solved = next(s for s in MANIFEST["sections"]["ema_pytorch"] if s["id"] == "ema_pytorch/post_hoc")["synthesized"]
    weights = next(s["weights"] for s in solved if s["sigma_rel"] == float(sigma_rel))
    data = plan_json("phema", POSTHOC, "--snapshot-sigma-rel", "0.05,0.28", "--sigma-rel", sigma_rel, "--raw")
    assert {Path(c["path"]).stem: c["weight"] for c in data["checkpoints"]} == pytest.approx(weights, abs=1e-8)  # type: ignore[attr-defined]


def test_phema_default_is_edm2_normalised_and_stores_float16_like_its_inputs(tmp_path: Path) -> None:
    out = tmp_path / "ema15.safetensors"
    ok("phema", POSTHOC, "--snapshot-sigma-rel", "0.05,0.28", "--sigma-rel", "0.15", "-o", out)
    got = load_file(out)
    assert got["ema_model.0.weight"].dtype == torch.float16
    assert (got["step"].item(), got["initted"].item()) == (12.0, 1.0)  # copied, not 16.0 and 1.003 as combined
    data = plan_json("phema", POSTHOC, "--snapshot-sigma-rel", "0.05,0.28", "--sigma-rel", "0.15")
    weights = [c["weight"] for c in data["checkpoints"]]  # type: ignore[attr-defined]
    assert math.fsum(weights) == pytest.approx(1.0, abs=1e-12)
    assert data["copied"]["entries"] == ["initted", "step", "ema_model.1.num_batches_tracked"]  # type: ignore[index]
    raw = ckptavg.plan_checkpoints(POSTHOC, Phema(0.15, (0.05, 0.28), normalize=False)).weights.values
    assert weights == pytest.approx([w / math.fsum(raw) for w in raw], abs=1e-12)
    ref = _reference("0.15")
    scale = math.fsum(raw)  # the raw solution is the normalised one times its sum
    for key, expected in ref.items():
        if not key.endswith("num_batches_tracked"):
            torch.testing.assert_close(got[f"ema_model.{key}"].float() * scale, expected, rtol=2e-3, atol=2e-3)


def test_phema_sweep_over_snapshots_with_profiles_in_their_metadata(tmp_path: Path) -> None:
    """EDM2-style snapshots that carry step and sigma_rel: one output per target width, each its single run."""
    snaps = tmp_path / "snapshots"
    snaps.mkdir()
    g = torch.Generator().manual_seed(0)
    for step in (1000, 2000, 3000, 4000):
        for sr in (0.05, 0.10):
            save_file({"w": torch.randn(50, generator=g)}, snaps / f"snap-{step}-{sr:.2f}.safetensors",
                      metadata={"step": str(step), "sigma_rel": str(sr)})
    result = ok("phema", snaps, "--sigma-rel", "0.05,0.10,0.15", "-o", tmp_path / "phema-{sigma_rel}.safetensors")
    assert "wrote 3 outputs" in result.stdout
    for sr in ("0.05", "0.1", "0.15"):
        single = tmp_path / f"single-{sr}.safetensors"
        ok("phema", snaps, "--sigma-rel", sr, "-o", single)
        assert load_file(tmp_path / f"phema-{sr}.safetensors")["w"].equal(load_file(single)["w"])


def test_phema_without_profiles_says_what_to_give(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["phema", str(POSTHOC), "--sigma-rel", "0.1", "-o", str(tmp_path / "x.safetensors")])
    assert result.exit_code == 1 and "--snapshot-sigma-rel" in result.stderr


# ---------------------------------------------------------------- plan --plot


@pytest.mark.parametrize("suffix", [".png", ".svg"])
def test_plot_draws_every_output(tmp_path: Path, suffix: str) -> None:
    pytest.importorskip("matplotlib")
    target = tmp_path / f"weights{suffix}"
    ok("plan", "ema", HF, "--sigma-rel", "0.05,0.1", "--plot", target)
    head = target.read_bytes()[:200]
    assert head.startswith(b"\x89PNG") if suffix == ".png" else b"<svg" in target.read_bytes()


@pytest.mark.parametrize(("plot", "message"), [("w.png", "--plot needs matplotlib"), ("w.pdf", ".png or .svg")])
def test_plot_errors_are_one_line_before_any_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, plot: str,
                                                  message: str) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    result = CliRunner().invoke(app, ["plan", "ema", HF, "--sigma-rel", "0.05", "--plot", str(tmp_path / plot)])
    assert result.exit_code == 1
    (line,) = result.stderr.splitlines()
    assert line.startswith("Error: --plot") and message in line
    assert list(tmp_path.iterdir()) == []
