"""Issue 15, the model's weights inside one checkpoint: each real library's fixture (fixtures/real) read and
averaged by ckptavg equals the weights as the library's own loader returns them (the expected/ files)."""

from __future__ import annotations

import glob
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import Result

from ckptavg.errors import CheckpointFormatError
from ckptavg.read.checkpoint import LoadOptions
from ckptavg.read.layouts import open_checkpoint

REAL = Path(__file__).resolve().parent.parent / "fixtures" / "real"

# (id, checkpoint glob, LoadOptions fields and their flags, expected glob in the same order)
CASES = [
    ("accelerate-model", "accelerate/steps/step_*", {"component": "model"},
     "accelerate/expected/steps/step_*/model.safetensors"),
    ("accelerate-model_1", "accelerate/steps/step_*", {"component": "model_1"},
     "accelerate/expected/steps/step_*/model_1.safetensors"),
    ("diffusers-unet", "diffusers/unconditional/checkpoint-*", {"component": "unet"},
     "diffusers/expected/unconditional/checkpoint-*/unet.safetensors"),
    ("diffusers-unet_ema", "diffusers/unconditional/checkpoint-*", {"component": "unet_ema"},
     "diffusers/expected/unconditional/checkpoint-*/unet_ema.safetensors"),
    ("diffusers-plain", "diffusers/plain", {}, "diffusers/expected/plain.safetensors"),
    ("peft-lora-trainer", "peft/lora-trainer/checkpoint-*", {}, "peft/expected/lora-trainer/checkpoint-*.safetensors"),
    ("peft-rslora", "peft/rslora-manual/step_*", {}, "peft/expected/rslora-manual/step_*.safetensors"),
    ("ema-pytorch-ema", "ema_pytorch/ema/ema_step*.pt", {"key": "ema_model"},
     "ema_pytorch/expected/ema/ema_step*[0-9].safetensors"),
    ("ema-pytorch-online", "ema_pytorch/ema/ema_step*.pt", {"key": "online_model"},
     "ema_pytorch/expected/ema/ema_step*.online.safetensors"),
    ("timm", "timm/train/checkpoint-*.pth.tar", {}, "timm/expected/checkpoint-[0-9].safetensors"),
    ("timm-ema", "timm/train/checkpoint-*.pth.tar", {"key": "state_dict_ema"},
     "timm/expected/checkpoint-[0-9].ema.safetensors"),
    ("lightning", "lightning/checkpoints/epoch=*.ckpt", {}, "lightning/expected/epoch=*.safetensors"),
]


def _paths(pattern: str) -> list[Path]:
    def step(p: str) -> tuple[int, str]:
        digits = "".join(c if c.isdigit() else " " for c in Path(p).name.split(".")[0] + " " + Path(p).parent.name)
        nums = [int(d) for d in digits.split()]
        return (nums[0] if nums else -1), p
    return [Path(p) for p in sorted(glob.glob(str(REAL / pattern)), key=step)]


def _read(path: Path, options: LoadOptions) -> dict[str, torch.Tensor]:
    return {k: t.load() for k, t in open_checkpoint(path, options).tensors.items()}


def _flags(fields: dict[str, str]) -> list[str]:
    return [a for name, value in fields.items() for a in (f"--{name.replace('_', '-')}", value)]


@pytest.mark.parametrize(("case", "ckpts", "fields", "expected"), CASES, ids=[c[0] for c in CASES])
def test_reads_the_weights_the_library_loads(case: str, ckpts: str, fields: dict[str, str], expected: str) -> None:
    paths, wants = _paths(ckpts), _paths(expected)
    assert paths and len(paths) == len(wants), case
    for path, want_path in zip(paths, wants, strict=True):
        got, want = _read(path, LoadOptions(**fields)), load_file(want_path)  # type: ignore[arg-type]
        assert list(got) == list(want) or set(got) == set(want), path
        for k, w in want.items():
            assert got[k].dtype == w.dtype and got[k].shape == w.shape, (path, k)
            assert torch.equal(got[k], w), (path, k)


@pytest.mark.parametrize(("case", "ckpts", "fields", "expected"), CASES, ids=[c[0] for c in CASES])
def test_swa_is_the_float64_mean_of_the_expected(cli: Callable[..., Result], tmp_path: Path, case: str, ckpts: str,
                                                 fields: dict[str, str], expected: str) -> None:
    paths, wants = _paths(ckpts), [load_file(p) for p in _paths(expected)]
    out = tmp_path / "avg.safetensors"
    r = cli("swa", *paths, *_flags(fields), "-o", out, "-q")
    assert r.exit_code == 0, r.output
    got = load_file(out)
    assert set(got) == set(wants[0])
    for k, w in wants[0].items():
        if w.dtype.is_floating_point:
            mean = torch.stack([x[k].double() for x in wants]).mean(0).to(w.dtype)
            assert torch.equal(got[k], mean), (case, k)


