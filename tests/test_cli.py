"""The `ckptavg` command line: error contract, success output, plan/inspect, subprocess entry points.

Error contract: user-input errors print exactly one `Error: ...` line on stderr and exit 1 (option-parser
usage errors print one `Error: ...` line too, and exit 2), never a traceback unless CKPTAVG_DEBUG=1, and
leave the file system exactly as it was: no output, no `.*.ckptavg-partial` temp file, inputs and a
pre-existing output unchanged.

References come from torch and safetensors directly, never from ckptavg.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shlex
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import Result

import ckptavg
from ckptavg import (
    CheckpointFormatError,
    CkptavgError,
    IncompatibleCheckpointsError,
    NonFiniteError,
    OutputError,
    SelectionError,
)

REPO = Path(__file__).resolve().parent.parent
TEMP_GLOB = ".*.ckptavg-partial"
SUMMARY_KEYS = {"output", "method", "checkpoints", "tensors", "bytes", "sha256", "seconds"}
Cli = Callable[..., Result]  # the `cli` fixture of conftest.py
PLAN_KEYS = {"method", "params", "order", "checkpoints", "residual", "tensors", "bytes"}


# ---------------------------------------------------------------- helpers


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def snapshot(*roots: Path) -> dict[str, str]:
    """Every file (hash), symlink (target) and directory under `roots`: to prove nothing changed."""
    state: dict[str, str] = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                p = Path(dirpath, name)
                if p.is_symlink():
                    state[str(p)] = "link -> " + os.readlink(p)
                elif p.is_dir():
                    state[str(p)] = "dir"
                else:
                    state[str(p)] = sha256(p)
    return state


def partial_files(*roots: Path) -> list[Path]:
    return [p for root in roots for p in root.rglob(TEMP_GLOB)]


def stderr_lines(result: Result) -> list[str]:
    """stderr lines other than `Warning:` lines."""
    return [ln for ln in result.stderr.splitlines() if ln.strip() and not ln.startswith("Warning: ")]


def assert_one_error_line(result: Result) -> str:
    assert result.exit_code == 1, (result.exit_code, result.output, result.exception)
    # Anything but SystemExit here is an exception that escaped the CLI (a traceback for a user).
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    lines = stderr_lines(result)
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert result.stdout == ""
    return lines[0]


def mean_of(state_dicts: list[dict[str, torch.Tensor]], key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Reference average of one floating tensor: float64 mean rounded once."""
    stacked = torch.stack([sd[key].double() for sd in state_dicts])
    return stacked.mean(0).to(dtype or state_dicts[0][key].dtype)


def safetensors_header(path: Path) -> tuple[int, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return n, raw


def write_raw_safetensors(path: Path, header: bytes, data: bytes = b"\0" * 4) -> None:
    header += b" " * (-len(header) % 8)
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)


