"""Several outputs from the command line: comma lists (sweeps), --window, -o templates, --eval/--keep, and the
summary of several outputs (issue 19). Each output must equal the single-output run of its row bit for bit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors import safe_open
from safetensors.torch import load_file
from typer.testing import CliRunner, Result

from ckptavg.cli.app import app

REPO = Path(__file__).resolve().parent.parent
RUNS = REPO / "fixtures" / "runs"
HF, PLAIN = str(RUNS / "hf"), str(RUNS / "plain")
SCORE = f"{REPO}/fixtures/model.py:accuracy"


def run(*args: object) -> Result:
    return CliRunner().invoke(app, [str(a) for a in args])


def ok(*args: object) -> Result:
    result = run(*args)
    assert result.exit_code == 0, result.output
    return result


def error_line(result: Result, code: int = 1) -> str:
    assert result.exit_code == code, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    return lines[0]


def same(a: Path, b: Path) -> None:
    x, y = load_file(a), load_file(b)
    assert x.keys() == y.keys()
    for k in x:
        assert x[k].dtype == y[k].dtype and x[k].equal(y[k]), k


def metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as f:
        return dict(f.metadata())


@pytest.mark.parametrize(("method", "option", "values", "extra"), [
    ("ema", "--sigma-rel", ["0.05", "0.1", "0.15", "0.2"], []),
    ("ema", "--decay", ["0.9", "0.99", "0.999"], []),
    ("ema", "--step-decay", ["0.9", "0.99"], ["--warmup"]),
    ("ema", "--hold", ["backward", "midpoint", "forward"], ["--step-decay", "0.9"]),
    ("wsm", "--schedule", ["linear", "minus-sqrt", "cosine"], []),
    ("wsm", "--final", ["0.1", "0.5"], ["--schedule", "cosine"]),
    ("linear", "--lr-power", ["1", "2"], ["--weights", "lr"]),
    ("graft", "--a", ["0.2", "0.4"], ["--last", "2"]),
])
def test_a_comma_list_writes_one_output_per_value_equal_to_single_runs(
        tmp_path: Path, method: str, option: str, values: list[str], extra: list[str]) -> None:
    field = option.removeprefix("--").replace("-", "_")
    if method == "linear":
        field = "lr_power"
    template = tmp_path / "sweep" / f"out-{{{field}}}.safetensors"
    ok(method, HF, option, ",".join(values), *extra, "-o", template)
    written = sorted((tmp_path / "sweep").iterdir())
    assert len(written) == len(values)
    for value in values:
        single = tmp_path / f"single-{value}.safetensors"
        ok(method, HF, option, value, *extra, "-o", single)
        swept = next(p for p in written if str(json.loads(metadata(p)["ckptavg_row"])["params"][field]) in (
            value, repr(float(value)) if value[0].isdigit() else value))
        same(swept, single)
        assert json.loads(metadata(swept)["ckptavg_inputs"]) == json.loads(metadata(single)["ckptavg_inputs"])


def test_ema_sigma_rel_sweep_names_files_and_lists_them(tmp_path: Path) -> None:
    result = ok("ema", HF, "--sigma-rel", "0.05,0.1,0.15,0.2", "-o", tmp_path / "ema-{sigma_rel}.safetensors")
    names = [f"ema-{s}.safetensors" for s in ("0.05", "0.1", "0.15", "0.2")]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names)
    lines = result.stdout.splitlines()
    assert lines[0].startswith("wrote 4 outputs: ema of 6 checkpoints")
    for name, line in zip(names, lines[1:], strict=True):
        assert name in line and f"sigma_rel={name[4:-12]}" in line


def test_json_lists_outputs_with_their_rows(tmp_path: Path) -> None:
    result = ok("ema", HF, "--decay", "0.9,0.99", "-o", tmp_path / "e-{decay}.safetensors", "--json")
    data = json.loads(result.stdout)
    assert data["outputs"] == [{"path": str(tmp_path / f"e-{d}.safetensors"), "name": f"decay={d}",
                                "params": {"decay": float(d)}} for d in ("0.9", "0.99")]
    assert len(data["files"]) == 2 and "scores" not in data


def test_windows_name_files_by_step_and_equal_swa_of_each_window(tmp_path: Path) -> None:
    result = ok("swa", HF, "--window", "5", "-o", tmp_path / "lawa-{step}.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lawa-120.safetensors", "lawa-144.safetensors"]
    assert "window=0" in result.stdout and "window=1" in result.stdout
    ckpts = [f"{HF}/checkpoint-{s}" for s in (24, 48, 72, 96, 120, 144)]
    for start, step in ((0, 120), (1, 144)):
        single = tmp_path / f"single-{step}.safetensors"
        ok("swa", *ckpts[start:start + 5], "-o", single)
        same(tmp_path / f"lawa-{step}.safetensors", single)


def test_window_and_stride_on_a_sweep_into_a_folder(tmp_path: Path) -> None:
    ok("ema", HF, "--decay", "0.5,0.9", "--window", "3", "--stride", "3", "-o", f"{tmp_path}/out/")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        f"decay={d},window={w}.safetensors" for d in ("0.5", "0.9") for w in (0, 1))


@pytest.mark.parametrize(("args", "shown"), [
    (["ema", HF, "--decay", "0.9,0.99", "-o", "{tmp}/one.safetensors"],
     ["--output", "gives 2 outputs", "{decay}"]),
    (["ema", HF, "--sigma-rel", "0.05,0.1", "-o", "{tmp}/ema-{decay}.safetensors"],
     ["--output", "no field {decay}", "{sigma_rel}"]),
    (["swa", HF, "--window", "2", "-o", "{tmp}/w-{index}-{nope}.safetensors"], ["no field {nope}"]),
    (["ema", HF, "--decay", "0.5,0.9", "--window", "5", "-o", "{tmp}/x-{decay}.safetensors"], ["the same path"]),
    (["ema", HF, "--decay", "0.9,0.99", "--hold", "backward,forward", "-o", "{tmp}/x-{decay}.safetensors"],
     ["--decay and --hold each list several values"]),
    (["swa", HF, "--stride", "2", "-o", "{tmp}/x.safetensors"], ["--stride goes with --window"]),
    (["ema", HF, "--decay", "0.9", "--keep", "all", "-o", "{tmp}/x.safetensors"], ["--keep", "--eval"]),
    (["swa", HF, "--window", "7", "-o", "{tmp}/x-{step}.safetensors"], ["--window is 7 checkpoints"]),
    (["linear", HF, "--weights", "0.5,0.5", "--lr-power", "2", "-o", "{tmp}/x.safetensors"],
     ["--lr-power go with --weights lr"]),
    (["ema", HF, "--decay", "0.9,0.9", "-o", "{tmp}/x-{decay}.safetensors"], ["--decay names a value twice"]),
])
def test_errors_of_several_outputs_are_one_line_with_flags(tmp_path: Path, args: list[str], shown: list[str]) -> None:
    line = error_line(run(*[a.replace("{tmp}", str(tmp_path)) for a in args]))
    for text in shown:
        assert text in line, line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("args", "flag"), [
    (["ema", HF, "--decay", "0.9,1.5"], "--decay"),
    (["ema", HF, "--decay", "0.9,,0.99"], "--decay"),
    (["wsm", HF, "--schedule", "linear,sideways"], "--schedule"),
    (["graft", HF, "--bins", "10,x"], "--bins"),
])
def test_bad_comma_lists_are_usage_errors(tmp_path: Path, args: list[str], flag: str) -> None:
    assert flag in error_line(run(*args, "-o", tmp_path / "x.safetensors"), code=2)


@pytest.mark.parametrize("mode", ["max", "min"])
def test_eval_keep_best_keeps_the_best_row_with_its_metadata(tmp_path: Path, mode: str) -> None:
    from fixtures.model import accuracy  # type: ignore[import-not-found]

    out = tmp_path / "best.safetensors"
    result = ok("ema", PLAIN, "--decay", "0.5,0.9,0.99", "--eval", SCORE, "--eval-mode", mode, "--keep", "best",
                "-o", out, "--json")
    data = json.loads(result.stdout)
    scores = [s["score"] for s in data["scores"]]
    best = scores.index(max(scores) if mode == "max" else min(scores))
    decay = [0.5, 0.9, 0.99][best]
    assert [s["kept"] for s in data["scores"]] == [i == best for i in range(3)]
    assert data["outputs"] == [{"path": str(out), "name": f"decay={decay}", "params": {"decay": decay}}]
    assert list(tmp_path.iterdir()) == [out]
    single = tmp_path / "single.safetensors"
    ok("ema", PLAIN, "--decay", str(decay), "-o", single)
    same(out, single)
    meta = metadata(out)
    assert json.loads(meta["ckptavg_row"])["params"] == {"decay": decay}
    assert json.loads(meta["ckptavg_inputs"]) == json.loads(metadata(single)["ckptavg_inputs"])
    assert [s["score"] for s in json.loads(meta["ckptavg_scores"])] == scores
    assert accuracy(load_file(out)) == scores[best]


def test_eval_keep_best_with_a_template_names_the_file_after_the_winner(tmp_path: Path) -> None:
    result = ok("ema", PLAIN, "--decay", "0.5,0.9,0.99", "--eval", SCORE, "-o", tmp_path / "best-{decay}.safetensors")
    (written,) = list(tmp_path.iterdir())
    kept = next(line for line in result.stdout.splitlines() if line.rstrip().endswith("kept"))
    assert written.name == f"best-{kept.split()[0].removeprefix('decay=')}.safetensors"
    assert result.stdout.startswith(f"wrote {written}: ema of 6 checkpoints")


def test_eval_keep_all_writes_every_row_with_its_score(tmp_path: Path) -> None:
    result = ok("ema", PLAIN, "--decay", "0.5,0.9", "--eval", SCORE, "--keep", "all",
                "-o", tmp_path / "e-{decay}.safetensors")
    lines = result.stdout.splitlines()
    assert lines[0].startswith("wrote 2 outputs") and all("score " in line for line in lines[1:3])
    for d in ("0.5", "0.9"):
        scores = json.loads(metadata(tmp_path / f"e-{d}.safetensors")["ckptavg_scores"])
        assert [s["kept"] for s in scores] == [True, True]


def test_soup_keep_scores_windows_with_its_own_eval(tmp_path: Path) -> None:
    result = ok("soup", PLAIN, "--eval", SCORE, "--window", "3", "--stride", "3", "--keep", "best",
                "-o", tmp_path / "soup.safetensors", "--json")
    data = json.loads(result.stdout)
    assert len(data["scores"]) == 2 and sum(s["kept"] for s in data["scores"]) == 1
