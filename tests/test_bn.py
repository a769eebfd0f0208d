"""BatchNorm recalibration equals torch.optim.swa_utils.update_bn on the same model, weights and batches."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from refs import FIXTURES, RUNS, load_model_module
from safetensors.torch import load_file, save_file
from torch.optim.swa_utils import update_bn
from typer.testing import CliRunner

import ckptavg
from ckptavg.bn import BatchNormOptions
from ckptavg.cli.app import app

MODEL = f"{FIXTURES / 'model.py'}:build"
LOADER = f"{FIXTURES / 'model.py'}:bn_loader"
BN_KEYS = ("running_mean", "running_var", "num_batches_tracked")


def _reference(weights: dict[str, torch.Tensor], batches: list) -> dict[str, torch.Tensor]:  # type: ignore[type-arg]
    model = load_model_module().build()
    model.load_state_dict(weights)
    update_bn(batches, model)
    return model.state_dict()


def _check(got: dict[str, torch.Tensor], plain: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> None:
    assert got.keys() == ref.keys()
    for k in ref:
        if k.rsplit(".", 1)[-1] in BN_KEYS:
            torch.testing.assert_close(got[k], ref[k], rtol=1e-6, atol=1e-7)
            assert got[k].dtype == ref[k].dtype
        else:
            assert torch.equal(got[k], plain[k]), f"{k} must stay as averaged"


def test_swa_with_bn_equals_update_bn(tmp_path: Path) -> None:
    plain, with_bn = tmp_path / "plain.safetensors", tmp_path / "bn.safetensors"
    sel = ckptavg.Selection(last=3)
    ckptavg.average_checkpoints(str(RUNS / "plain"), plain, select=sel)
    ckptavg.average_checkpoints(str(RUNS / "plain"), with_bn, select=sel, bn=BatchNormOptions(MODEL, LOADER))
    averaged = load_file(plain)
    ref = _reference(averaged, load_model_module().bn_loader())
    _check(load_file(with_bn), averaged, ref)
    assert load_file(with_bn)["bn1.num_batches_tracked"].item() == len(load_model_module().bn_loader())
    assert not torch.equal(load_file(with_bn)["bn1.running_var"], averaged["bn1.running_var"])


def test_bn_command_on_existing_weights_with_data_file_and_batch_limit(tmp_path: Path) -> None:
    weights = tmp_path / "w.safetensors"
    ckptavg.average_checkpoints(str(RUNS / "safetensors"), weights)
    images = load_model_module().load_digits()[0][:300]
    save_file({"inputs": images}, tmp_path / "inputs.safetensors")
    out = tmp_path / "out.safetensors"
    args = ["bn", str(weights), "-o", str(out), "--bn-model", MODEL, "--bn-data", str(tmp_path / "inputs.safetensors"),
            "--bn-batch-size", "64", "--bn-batches", "3"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    batches = [images[i:i + 64] for i in range(0, 300, 64)][:3]
    _check(load_file(out), load_file(weights), _reference(load_file(weights), batches))


def test_bn_forward_function_for_dict_batches(tmp_path: Path) -> None:
    helpers = tmp_path / "dictdata.py"
    helpers.write_text(
        "import importlib.util\n"
        f"spec = importlib.util.spec_from_file_location('m', {str(FIXTURES / 'model.py')!r})\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        "def loader():\n    return [{'image': x, 'label': y} for x, y in m.bn_loader()]\n"
        "def forward(model, batch):\n    return model(batch['image'])\n"
    )
    out = tmp_path / "out.safetensors"
    weights = tmp_path / "w.safetensors"
    ckptavg.average_checkpoints(str(RUNS / "plain"), weights)
    result = CliRunner().invoke(app, ["bn", str(weights), "-o", str(out), "--bn-model", MODEL,
                                      "--bn-data", f"{helpers}:loader", "--bn-forward", f"{helpers}:forward"])
    assert result.exit_code == 0, result.output
    _check(load_file(out), load_file(weights), _reference(load_file(weights), load_model_module().bn_loader()))


def _write_helpers(tmp_path: Path) -> Path:
    path = tmp_path / "bad.py"
    path.write_text(
        "import torch\n"
        "def no_bn():\n    return torch.nn.Sequential(torch.nn.Linear(2, 2))\n"
        "def other_arch():\n    return torch.nn.Sequential(torch.nn.BatchNorm1d(3))\n"
        "def not_module():\n    return 42\n"
        "def empty():\n    return []\n"
        "def broken():\n    raise RuntimeError('boom')\n"
    )
    return path


@pytest.mark.parametrize(
    "model, data, message",
    [
        ("nosuchmodule_abc:build", LOADER, "cannot import"),
        (f"{FIXTURES / 'model.py'}:nope", LOADER, "has no attribute 'nope'"),
        ("{bad}:other_arch", LOADER, "do not fit the model"),
        ("{bad}:not_module", LOADER, "not an nn.Module"),
        ("{bad}:broken", LOADER, "RuntimeError: boom"),
        (MODEL, "{bad}:empty", "yielded no batch"),
        (MODEL, "{bad}:broken", "RuntimeError: boom"),
        ("{lin}", LOADER, "no BatchNorm"),
    ],
)
def test_bn_errors_are_one_line(model: str, data: str, message: str, tmp_path: Path) -> None:
    bad = _write_helpers(tmp_path)
    inputs = str(RUNS / "plain")
    if model == "{lin}":  # weights that fit a model without BatchNorm
        save_file({"0.weight": torch.ones(2, 2), "0.bias": torch.zeros(2)}, tmp_path / "lin.safetensors")
        inputs, model = str(tmp_path / "lin.safetensors"), "{bad}:no_bn"
    out = tmp_path / "out.safetensors"
    args = ["swa", inputs, "-o", str(out), "--bn-model", model.format(bad=bad), "--bn-data", data.format(bad=bad)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and message in errors[0], result.output
    assert "Traceback" not in result.output and not out.exists()


def test_bn_options_must_come_together(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["swa", str(RUNS / "plain"), "-o", str(tmp_path / "o"), "--bn-data", LOADER])
    assert result.exit_code == 1 and "needs both --bn-model and --bn-data" in result.output


def test_user_file_is_executed_once(tmp_path: Path) -> None:
    """--bn-model and --bn-data naming one file import it once, not once per lookup."""
    counter = tmp_path / "runs.txt"
    helpers = tmp_path / "once.py"
    helpers.write_text(
        f"open({str(counter)!r}, 'a').write('x')\n"
        "import importlib.util\n"
        f"spec = importlib.util.spec_from_file_location('m', {str(FIXTURES / 'model.py')!r})\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        "build, bn_loader = m.build, m.bn_loader\n"
    )
    out = tmp_path / "out.safetensors"
    result = CliRunner().invoke(app, ["swa", str(RUNS / "plain"), "-o", str(out),
                                      "--bn-model", f"{helpers}:build", "--bn-data", f"{helpers}:bn_loader"])
    assert result.exit_code == 0, result.output
    assert counter.read_text() == "x"


def test_recalibrate_bn_verb_equals_update_bn(tmp_path: Path) -> None:
    """The library verb behind `ckptavg bn`: one weights file in, its BatchNorm statistics recomputed out."""
    weights, out = tmp_path / "w.safetensors", tmp_path / "out.safetensors"
    ckptavg.average_checkpoints(str(RUNS / "safetensors"), weights)
    result = ckptavg.recalibrate_bn(weights, out, BatchNormOptions(MODEL, LOADER))
    assert result.output == out and len(result.report.checkpoints) == 1
    _check(load_file(out), load_file(weights), _reference(load_file(weights), load_model_module().bn_loader()))
    with pytest.raises(ckptavg.BatchNormError, match="takes one weights file or checkpoint, not 6"):
        ckptavg.recalibrate_bn(RUNS / "safetensors", tmp_path / "x.safetensors", BatchNormOptions(MODEL, LOADER))
