"""Outputs the training libraries load back (issue 16): for each library of fixtures/real, the README's command is
run and its output is loaded with that library's own loader; the weights it loads must be the float64 mean of
the checkpoints' weights as the library itself loaded them (the expected/ files), rounded to their dtype.

Every test here needs its library (`-m interop`; skipped where it is not installed)."""

from __future__ import annotations

import glob
import re
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import Result

REAL = Path(__file__).resolve().parent.parent / "fixtures" / "real"
pytestmark = pytest.mark.interop


def _step(path: str) -> int:
    """The step of an expected file: the number in its `step`/`checkpoint` path component."""
    return next(int(m[1]) for part in reversed(Path(path).parts) if (m := re.search(r"(?:step|checkpoint)\D*(\d+)", part)))


def _mean(pattern: str) -> dict[str, torch.Tensor]:
    """The float64 mean of the expected files matching `pattern`, each tensor rounded to its stored dtype; an
    integer tensor (a step counter) is the newest checkpoint's, as ckptavg's numeric policy has it."""
    files = sorted(glob.glob(str(REAL / pattern)), key=_step)
    assert files, pattern
    states = [load_file(f) for f in files]
    return {k: (sum(s[k].double() for s in states) / len(states)).to(v.dtype) if v.is_floating_point() else states[-1][k]
            for k, v in states[0].items()}


def _same(loaded: Mapping[str, torch.Tensor], want: Mapping[str, torch.Tensor], tied: tuple[str, ...] = ()) -> None:
    """Every expected tensor is what the library loaded, bit for bit (a tied weight may be absent from `want`)."""
    assert set(want) <= set(loaded), sorted(set(want) - set(loaded))
    assert set(loaded) - set(want) <= set(tied), sorted(set(loaded) - set(want))
    for k, w in want.items():
        assert torch.equal(loaded[k].to(w.dtype), w), k


def _run(cli: Callable[..., Result], *args: object) -> None:
    r = cli(*args)
    assert r.exit_code == 0, r.output


def _make_real() -> object:
    """fixtures/real/make_real.py, for the tiny models its sections trained."""
    sys.path.insert(0, str(REAL))
    try:
        import make_real
    finally:
        sys.path.remove(str(REAL))
    return make_real


@pytest.mark.parametrize(("run", "cls"), [("bert-cls", "BertForSequenceClassification"), ("gpt2-tied", "GPT2LMHeadModel")])
def test_transformers_from_pretrained(cli: Callable[..., Result], tmp_path: Path, run: str, cls: str) -> None:
    transformers = pytest.importorskip("transformers")
    _run(cli, "swa", REAL / "transformers" / run, "-o", f"{tmp_path / 'avg'}/")
    model = getattr(transformers, cls).from_pretrained(tmp_path / "avg")
    _same(model.state_dict(), _mean(f"transformers/expected/{run}/checkpoint-*.safetensors"), tied=("lm_head.weight",))


@pytest.mark.parametrize("component", ["model", "model_1"])
def test_accelerate_load_checkpoint_in_model(cli: Callable[..., Result], tmp_path: Path, component: str) -> None:
    accelerate = pytest.importorskip("accelerate")
    make_real = _make_real()
    _run(cli, "swa", REAL / "accelerate/steps", "--component", component, "-o", tmp_path / "avg.safetensors")
    model = (make_real.tiny_encoder if component == "model" else make_real.tiny_head)()  # type: ignore[attr-defined]
    accelerate.load_checkpoint_in_model(model, str(tmp_path / "avg.safetensors"), strict=True)
    _same(model.state_dict(), _mean(f"accelerate/expected/steps/step_*/{component}.safetensors"))


@pytest.mark.parametrize(("key", "suffix"), [(None, ""), ("state_dict_ema", ".ema")])
def test_timm_load_checkpoint(cli: Callable[..., Result], tmp_path: Path, key: str | None, suffix: str) -> None:
    pytest.importorskip("timm")
    from timm.models import load_checkpoint
    from timm.models.resnet import BasicBlock, ResNet

    _run(cli, "swa", REAL / "timm/train", *(["--key", key] if key else []), "-o", tmp_path / "avg.safetensors")
    model = ResNet(BasicBlock, layers=(1, 1, 1, 1), channels=(4, 4, 8, 8), stem_width=4, stem_type="deep", num_classes=4)
    load_checkpoint(model, str(tmp_path / "avg.safetensors"), strict=True)
    _same(model.state_dict(), _mean(f"timm/expected/checkpoint-[0-9]{suffix}.safetensors"))


def test_ema_pytorch_loads_the_ema_weights(cli: Callable[..., Result], tmp_path: Path) -> None:
    pytest.importorskip("ema_pytorch")
    from ema_pytorch import EMA

    make_real = _make_real()
    _run(cli, "swa", REAL / "ema_pytorch/ema", "--key", "ema_model", "-o", tmp_path / "ema.safetensors")
    ema = EMA(make_real.tiny_encoder(), beta=0.9)  # type: ignore[attr-defined]
    ema.ema_model.load_state_dict(load_file(tmp_path / "ema.safetensors"), strict=True)
    _same(ema.ema_model.state_dict(), _mean("ema_pytorch/expected/ema/ema_step*[0-9].safetensors"))


@pytest.mark.parametrize("run", ["zero2", "zero3"])
def test_deepspeed_average_loads_like_zero_to_fp32(cli: Callable[..., Result], tmp_path: Path, run: str) -> None:
    """DeepSpeed's users load zero_to_fp32's fp32 state dict into the model; the average loads the same way."""
    pytest.importorskip("deepspeed")
    make_real = _make_real()
    _run(cli, "swa", REAL / "deepspeed" / run, "-o", tmp_path / "avg.safetensors")
    # the model the fixture trained (make_real._deepspeed_worker), in float32 as zero_to_fp32 rebuilds it
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8), torch.nn.ReLU(),
                                make_real.tiny_head())  # type: ignore[attr-defined]
    model.load_state_dict(load_file(tmp_path / "avg.safetensors"), strict=True)
    _same(model.state_dict(), _mean(f"deepspeed/expected/{run}/global_step[0-9].safetensors"))