@pytest.mark.parametrize(("path", "names"), [
    ("accelerate/steps/step_2", "model, model_1"),
    ("diffusers/unconditional/checkpoint-2", "unet, unet_ema"),
])
def test_several_models_need_component(cli: Callable[..., Result], path: str, names: str) -> None:
    r = cli("inspect", REAL / path)
    assert r.exit_code != 0 and len(r.output.strip().splitlines()) == 1
    assert f"({names})" in r.output and "--component" in r.output and path in r.output


def test_component_of_a_one_model_checkpoint_is_refused() -> None:
    with pytest.raises(CheckpointFormatError, match="holds one model"):
        open_checkpoint(REAL / "diffusers/plain", LoadOptions(component="unet_ema"))
    with pytest.raises(CheckpointFormatError, match="its models: model, model_1"):
        open_checkpoint(REAL / "accelerate/steps/step_2", LoadOptions(component="model_2"))


@pytest.mark.parametrize("name", [
    "accelerate/steps/step_2/optimizer.bin", "accelerate/steps/step_2/random_states_0.pkl",
    "accelerate/steps/step_2/scheduler.bin", "peft/lora-trainer/checkpoint-3/rng_state.pth",
    "peft/lora-trainer/checkpoint-3/training_args.bin", "peft/lora-trainer/checkpoint-3/optimizer.pt",
])
def test_training_state_is_refused_without_suggesting_trust_pickle(cli: Callable[..., Result], name: str) -> None:
    r = cli("inspect", REAL / name, "--trust-pickle")
    assert r.exit_code != 0 and len(r.output.strip().splitlines()) == 1
    assert "training state" in r.output and "trust-pickle" not in r.output and name in r.output


def test_training_state_in_a_folder_is_skipped(cli: Callable[..., Result]) -> None:
    r = cli("plan", "swa", REAL / "diffusers/unconditional", "--component", "unet_ema", "--json")
    assert "optimizer" not in r.output and "random_states" not in r.output


def test_ultralytics_without_trust_pickle_names_the_pickled_module(cli: Callable[..., Result]) -> None:
    path = REAL / "ultralytics/train/weights/epoch0.pt"
    r = cli("inspect", path)
    assert r.exit_code != 0 and len(r.output.strip().splitlines()) == 1
    assert str(path) in r.output and "Ultralytics" in r.output and "pickled module" in r.output
    assert "--trust-pickle" in r.output and "trust" in r.output


def _save_modules(path: Path) -> dict[str, torch.Tensor]:
    ema, model = torch.nn.Linear(3, 2).half(), torch.nn.Linear(3, 2).half()
    opt = torch.optim.Adam(model.parameters())
    model(torch.ones(1, 3).half()).sum().backward()
    opt.step()
    torch.save({"epoch": 1, "model": model, "ema": ema, "optimizer": opt.state_dict()}, path)
    return ema.state_dict()


def test_a_pickled_module_gives_its_state_dict_ema_first(tmp_path: Path) -> None:
    want = _save_modules(tmp_path / "yolo.pt")
    ckpt = open_checkpoint(tmp_path / "yolo.pt", LoadOptions(trust_pickle=True))
    assert ckpt.location.startswith("ema") and set(ckpt.tensors) == {"weight", "bias"}
    assert all(torch.equal(ckpt.tensors[k].load(), v) for k, v in want.items())
    assert ckpt.tensors["weight"].dtype == torch.float16  # kept as stored


@pytest.mark.interop
def test_ultralytics_with_trust_pickle_equals_its_loader() -> None:
    pytest.importorskip("ultralytics")
    for name in ("epoch0", "epoch1", "epoch2"):
        got = _read(REAL / f"ultralytics/train/weights/{name}.pt", LoadOptions(trust_pickle=True))
        want = load_file(REAL / f"ultralytics/expected/{name}.safetensors")
        assert set(got) == set(want)
        assert all(torch.equal(got[k].to(w.dtype), w) for k, w in want.items())


