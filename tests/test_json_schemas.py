"""The documented JSON of `plan --json`, a run's `--json` and `inspect --json` (README, "JSON schemas")."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from ckptavg.cli.app import app

RUNS = Path(__file__).resolve().parent.parent / "fixtures" / "runs"


def _json(*args: object) -> dict[str, object]:
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert isinstance(data, dict)
    return data


def test_plan_json() -> None:
    data = _json("plan", "ema", RUNS / "lightning", "--decay", "0.99", "--per", "step", "--json")
    assert {"method", "params", "order", "checkpoints", "residual", "tensors", "bytes", "warnings", "outputs",
            "skipped"} <= set(data)
    row = data["checkpoints"][0]  # type: ignore[index]
    assert set(row) == {"path", "step", "epoch", "metric", "metric_source", "weight", "step_source", "epoch_source",
                        "format"}
    [output] = data["outputs"]  # type: ignore[misc]
    assert output["weights"] == [c["weight"] for c in data["checkpoints"]]  # type: ignore[attr-defined]
    assert set(output) == {"name", "params", "weights", "residual"}


def test_run_json(tmp_path: Path) -> None:
    data = _json("swa", RUNS / "plain", "-o", tmp_path / "avg.safetensors", "--json")
    assert {"output", "method", "checkpoints", "tensors", "bytes", "sha256", "seconds", "inputs", "warnings"} <= set(data)
    assert [set(i) for i in data["inputs"]] == [{"path", "step", "epoch", "weight"}] * 6  # type: ignore[attr-defined]
    folder = _json("swa", RUNS / "hf", "-o", f"{tmp_path}/folder/", "--json")
    assert folder["sha256"] is None and folder["files"]


def test_inspect_json_parses_the_provenance(tmp_path: Path) -> None:
    out = tmp_path / "avg.safetensors"
    _json("swa", RUNS / "plain", "-o", out, "--json")
    data = _json("inspect", out, "--json")
    assert {"path", "format", "location", "stripped_prefix", "step", "step_source", "epoch", "epoch_source",
            "metrics", "other_entries", "file_metadata", "tensors", "bytes", "ckptavg"} <= set(data)
    provenance = data["ckptavg"]
    assert isinstance(provenance["inputs"], list) and len(provenance["inputs"]) == 6  # type: ignore[index]
    assert isinstance(data["file_metadata"]["ckptavg_inputs"], str)  # type: ignore[index]  # a string in the file