class _RunsShellCommand:
    """Unpickling this object calls os.system (the classic malicious-pickle payload)."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (self.command,))


def _sd(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"weight": torch.randn(4, 3, generator=g), "bias": torch.randn(3, generator=g), "count": torch.tensor(7)}


# ---------------------------------------------------------------- the zoo of small inputs


@pytest.fixture
def zoo(tmp_path: Path, runs: Path) -> dict[str, str]:
    """Small good and bad checkpoints under tmp_path/src (and a few folders); returns template names."""
    src = tmp_path / "src"
    src.mkdir()
    one, two = _sd(1), _sd(2)
    save_file(one, src / "one.safetensors")
    save_file(two, src / "two.safetensors")
    save_file({k: v for k, v in two.items() if k != "bias"}, src / "missing_key.safetensors")
    save_file({**two, "extra": torch.zeros(2)}, src / "extra_key.safetensors")
    save_file({**two, "weight": two["weight"].t().contiguous()}, src / "other_shape.safetensors")
    save_file({**two, "bias": torch.arange(3)}, src / "int_bias.safetensors")
    save_file({**two, "weight": two["weight"].half()}, src / "fp16.safetensors")
    nan = two["weight"].clone()
    nan[1, 2] = float("nan")
    save_file({**two, "weight": nan}, src / "nan.safetensors")

    n, raw = safetensors_header(src / "one.safetensors")
    (src / "cut_data.safetensors").write_bytes(raw[: 8 + n + (len(raw) - 8 - n) // 2])
    (src / "cut_header.safetensors").write_bytes(raw[: 8 + n // 2])
    write_raw_safetensors(src / "bad_json.safetensors", b'{"weight": {"dtype": F32}}')
    write_raw_safetensors(src / "dtype_list.safetensors",
                          json.dumps({"w": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}).encode())
    write_raw_safetensors(src / "shape_bool.safetensors",
                          json.dumps({"w": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}).encode())
    write_raw_safetensors(src / "deep.safetensors", b'{"w":' + b"[" * 100_000 + b"]" * 100_000 + b"}")

    (src / "x.pt").write_bytes(b"")
    plain = (runs / "plain" / "epoch=0.pt").read_bytes()
    (src / "trunc.pt").write_bytes(plain[: len(plain) // 2])
    torch.save(one, src / "legacy_full.pt", _use_new_zipfile_serialization=False)
    legacy = (src / "legacy_full.pt").read_bytes()
    (src / "legacy_cut_data.pt").write_bytes(legacy[:-8])
    (src / "legacy_cut16.pt").write_bytes(legacy[:16])
    (src / "legacy_cut30.pt").write_bytes(legacy[:30])
    (src / "legacy_full.pt").unlink()

    marker = tmp_path / "MARKER"
    torch.save({"weight": torch.zeros(2), "hook": _RunsShellCommand(f"touch {shlex.quote(str(marker))}")},
               src / "evil.pt")
    os.symlink("one.safetensors", src / "sym.safetensors")
    os.link(src / "one.safetensors", src / "hard.safetensors")

    (tmp_path / "textonly").mkdir()
    (tmp_path / "textonly" / "notes.txt").write_text("not a checkpoint\n")
    partial = tmp_path / "partial_run"
    partial.mkdir()
    shutil.copy(src / "one.safetensors", partial / "one.safetensors")
    shutil.copy(src / "two.safetensors", partial / "two.safetensors")
    shutil.copy(src / "cut_header.safetensors", partial / "three.safetensors")
    crashed = tmp_path / "crashed_run"
    crashed.mkdir()
    shutil.copy(src / "one.safetensors", crashed / "one.safetensors")
    shutil.copy(src / "two.safetensors", crashed / "two.safetensors")
    (crashed / "three.pt").write_bytes(b"")
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(src / "one.safetensors", run / "one.safetensors")
    shutil.copy(src / "two.safetensors", run / "two.safetensors")

    hf = tmp_path / "hf"
    for step in (24, 48):
        shutil.copytree(runs / "hf-sharded" / f"checkpoint-{step}", hf / f"checkpoint-{step}")

    out = tmp_path / "out"
    out.mkdir()
    (out / "exists.safetensors").write_bytes(b"an older result the user wants to keep")
    return {
        "tmp": str(tmp_path), "src": str(src), "runs": str(runs), "textonly": str(tmp_path / "textonly"),
        "partial_run": str(partial), "crashed_run": str(crashed), "run": str(run), "hf": str(hf),
        "outdir": str(out), "out": str(out / "avg.safetensors"),
        "exists": str(out / "exists.safetensors"), "nodir": str(tmp_path / "missing_dir" / "avg.safetensors"),
        "marker": str(marker),
    }


def fill(template: str, names: dict[str, str]) -> list[str]:
    return [part.format(**names) for part in template.split()]


PAIR = "{src}/one.safetensors {src}/two.safetensors"
ERROR_CASES = [
    pytest.param("{src}/nope.safetensors -o {out}", ["nope.safetensors"], id="missing-input"),
    pytest.param("{src}/*.nothing -o {out}", ["*.nothing"], id="glob-matches-nothing"),
    pytest.param("{textonly} -o {out}", ["textonly"], id="dir-without-checkpoints"),
    pytest.param("{src}/x.pt -o {out}", ["x.pt"], id="zero-byte-file"),
    pytest.param("{src}/trunc.pt -o {out}", ["trunc.pt"], id="truncated-torch-zip"),
    pytest.param("{src}/legacy_cut_data.pt -o {out}", ["legacy_cut_data.pt"], id="truncated-legacy-in-data"),
    pytest.param("{src}/legacy_cut16.pt -o {out}", ["legacy_cut16.pt"], id="truncated-legacy-in-pickle-a"),
    pytest.param("{src}/legacy_cut30.pt -o {out}", ["legacy_cut30.pt"], id="truncated-legacy-in-pickle-b"),
    pytest.param("{src}/cut_data.safetensors -o {out}", ["cut_data.safetensors"], id="safetensors-cut-in-data"),
    pytest.param("{src}/cut_header.safetensors -o {out}", ["cut_header.safetensors"],
                 id="safetensors-cut-in-header"),
    pytest.param("{src}/bad_json.safetensors -o {out}", ["bad_json.safetensors", "JSON"],
                 id="safetensors-header-not-json"),
    pytest.param("{src}/dtype_list.safetensors -o {out}", ["dtype_list.safetensors"],
                 id="safetensors-dtype-not-a-string"),
    pytest.param("{src}/shape_bool.safetensors -o {out}", ["shape_bool.safetensors"],
                 id="safetensors-shape-bool"),
    pytest.param("{src}/deep.safetensors -o {out}", ["deep.safetensors"], id="safetensors-header-deeply-nested"),
    pytest.param("{partial_run} -o {out}", ["three.safetensors"], id="truncated-safetensors-inside-directory"),
    pytest.param("{crashed_run} -o {out}", ["three.pt"], id="empty-checkpoint-inside-directory"),
    pytest.param(PAIR.replace("two", "missing_key") + " -o {out}", ["missing_key.safetensors", "one.safetensors",
                                                                    "bias"], id="missing-key"),
    pytest.param(PAIR.replace("two", "extra_key") + " -o {out}", ["extra_key.safetensors", "one.safetensors",
                                                                  "extra"], id="extra-key"),
    pytest.param(PAIR.replace("two", "other_shape") + " -o {out}", ["other_shape.safetensors", "one.safetensors",
                                                                    "weight"], id="different-shape"),
    pytest.param(PAIR.replace("two", "int_bias") + " -o {out}", ["int_bias.safetensors", "one.safetensors", "bias"],
                 id="float-vs-int"),
    pytest.param(PAIR.replace("two", "fp16") + " -o {out}", ["fp16.safetensors", "one.safetensors", "weight",
                                                             "--dtype"], id="fp16-vs-fp32"),
    pytest.param(PAIR.replace("two", "nan") + " -o {out}", ["nan.safetensors", "weight"], id="nan-input"),
    pytest.param("{runs}/safetensors --start 1.5 -o {out}", ["--start", "1.5"], id="start-fraction-out-of-range"),
    pytest.param("{runs}/safetensors --start 99 -o {out}", ["--start 99"], id="start-leaves-nothing"),
    pytest.param("{runs}/plain --upto 50 -o {out}", ["--upto", "step", "epoch=0.pt"], id="upto-without-steps"),
    pytest.param(PAIR + " -o {exists}", ["exists.safetensors", "--force"], id="output-exists"),
    pytest.param(PAIR.replace("two", "nan") + " -o {exists} --force", ["nan.safetensors"],
                 id="failed-force-keeps-old-output"),
    # Without --force an output that is an input may be refused as "already exists" or as "an input".
    pytest.param(PAIR + " -o {src}/one.safetensors", ["one.safetensors"], id="output-is-input"),
    pytest.param(PAIR + " -o {src}/one.safetensors --force", ["input"], id="output-is-input-force"),
    pytest.param(PAIR + " -o {src}/sym.safetensors --force", ["sym.safetensors", "input"],
                 id="output-symlink-to-input"),
    pytest.param(PAIR + " -o {src}/hard.safetensors", ["hard.safetensors"], id="output-hardlink-to-input"),
    pytest.param(PAIR + " -o {src}/hard.safetensors --force", ["input"], id="output-hardlink-to-input-force"),
    pytest.param("{run} --last 1 -o {run}/one.safetensors --force", ["one.safetensors", "input"],
                 id="output-is-unselected-input-force"),
    pytest.param("{hf} -o {hf}/checkpoint-24/model-00001-of-00002.safetensors --force", ["input"],
                 id="output-is-shard-of-hf-input-force"),
    pytest.param("{hf} -o {hf}/checkpoint-24/model.safetensors.index.json --force", ["input"],
                 id="output-is-index-of-hf-input-force"),
    pytest.param("{hf} -o {hf}/checkpoint-24/trainer_state.json --force", ["input"],
                 id="output-is-trainer-state-of-hf-input-force"),
    pytest.param(PAIR + " -o {nodir}", ["missing_dir"], id="output-dir-missing"),
    pytest.param(PAIR + " -o {src}", ["holds the input"], id="output-folder-holds-inputs"),
    pytest.param(PAIR + " -o {exists}/", ["not a directory"], id="output-folder-is-a-file"),
    pytest.param("{src}/evil.pt -o {out}", ["evil.pt", "system", "--trust-pickle"], id="pickle-that-runs-code"),
    pytest.param("{runs}/lightning --key nope -o {out}", ["nope", "state_dict"], id="key-not-found"),
]


@pytest.mark.parametrize("args, message_parts", ERROR_CASES)
def test_error_is_one_line_and_leaves_nothing(cli: Cli, zoo: dict[str, str], runs: Path, args: str, message_parts: list[str]) -> None:
    tmp = Path(zoo["tmp"])
    argv = ["swa", *fill(args, zoo)]
    output = Path(argv[argv.index("-o") + 1])
    output_existed = output.exists() or output.is_symlink()
    before = snapshot(tmp, runs)

    result = cli(*argv)

    line = assert_one_error_line(result)
    for part in message_parts:
        assert part.format(**zoo) in line, f"{part!r} not in {line!r}"
    assert output_existed or not output.exists()
    assert partial_files(tmp) == []
    assert not Path(zoo["marker"]).exists(), "unpickling ran code"
    assert snapshot(tmp, runs) == before, "an error changed files (inputs, output or temp files)"


USAGE_CASES = [
    pytest.param("--last 0", id="last-0"),
    pytest.param("--every 0", id="every-0"),
    pytest.param("--order bogus", id="order-bogus"),
    pytest.param("--dtype float8", id="dtype-float8"),
    pytest.param("--upto -1", id="upto-negative"),
    pytest.param("--accum-dtype float16", id="accum-dtype-float16"),
]


@pytest.mark.parametrize("option", USAGE_CASES)
def test_usage_error_exits_2(cli: Cli, zoo: dict[str, str], runs: Path, option: str) -> None:
    tmp = Path(zoo["tmp"])
    before = snapshot(tmp)
    result = cli("swa", *fill(PAIR + " -o {out} " + option, zoo))
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    assert result.stdout == ""
    lines = result.stderr.splitlines()  # one line, like every other error (it was a boxed panel before)
    assert len(lines) == 1 and lines[0].startswith("Error: ") and option.split()[0] in lines[0], result.stderr
    assert snapshot(tmp) == before


def test_missing_output_option_exits_2(cli: Cli, zoo: dict[str, str]) -> None:
    tmp = Path(zoo["tmp"])
    before = snapshot(tmp)
    result = cli("swa", *fill(PAIR, zoo))
    assert result.exit_code == 2, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "--output" in lines[0], result.stderr
    assert "Traceback" not in result.output
    assert snapshot(tmp) == before


@pytest.mark.parametrize(
    "args, error_type",
    [
        ("{src}/nope.safetensors -o {out}", SelectionError),
        (PAIR.replace("two", "missing_key") + " -o {out}", IncompatibleCheckpointsError),
        (PAIR.replace("two", "nan") + " -o {out}", NonFiniteError),
        (PAIR + " -o {exists}", OutputError),
        ("{src}/evil.pt -o {out}", CheckpointFormatError),
    ],
)
def test_debug_env_lets_the_exception_propagate(cli: Cli, zoo: dict[str, str], args: str, error_type: type) -> None:
    tmp = Path(zoo["tmp"])
    before = snapshot(tmp)
    result = cli("swa", *fill(args, zoo), env={"CKPTAVG_DEBUG": "1"})
    assert isinstance(result.exception, error_type), repr(result.exception)
    assert isinstance(result.exception, CkptavgError)
    assert result.exit_code == 1
    assert not any(ln.startswith("Error: ") for ln in result.stderr.splitlines())
    assert partial_files(tmp) == []
    assert not Path(zoo["marker"]).exists()
    assert snapshot(tmp) == before


# ---------------------------------------------------------------- flags that turn an error into a result


@pytest.mark.parametrize(
    "other, flag, dtype",
    [
        ("fp16", "--dtype float32", torch.float32),
        ("nan", "--allow-nonfinite", torch.float32),
    ],
)
def test_flag_makes_the_average_possible(cli: Cli, zoo: dict[str, str], other: str, flag: str, dtype: torch.dtype) -> None:
    src = Path(zoo["src"])
    out = Path(zoo["out"])
    result = cli("swa", src / "one.safetensors", src / f"{other}.safetensors", "-o", out, *flag.split())
    assert result.exit_code == 0, result.output
    refs = [load_file(src / "one.safetensors"), load_file(src / f"{other}.safetensors")]
    got = load_file(out)
    assert set(got) == set(refs[0])
    for key in ("weight", "bias"):
        assert got[key].dtype == dtype
        torch.testing.assert_close(got[key], mean_of(refs, key, dtype), equal_nan=True)
    assert torch.equal(got["count"], refs[0]["count"])


# ---------------------------------------------------------------- success output


def _step(path: Path) -> int:
    with safe_open(path, "pt") as f:
        return int(f.metadata()["step"])


def _fixture_safetensors(runs: Path) -> list[Path]:
    """The fixture's safetensors checkpoints, oldest first by the step in their metadata."""
    return sorted((runs / "safetensors").glob("*.safetensors"), key=_step)


