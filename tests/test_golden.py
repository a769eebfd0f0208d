"""SWA against the reference: torch.optim.swa_utils.AveragedModel, on every fixture format."""

from __future__ import annotations

import pytest
import torch
from refs import FORMATS, fixture_paths, load_model_module, reference_state_dict
from safetensors.torch import load_file
from torch.optim.swa_utils import AveragedModel

import ckptavg


def _ulp32(x: torch.Tensor) -> torch.Tensor:
    return (torch.nextafter(x, torch.full_like(x, float("inf"))) - x).double()


@pytest.mark.parametrize("fmt", FORMATS)
def test_swa_matches_averaged_model(fmt: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    paths = fixture_paths(fmt)
    refs = [reference_state_dict(fmt, p) for p in paths]
    model = load_model_module().build()
    swa = AveragedModel(model, use_buffers=True)
    for sd in refs:
        model.load_state_dict(sd)
        swa.update_parameters(model)
    expected = swa.module.state_dict()

    out = tmp_path / "avg.safetensors"
    result = ckptavg.average_checkpoints(RUNS_ARG(fmt), out)
    got = load_file(out)
    prefix = "model." if fmt == "lightning" else ""  # Lightning keeps its module attribute name
    assert len(result.report.checkpoints) == len(paths)
    assert set(got) == {prefix + k for k in expected}
    for key, ref in expected.items():
        mine = got[prefix + key]
        assert mine.dtype == ref.dtype and mine.shape == ref.shape
        if ref.is_floating_point():
            torch.testing.assert_close(mine, ref, rtol=2e-6, atol=1e-7)
            # float64-exact: within one float32 ulp of the exact mean
            exact = torch.stack([sd[key].double() for sd in refs]).mean(0)
            assert ((mine.double() - exact).abs() <= _ulp32(mine)).all(), key
        else:
            assert torch.equal(mine, refs[-1][key]), "integer buffers come from the newest checkpoint"


def RUNS_ARG(fmt: str) -> str:  # noqa: N802 - reads like a constant at the call site
    from refs import RUNS

    return str(RUNS / fmt)


def test_formats_agree_with_each_other(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Every format holds the same training run, so every average is the same, bit for bit."""
    outs = {}
    for fmt in ("plain", "ddp", "safetensors", "hf", "hf-sharded", "legacy", "timm"):
        ckptavg.average_checkpoints(RUNS_ARG(fmt), tmp_path / f"{fmt}.safetensors")
        outs[fmt] = load_file(tmp_path / f"{fmt}.safetensors")
    first = outs.pop("plain")
    for fmt, sd in outs.items():
        assert sd.keys() == first.keys(), fmt
        for k in first:
            assert torch.equal(sd[k], first[k]), (fmt, k)


def test_averaged_model_is_better_than_its_members_on_fixtures(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Sanity on real weights: the last-3 average loads into the model and scores at least their mean."""
    mod = load_model_module()
    out = tmp_path / "avg.safetensors"
    ckptavg.average_checkpoints(RUNS_ARG("plain"), out, select=ckptavg.Selection(last=3))
    avg_acc = mod.accuracy(load_file(out))
    members = [mod.accuracy(reference_state_dict("plain", p)) for p in fixture_paths("plain")[-3:]]
    assert avg_acc >= sum(members) / len(members)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dtype_is_kept_and_rounded_once(dtype: torch.dtype, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(257, generator=gen).to(dtype) for _ in range(7)]
    for i, x in enumerate(xs):
        save_file({"w": x, "n": torch.tensor(i)}, tmp_path / f"step={i}.safetensors")
    out = tmp_path / "out" / "avg.safetensors"
    out.parent.mkdir()
    ckptavg.average_checkpoints(str(tmp_path), out)
    got = load_file(out)
    exact = torch.stack([x.double() for x in xs]).mean(0)
    assert got["w"].dtype == dtype
    if dtype == torch.float64:  # no wider accumulator exists: a few float64 ulps
        torch.testing.assert_close(got["w"], exact, rtol=1e-15, atol=1e-15)
    else:
        assert torch.equal(got["w"], exact.to(dtype)), "one rounding from the float64 mean"
    assert got["n"].item() == 6 and got["n"].dtype == torch.int64


def test_float32_accumulator_and_dtype_override(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from safetensors.torch import save_file

    xs = [torch.full((4,), 0.1 * (i + 1), dtype=torch.float32) for i in range(3)]
    for i, x in enumerate(xs):
        save_file({"w": x}, tmp_path / f"step={i}.safetensors")
    out = tmp_path / "o" / "a.safetensors"
    out.parent.mkdir()
    ckptavg.average_checkpoints(str(tmp_path), out, dtype="bfloat16", accum_dtype="float32")
    got = load_file(out)["w"]
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, torch.stack(xs).mean(0).to(torch.bfloat16))
