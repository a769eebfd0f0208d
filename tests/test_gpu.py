"""The CUDA path (--device cuda): same results as the CPU to float32 rounding. Marked `gpu`: these run only
where CUDA is present (on a lent GPU: `python -m pytest -m gpu`); elsewhere only the error path runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from refs import FIXTURES, RUNS, load_model_module
from safetensors.torch import load_file, save_file
from torch.optim.swa_utils import update_bn

import ckptavg
from ckptavg.bn import BatchNormOptions
from ckptavg.layout import check_layout
from ckptavg.read.layouts import open_checkpoint
from ckptavg.reduce.stream import stream_reduce

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs CUDA")


def _ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance in units in the last place between two float32 tensors."""
    ia, ib = a.float().view(torch.int32).long(), b.float().view(torch.int32).long()
    return int((ia - ib).abs().max()) if a.numel() else 0


@pytest.mark.skipif(CUDA, reason="checks the message shown without CUDA")
def test_cuda_request_without_cuda_is_one_error_line(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "avg.safetensors"
    r = cli("swa", RUNS / "plain", "-o", out, "--device", "cuda")
    assert r.exit_code == 1
    assert r.output.strip().splitlines() == [r.output.strip()]
    assert "CUDA is not available" in r.output and "--device cpu" in r.output
    assert not out.exists()


@pytest.mark.parametrize("fmt", ["plain", "safetensors", "hf-sharded"])
@pytest.mark.parametrize("accum", ["float64", "float32"])
@pytest.mark.gpu
@needs_cuda
def test_cuda_equals_cpu(fmt: str, accum: str, tmp_path: Path) -> None:
    cpu, gpu_out = tmp_path / "cpu.safetensors", tmp_path / "cuda.safetensors"
    ckptavg.average_checkpoints(str(RUNS / fmt), cpu, accum_dtype=accum)
    ckptavg.average_checkpoints(str(RUNS / fmt), gpu_out, accum_dtype=accum, device="cuda")
    a, b = load_file(cpu), load_file(gpu_out)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
        if a[k].is_floating_point():
            assert _ulps(a[k], b[k]) <= 1, k  # FMA on the GPU may round the last bit differently
        else:
            assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("block", [5, 1 << 12])
@pytest.mark.gpu
@needs_cuda
def test_cuda_blocks_and_mixed_dtypes(block: int, tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(1)
    paths = []
    for i in range(4):
        paths.append(tmp_path / f"c{i}.safetensors")
        save_file({"w": torch.randn(10_000, generator=g).to(torch.bfloat16 if i % 2 else torch.float32),
                   "n": torch.tensor(i)}, paths[-1])
    ckpts = [open_checkpoint(p) for p in paths]
    specs = check_layout(ckpts, torch.float32)
    got: dict[str, list[torch.Tensor]] = {}
    stream_reduce(specs, ckpts, lambda s: [0.25] * 4, lambda s, start, b: got.setdefault(s.name, []).append(b.clone()),
                  device="cuda", block_elems=block)
    want = sum(c.tensors["w"].load().double() for c in ckpts) / 4
    assert all(b.device.type == "cpu" for b in got["w"])
    assert _ulps(torch.cat(got["w"]), want.float()) <= 1
    assert got["n"][0].item() == 3


@pytest.mark.gpu
@needs_cuda
def test_bn_on_cuda_equals_update_bn(tmp_path: Path) -> None:
    plain, with_bn = tmp_path / "plain.safetensors", tmp_path / "bn.safetensors"
    sel = ckptavg.Selection(last=3)
    model_py = FIXTURES / "model.py"
    ckptavg.average_checkpoints(str(RUNS / "plain"), plain, select=sel)
    ckptavg.average_checkpoints(str(RUNS / "plain"), with_bn, select=sel, device="cuda",
                                bn=BatchNormOptions(f"{model_py}:build", f"{model_py}:bn_loader"))
    mod = load_model_module()
    model = mod.build()
    model.load_state_dict(load_file(plain))
    update_bn(mod.bn_loader(), model)
    got = load_file(with_bn)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-6)  # cuDNN's reductions round differently
