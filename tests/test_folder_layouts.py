"""Folder outputs in the input's own layout (issue 16): a diffusers component averages into a folder that
`UNet2DModel.from_pretrained` loads (weights named as diffusers names them, the component's config.json copied),
and training state (RNG, optimizer) is never copied beside them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from ckptavg.cli.app import app

REAL = Path(__file__).resolve().parent.parent / "fixtures" / "real" / "diffusers"


def _average(tmp_path: Path, *extra: str) -> Path:
    out = tmp_path / "avg"
    result = CliRunner().invoke(app, ["swa", str(REAL / "unconditional"), "--component", "unet_ema",
                                      "-o", f"{out}/", "-q", *extra])
    assert result.exit_code == 0, result.output
    return out


def _mean() -> dict[str, torch.Tensor]:
    wants = [load_file(p) for p in sorted((REAL / "expected" / "unconditional").glob("checkpoint-*/unet_ema.safetensors"))]
    return {k: (sum(w[k].double() for w in wants) / len(wants)).to(wants[0][k].dtype) for k in wants[0]}


def test_a_diffusers_component_keeps_its_layout(tmp_path: Path) -> None:
    out = _average(tmp_path)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    got, want = load_file(out / "diffusion_pytorch_model.safetensors"), _mean()
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-6)


def test_sharded_diffusers_folder_uses_diffusers_names(tmp_path: Path) -> None:
    out = _average(tmp_path, "--max-shard-size", "16KiB")
    names = sorted(p.name for p in out.iterdir())
    assert "diffusion_pytorch_model.safetensors.index.json" in names and "config.json" in names
    assert all(n.startswith("diffusion_pytorch_model") or n == "config.json" for n in names)


@pytest.mark.interop
def test_diffusers_loads_the_average(tmp_path: Path) -> None:
    diffusers = pytest.importorskip("diffusers")
    out = _average(tmp_path)
    model = diffusers.UNet2DModel.from_pretrained(out)
    state, want = model.state_dict(), _mean()
    for k in want:
        torch.testing.assert_close(state[k].to(want[k].dtype), want[k], rtol=0, atol=1e-6)


@pytest.mark.parametrize(("flags", "noted"), [([], False), (["--lora", "factors"], True)])
def test_a_peft_adapter_keeps_its_layout_and_the_approximation_is_said(tmp_path: Path, flags: list[str],
                                                                        noted: bool) -> None:
    """PEFT adapters average into adapter_model.safetensors + adapter_config.json (what PeftModel loads); the
    factor-by-factor average (--lora factors, not the default svd) says it is not the mean of the updates."""
    out = tmp_path / "adapter"
    result = CliRunner().invoke(app, ["swa", str(REAL.parent / "peft" / "lora-trainer"), *flags, "-o", f"{out}/"])
    assert result.exit_code == 0, result.output
    assert {"adapter_model.safetensors", "adapter_config.json"} <= {p.name for p in out.iterdir()}
    said = "averaged factor by factor" in result.stderr and "not the mean of their updates" in result.stderr
    assert said == noted


@pytest.mark.interop
def test_peft_loads_the_averaged_adapter(tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "adapter"
    assert CliRunner().invoke(app, ["swa", str(REAL.parent / "peft" / "lora-trainer"), "-o", f"{out}/"]).exit_code == 0
    base = transformers.AutoModelForSequenceClassification.from_pretrained(REAL.parent / "peft" / "lora-trainer-base")
    model = peft.PeftModel.from_pretrained(base, out)
    assert any("lora_A" in n for n, _ in model.named_parameters())