def _assert_is_average_of(out: Path, inputs: list[Path]) -> None:
    refs = [load_file(p) for p in inputs]
    got = load_file(out)
    assert set(got) == set(refs[0])
    for key, ref in refs[-1].items():
        if ref.is_floating_point():
            torch.testing.assert_close(got[key], mean_of(refs, key))
        else:
            assert torch.equal(got[key], ref)  # integer buffers: from the newest checkpoint


def test_summary_line(cli: Cli, runs: Path, tmp_path: Path) -> None:
    out = tmp_path / "avg.safetensors"
    result = cli("swa", runs / "safetensors", "-o", out)
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    lines = result.stdout.splitlines()
    assert len(lines) == 1
    assert str(out) in lines[0] and sha256(out) in lines[0]
    _assert_is_average_of(out, _fixture_safetensors(runs))
    assert partial_files(tmp_path) == []


def test_json_summary(cli: Cli, runs: Path, tmp_path: Path) -> None:
    out = tmp_path / "avg.safetensors"
    result = cli("swa", runs / "safetensors", "-o", out, "--json")
    assert result.exit_code == 0, result.output
    assert len(result.stdout.splitlines()) == 1
    summary = json.loads(result.stdout)
    assert set(summary) >= SUMMARY_KEYS
    assert summary["output"] == str(out)
    assert summary["method"] == "swa"
    assert summary["checkpoints"] == len(_fixture_safetensors(runs))
    assert summary["tensors"] == len(load_file(out))
    assert summary["bytes"] == out.stat().st_size
    assert summary["sha256"] == sha256(out)
    assert isinstance(summary["seconds"], int | float) and summary["seconds"] >= 0