@pytest.mark.interop
def test_ultralytics_run_averages_each_epoch_once(cli: Callable[..., Result], tmp_path: Path) -> None:
    """The README's command on a real Ultralytics run: last.pt and best.pt (copies of epochs) left out, the
    epochs' ema modules averaged exactly."""
    pytest.importorskip("ultralytics")
    r = cli("swa", REAL / "ultralytics/train/weights", "--trust-pickle", "-o", tmp_path / "avg.safetensors")
    assert r.exit_code == 0, r.output
    assert "best.pt" in r.output and "last.pt" in r.output and "swa of 3 checkpoints" in r.output
    epochs = [load_file(REAL / f"ultralytics/expected/epoch{i}.safetensors") for i in range(3)]
    got = load_file(tmp_path / "avg.safetensors")
    assert set(got) == set(epochs[0])
    for k, g in got.items():
        assert torch.equal(g, (sum(e[k].double() for e in epochs) / 3).to(g.dtype)), k


def test_optimizer_state_is_never_weights(tmp_path: Path) -> None:
    w = torch.nn.Linear(2, 2)
    opt = torch.optim.Adam(w.parameters())
    w(torch.ones(1, 2)).sum().backward()
    opt.step()
    torch.save(opt.state_dict(), tmp_path / "opt_only.pt")
    with pytest.raises(CheckpointFormatError, match="optimizer's state"):
        open_checkpoint(tmp_path / "opt_only.pt")
    torch.save({"weights": w.state_dict(), "optim": opt.state_dict(), "scaler": {"scale": torch.ones(())}},
               tmp_path / "mixed.pt")
    assert set(open_checkpoint(tmp_path / "mixed.pt").tensors) == {"weights.weight", "weights.bias"}
    torch.save({"app": {"model": w.state_dict(), "optim": opt.state_dict()}}, tmp_path / "app.pt")
    ckpt = open_checkpoint(tmp_path / "app.pt")
    assert ckpt.location == "app.model" and set(ckpt.tensors) == {"weight", "bias"}


def test_zero_element_weights_are_refused_naming_the_layout(tmp_path: Path) -> None:
    torch.save({"module": {"a": torch.empty(0), "b": torch.empty(0)}}, tmp_path / "z.pt")
    with pytest.raises(CheckpointFormatError, match=r"torch-zip weights at 'module' are 2 tensors of 0 elements"):
        open_checkpoint(tmp_path / "z.pt")


def test_ema_pytorch_without_key_lists_both_models() -> None:
    with pytest.raises(CheckpointFormatError, match="ema_model.* and online_model") as e:
        open_checkpoint(REAL / "ema_pytorch/ema/ema_step4.pt")
    assert e.value.params == ("key",)


def test_strip_and_add_prefix() -> None:
    path = REAL / "lightning/checkpoints/epoch=0-step=4.ckpt"
    want = load_file(REAL / "lightning/expected/epoch=0-step=4.safetensors")
    got = open_checkpoint(path, LoadOptions(strip_prefix="net.", add_prefix="model.")).tensors
    assert set(got) == {"model." + k[len("net."):] for k in want}
    with pytest.raises(CheckpointFormatError, match="does not start with strip_prefix") as e:
        open_checkpoint(path, LoadOptions(strip_prefix="model."))
    assert e.value.params == ("strip_prefix",)


def test_a_prefix_only_mismatch_says_so(cli: Callable[..., Result], tmp_path: Path) -> None:
    a, b = REAL / "lightning/checkpoints/epoch=0-step=4.ckpt", REAL / "lightning/checkpoints/epoch=1-step=8.ckpt"
    r = cli("plan", "swa", a, b, "--strip-prefix", "net.")
    assert r.exit_code == 0, r.output
    from safetensors.torch import save_file
    save_file({"model." + k: v for k, v in load_file(REAL / "lightning/expected/epoch=1-step=8.safetensors").items()},
              tmp_path / "b.safetensors")
    r = cli("swa", a, tmp_path / "b.safetensors", "-o", tmp_path / "out.safetensors")
    assert r.exit_code != 0 and "only by the prefix 'model.'" in r.output and "--strip-prefix" in r.output


def test_timm_inspect_shows_the_ema_key(cli: Callable[..., Result]) -> None:
    r = cli("inspect", REAL / "timm/train/checkpoint-2.pth.tar")
    assert r.exit_code == 0 and "--key state_dict_ema" in r.output and "Warning" not in r.output


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")  # dcp.save in one process
def test_dcp_app_model_is_unwrapped(tmp_path: Path) -> None:
    import torch.distributed.checkpoint as dcp
    w = torch.nn.Linear(2, 2)
    opt = torch.optim.Adam(w.parameters())
    w(torch.ones(1, 2)).sum().backward()
    opt.step()
    dcp.save({"app": {"model": w.state_dict(), "optim": opt.state_dict()}}, checkpoint_id=str(tmp_path / "ck"))
    ckpt = open_checkpoint(tmp_path / "ck")
    assert ckpt.location == "app.model" and set(ckpt.tensors) == {"weight", "bias"}