@pytest.mark.parametrize("flags", [["--quiet"], ["-q", "--json"]])
def test_quiet_prints_nothing(cli: Cli, runs: Path, tmp_path: Path, flags: list[str]) -> None:
    out = tmp_path / "avg.safetensors"
    result = cli("swa", runs / "safetensors", "-o", out, *flags)
    assert result.exit_code == 0, result.output
    assert result.stdout == ""
    _assert_is_average_of(out, _fixture_safetensors(runs))


@pytest.mark.parametrize("flag", ["--force", "-f"])
def test_force_overwrites(cli: Cli, runs: Path, tmp_path: Path, flag: str) -> None:
    out = tmp_path / "avg.safetensors"
    out.write_bytes(b"old contents")
    result = cli("swa", runs / "safetensors", "-o", out, flag, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["sha256"] == sha256(out)
    _assert_is_average_of(out, _fixture_safetensors(runs))
    assert partial_files(tmp_path) == []


@pytest.mark.parametrize("layout", ["safetensors", "plain", "lightning", "hf-sharded", "legacy"])
def test_second_run_is_byte_identical(cli: Cli, runs: Path, tmp_path: Path, layout: str) -> None:
    first, second = tmp_path / "a" / "avg.safetensors", tmp_path / "b" / "avg.safetensors"
    first.parent.mkdir()
    second.parent.mkdir()
    for out in (first, second):
        result = cli("swa", runs / layout, "-o", out, "--last", "4", "--quiet")
        assert result.exit_code == 0, result.output
    assert first.read_bytes() == second.read_bytes()


# ---------------------------------------------------------------- plan


MANIFEST_STEPS = sorted(e["global_step"] for e in json.loads((REPO / "fixtures/runs/MANIFEST.json").read_text())["epochs"])


@pytest.mark.parametrize(
    "options, expected_steps",
    [
        ([], MANIFEST_STEPS),
        (["--last", "2"], MANIFEST_STEPS[-2:]),
        (["--every", "2"], MANIFEST_STEPS[::2]),
        (["--upto", str(MANIFEST_STEPS[2])], MANIFEST_STEPS[:3]),
    ],
)
def test_plan_json(
    cli: Cli, runs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, options: list[str], expected_steps: list[int]
) -> None:
    monkeypatch.chdir(tmp_path)
    # ddp file names (step=120 before step=24) sort wrongly as text: the plan must use the step.
    result = cli("plan", "swa", runs / "ddp", "--json", *options)
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    assert set(plan) >= PLAN_KEYS
    assert plan["method"] == "swa" and plan["order"] == "step"
    ckpts = plan["checkpoints"]
    for c in ckpts:
        assert {"path", "step", "epoch", "metric", "weight"} <= set(c)
    assert [c["step"] for c in ckpts] == expected_steps
    assert math.isclose(math.fsum(c["weight"] for c in ckpts) + plan["residual"], 1.0, abs_tol=1e-12)
    assert math.isclose(math.fsum(c["weight"] for c in ckpts), 1.0, abs_tol=1e-12)
    by_step = {int(p.name.split("-")[0].removeprefix("step=")): p for p in (runs / "ddp").glob("*.pt")}
    assert [Path(c["path"]).resolve() for c in ckpts] == [by_step[s].resolve() for s in expected_steps]
    ref = torch.load(by_step[expected_steps[0]], weights_only=True)
    assert plan["tensors"] == len(ref)
    assert plan["bytes"] == sum(t.numel() * t.element_size() for t in ref.values())
    assert list(tmp_path.iterdir()) == [], "plan wrote something"


def test_plan_table(cli: Cli, runs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = cli("plan", "swa", runs / "safetensors")
    assert result.exit_code == 0, result.output
    for p in _fixture_safetensors(runs):
        assert str(p) in result.stdout
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- inspect


def test_inspect_json_matches_safetensors_reader(cli: Cli, runs: Path) -> None:
    path = _fixture_safetensors(runs)[2]
    result = cli("inspect", path, "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    with safe_open(path, "pt") as f:
        meta = f.metadata()
        ref = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    assert info["format"] == "safetensors"
    assert info["file_metadata"] == meta
    assert info["step"] == int(meta["step"]) and info["epoch"] == int(meta["epoch"])
    got = {t["name"]: (t["dtype"], t["shape"], t["bytes"]) for t in info["tensors"]}
    assert got == {
        k: (str(t.dtype).removeprefix("torch."), list(t.shape), t.numel() * t.element_size()) for k, t in ref.items()
    }
    assert info["bytes"] == sum(b for _, _, b in got.values())

    text = cli("inspect", path)
    assert text.exit_code == 0, text.output
    for name in ref:
        assert name in text.stdout


def test_inspect_shows_provenance_of_an_output(cli: Cli, runs: Path, tmp_path: Path) -> None:
    out = tmp_path / "avg.safetensors"
    assert cli("swa", runs / "safetensors", "--last", "3", "-o", out, "-q").exit_code == 0
    used = _fixture_safetensors(runs)[-3:]

    info = json.loads(cli("inspect", out, "--json").stdout)
    prov = info["ckptavg"]
    assert prov["version"] == ckptavg.__version__
    assert prov["method"] == "swa"
    assert [Path(i["path"]) for i in prov["inputs"]] == used
    assert math.isclose(math.fsum(i["weight"] for i in prov["inputs"]), 1.0, abs_tol=1e-12)

    text = cli("inspect", out)
    assert text.exit_code == 0, text.output
    assert "ckptavg" in text.stdout
    for p in used:
        assert str(p) in text.stdout


# ---------------------------------------------------------------- Lightning WeightAveraging checkpoints


@pytest.fixture
def lightning_ema(tmp_path: Path) -> tuple[Path, list[dict[str, Any]]]:
    """Two Lightning-style checkpoints whose state_dict is an average and current_model_state the raw weights."""
    folder = tmp_path / "lightning"
    folder.mkdir()
    saved = []
    for epoch, step in ((0, 10), (1, 20)):
        ckpt: dict[str, Any] = {
            "epoch": epoch, "global_step": step, "pytorch-lightning_version": "2.5.0",
            "state_dict": _sd(100 + epoch), "current_model_state": _sd(200 + epoch),
        }
        torch.save(ckpt, folder / f"epoch={epoch}-step={step}.ckpt")
        saved.append(ckpt)
    return folder, saved


def _warning_lines(result: Result) -> list[str]:
    return [ln for ln in result.stderr.splitlines() if ln.startswith("Warning:")]


@pytest.mark.parametrize("command", ["inspect", "plan", "swa"])
def test_lightning_averaged_state_dict_warns(
    cli: Cli, lightning_ema: tuple[Path, list[dict[str, Any]]], tmp_path: Path, command: str
) -> None:
    folder, saved = lightning_ema
    out = tmp_path / "avg.safetensors"
    argv = {
        "inspect": ["inspect", next(folder.iterdir())],
        "plan": ["plan", "swa", folder],
        "swa": ["swa", folder, "-o", out],
    }[command]
    result = cli(*argv)
    assert result.exit_code == 0, result.output
    warnings = _warning_lines(result)
    assert warnings and all("--key current_model_state" in w for w in warnings), result.stderr
    if command == "swa":  # the default still averages state_dict, as documented
        got = load_file(out)
        states = [c["state_dict"] for c in saved]
        for key in ("weight", "bias"):
            torch.testing.assert_close(got[key], mean_of(states, key))


def test_lightning_key_current_model_state(cli: Cli, lightning_ema: tuple[Path, list[dict[str, Any]]], tmp_path: Path) -> None:
    folder, saved = lightning_ema
    out = tmp_path / "avg.safetensors"
    result = cli("swa", folder, "--key", "current_model_state", "-o", out)
    assert result.exit_code == 0, result.output
    assert _warning_lines(result) == []
    got = load_file(out)
    raw = [c["current_model_state"] for c in saved]
    averaged = [c["state_dict"] for c in saved]
    for key in ("weight", "bias"):
        assert not torch.allclose(mean_of(raw, key), mean_of(averaged, key))  # the two choices differ
        torch.testing.assert_close(got[key], mean_of(raw, key))


# ---------------------------------------------------------------- real subprocesses


def _console_script() -> str:
    found = shutil.which("ckptavg", path=str(Path(sys.executable).parent)) or shutil.which("ckptavg")
    assert found, "the ckptavg console script is not installed"
    return found


def test_python_m_ckptavg_help() -> None:
    proc = subprocess.run([sys.executable, "-m", "ckptavg", "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    for command in ("swa", "plan", "inspect"):
        assert command in proc.stdout


def test_console_script_matches_library(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    arg = "fixtures/runs/safetensors"  # the same string for both: the output records the input paths
    cli_out, lib_out = tmp_path / "cli.safetensors", tmp_path / "lib.safetensors"
    proc = subprocess.run([_console_script(), "swa", arg, "-o", str(cli_out), "--json"],
                          cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "CKPTAVG_DEBUG": ""})
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["sha256"] == sha256(cli_out)

    monkeypatch.chdir(REPO)
    result = ckptavg.average_checkpoints(arg, lib_out)
    assert result.sha256 == sha256(lib_out)
    assert cli_out.read_bytes() == lib_out.read_bytes()


def test_a_run_imports_no_pydantic() -> None:
    """typer is capped below 0.29, which validates every option through pydantic (README, design notes:
    7.5 MiB and 0.06 s per run). Fails if the installed typer brings that back."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "ckptavg", "plan", "swa",
                           "fixtures/runs/safetensors", "--json"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert "typer" in imported and "torch" in imported  # the list is real
    assert not {m for m in imported if m.split(".")[0] in ("pydantic", "pydantic_core")}


def test_the_briefs_commands_run_as_written(tmp_path: Path) -> None:
    """The four commands the README and the project brief open with, run by a shell exactly as written
    (the shell expands `runs/*.pt`), on copies of the DDP fixtures (steps in the file names)."""
    runs = tmp_path / "runs"
    shutil.copytree(REPO / "fixtures" / "runs" / "ddp", runs)
    first, second = sorted(runs.glob("*.pt"))[:2]
    shutil.copy(first, tmp_path / "a.pt")
    shutil.copy(second, tmp_path / "b.pt")
    script = "\n".join([
        "set -e",
        "ckptavg swa runs/*.pt -o avg.safetensors",
        "ckptavg ema runs/ --decay 0.9 --per checkpoint -o ema.safetensors",
        "ckptavg graft a.pt b.pt -o grafted.safetensors",
        "ckptavg plan ema runs/ --decay 0.999 --per step --json > plan.json",
    ])
    env = {**os.environ, "PATH": f"{Path(_console_script()).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(["bash", "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    for name, plan in (("avg", ckptavg.Swa()), ("ema", ckptavg.Ema(decay=0.9))):  # the same tensors as the library's
        ckptavg.average_checkpoints(str(runs), tmp_path / f"lib-{name}.safetensors", plan)
        got, want = load_file(tmp_path / f"{name}.safetensors"), load_file(tmp_path / f"lib-{name}.safetensors")
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert set(load_file(tmp_path / "grafted.safetensors")) == set(load_file(tmp_path / "avg.safetensors"))
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["params"]["per"] == "step" and plan["params"]["step_decay"] == 0.999
    assert [c["step"] for c in plan["checkpoints"]] == [24, 48, 72, 96, 120, 144]


@pytest.mark.parametrize("debug", ["", "1"])
def test_console_script_error(tmp_path: Path, debug: str) -> None:
    out = tmp_path / "avg.safetensors"
    proc = subprocess.run([_console_script(), "swa", str(tmp_path / "nope.safetensors"), "-o", str(out)],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "CKPTAVG_DEBUG": debug})
    assert proc.returncode == 1
    assert proc.stdout == ""
    if debug:
        assert "SelectionError" in proc.stderr  # propagated, with its traceback
    else:
        assert "Traceback" not in proc.stderr
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("Error: ") and "nope.safetensors" in lines[0]
    assert list(tmp_path.iterdir()) == []
