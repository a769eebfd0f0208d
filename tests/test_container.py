"""`--container`: a copy of the newest input's training checkpoint with its weights replaced by the float64 mean.

Real checkpoints written by timm and Lightning (fixtures/real), a fairseq-shaped checkpoint and Megatron legacy
rank files made here. References are read with torch.load alone; every entry but the weights and the dropped
training state must come back equal to the newest input's (tensors bit for bit, with their strides and offsets).
"""

from __future__ import annotations

import argparse
import pickle
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner, Result

from ckptavg import CheckpointFormatError, CkptavgWarning, PlanError
from ckptavg.api import average
from ckptavg.cli.app import app
from ckptavg.methods.ema import Ema
from ckptavg.methods.soup import Soup
from ckptavg.read.checkpoint import LoadOptions
from ckptavg.read.container_tree import read_tree
from ckptavg.write.options import WriteOptions

ROOT = Path(__file__).resolve().parent.parent / "fixtures" / "real"
TIMM = sorted((ROOT / "timm" / "train").glob("checkpoint-*.pth.tar"))
LIGHTNING = sorted((ROOT / "lightning" / "checkpoints").glob("epoch=*.ckpt"))
CALLS: list[str] = []


def run(*args: object) -> Result:
    return CliRunner().invoke(app, [str(a) for a in args])


def error_line(result: Result) -> str:
    assert result.exit_code == 1, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    return lines[0]


def load(path: Path) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.load(path, map_location="cpu", weights_only=False)


def assert_same(a: Any, b: Any, where: str = "") -> None:
    """Deep equality: tensors bit for bit with dtype, shape, strides and offset; containers entry by entry and of
    the same type; anything else by its pickle."""
    assert type(a) is type(b), where
    if isinstance(a, torch.Tensor):
        assert (a.dtype, a.shape, a.stride(), a.storage_offset()) == (b.dtype, b.shape, b.stride(), b.storage_offset())
        assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
        assert_same(getattr(a, "_metadata", None), getattr(b, "_metadata", None), f"{where}._metadata")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, argparse.Namespace):
        assert_same(vars(a), vars(b), where)
    else:
        assert pickle.dumps(a) == pickle.dumps(b), where


def mean(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The float64 mean of floating tensors, cast back; other tensors from the newest."""
    return {k: (sum(s[k].double() for s in states) / len(states)).to(t.dtype) if t.is_floating_point() else t
            for k, t in states[-1].items()}


def check_copy(out: Path, newest: Path, weights: str, want: dict[str, torch.Tensor], dropped: set[str]) -> Any:
    """The copy holds `want` at `weights`, lacks `dropped`, and every other entry of `newest` unchanged."""
    got, src = load(out), load(newest)
    assert list(got) == [k for k in src if k not in dropped]
    assert list(got[weights]) == list(want) and type(got[weights]) is type(src[weights])
    for k, t in want.items():  # written contiguous, whatever the layout of the input's
        assert_same(got[weights][k], t.contiguous(), k)
    for k in got:
        if k != weights:
            assert_same(got[k], src[k], k)
    return got


# ---------------------------------------------------------------- timm


def test_timm_state_dict_is_the_mean_and_the_rest_is_kept(tmp_path: Path) -> None:
    out = tmp_path / "avg.pth.tar"
    average(TIMM, out, write=WriteOptions(container=True, verify=True))
    want = mean([load(p)["state_dict"] for p in TIMM])
    got = check_copy(out, TIMM[-1], "state_dict", want, {"optimizer"})
    assert "state_dict_ema" in got  # the other weight set: copied as it is, not averaged
    with torch.serialization.safe_globals([argparse.Namespace]):  # no pickled code needed
        assert torch.load(out, weights_only=True)["epoch"] == load(TIMM[-1])["epoch"]


def test_timm_ema_key_replaces_the_ema_copy(tmp_path: Path) -> None:
    out = tmp_path / "avg.pth.tar"
    average(TIMM, out, load=LoadOptions(key="state_dict_ema"), write=WriteOptions(container=True))
    check_copy(out, TIMM[-1], "state_dict_ema", mean([load(p)["state_dict_ema"] for p in TIMM]), {"optimizer"})


def test_keep_training_state_keeps_the_optimizer(tmp_path: Path) -> None:
    out = tmp_path / "avg.pth.tar"
    average(TIMM, out, write=WriteOptions(container=True, keep_training_state=True, verify=True))
    check_copy(out, TIMM[-1], "state_dict", mean([load(p)["state_dict"] for p in TIMM]), set())


@pytest.mark.interop
def test_timm_loads_the_copy(tmp_path: Path) -> None:
    timm = pytest.importorskip("timm")
    out = tmp_path / "avg.pth.tar"
    average(TIMM, out, write=WriteOptions(container=True))
    from timm.models.resnet import BasicBlock, ResNet

    def model() -> torch.nn.Module:  # as fixtures/real/make_real.py built it
        return ResNet(BasicBlock, layers=(1, 1, 1, 1), channels=(4, 4, 8, 8), stem_width=4, stem_type="deep",
                      num_classes=4)

    plain, ema = model(), model()
    epoch = timm.models.resume_checkpoint(plain, str(out))  # what train.py --resume does
    timm.models.load_checkpoint(ema, str(out), use_ema=True)
    assert epoch == load(TIMM[-1])["epoch"] + 1
    for k, t in mean([load(p)["state_dict"] for p in TIMM]).items():
        assert torch.equal(plain.state_dict()[k], t), k
    for k, t in load(TIMM[-1])["state_dict_ema"].items():  # the EMA copy is the newest's, not averaged
        assert torch.equal(ema.state_dict()[k], t), k


# ---------------------------------------------------------------- Lightning


def test_lightning_state_dict_is_the_mean_and_the_rest_is_kept(tmp_path: Path) -> None:
    out = tmp_path / "avg.ckpt"
    average(LIGHTNING, out, write=WriteOptions(container=True, verify=True))
    want = mean([load(p)["state_dict"] for p in LIGHTNING])
    got = check_copy(out, LIGHTNING[-1], "state_dict", want, {"optimizer_states", "lr_schedulers"})
    assert {"pytorch-lightning_version", "hyper_parameters", "loops", "callbacks", "epoch"} <= set(got)


@pytest.mark.interop
def test_lightning_load_from_checkpoint(tmp_path: Path) -> None:
    pytest.importorskip("pytorch_lightning")
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_real", ROOT / "make_real.py")
    assert spec and spec.loader
    make_real = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_real)
    out = tmp_path / "avg.ckpt"
    average(LIGHTNING, out, write=WriteOptions(container=True))
    model = make_real._lit_module_class().load_from_checkpoint(str(out), map_location="cpu")
    for k, t in mean([load(p)["state_dict"] for p in LIGHTNING]).items():
        assert torch.equal(model.state_dict()[k], t), k
    assert model.hparams.lr == load(LIGHTNING[-1])["hyper_parameters"]["lr"]


# ---------------------------------------------------------------- fairseq-shaped, made here


def fairseq(path: Path, n: int, seed: int) -> OrderedDict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    embed = torch.randn(6, 4, generator=g)
    model = OrderedDict([("module.encoder.embed_tokens.weight", embed), ("module.decoder.output_projection.weight", embed),
                         ("module.decoder.fc.weight", torch.randn(3, 4, generator=g).t()),  # not contiguous
                         ("module.decoder.version", torch.tensor([3.0]).half())])
    torch.save({
        "args": argparse.Namespace(arch="transformer", lr=[0.001], seed=1),
        "cfg": {"model": {"_name": "transformer"}, "optimization": {"max_update": 100}},
        "model": model,
        "optimizer_history": [{"criterion_name": "CrossEntropyCriterion", "optimizer_name": "Adam",
                               "lr_scheduler_state": {"best": 2.5}, "num_updates": n}],
        "extra_state": {"epoch": n // 10, "train_iterator": {"epoch": n // 10, "iterations_in_epoch": 3},
                        "val_loss": 2.5, "noise": torch.arange(5.0)[1:], "previous_ckpt": None},
        "last_optimizer_state": {"state": {0: {"exp_avg": torch.ones(6, 4)}}, "param_groups": [{"lr": 0.1}]},
    }, path)
    return model


def test_fairseq_model_is_the_mean_under_its_own_names(tmp_path: Path) -> None:
    paths = [tmp_path / f"checkpoint_{i}_{i * 10}.pt" for i in (1, 2, 3)]
    models = [fairseq(p, i * 10, i) for i, p in zip((1, 2, 3), paths, strict=True)]
    out = tmp_path / "out" / "avg.pt"
    out.parent.mkdir()
    average(paths, out, write=WriteOptions(container=True, verify=True))
    got = check_copy(out, paths[-1], "model", mean(models), {"last_optimizer_state"})
    assert got["model"]["module.decoder.fc.weight"].is_contiguous()  # the average is written contiguous
    assert got["extra_state"]["noise"].storage_offset() == 1  # a kept view keeps its offset into its storage


def test_strip_and_add_prefix_map_back_to_the_stored_names(tmp_path: Path) -> None:
    """The prefix options rename the weights for what reads them by name (here a soup's evaluate), and the copy
    still holds them under the checkpoint's own names."""
    paths = [tmp_path / f"checkpoint_{i}_{i * 10}.pt" for i in (1, 2)]
    models = [fairseq(p, i * 10, i) for i, p in zip((1, 2), paths, strict=True)]
    out = tmp_path / "avg.pt"
    seen: list[str] = []

    def score(state: dict[str, torch.Tensor]) -> float:
        seen.extend(state)
        return 1.0

    average(paths, out, Soup(evaluate=score, uniform=True),
            load=LoadOptions(keep_prefix=True, strip_prefix="module.", add_prefix="m."),
            write=WriteOptions(container=True, verify=True))
    assert seen and all(k.startswith("m.encoder.") or k.startswith("m.decoder.") for k in seen), seen
    check_copy(out, paths[-1], "model", mean(models), {"last_optimizer_state"})


@pytest.mark.parametrize("load_options", [{"keep_prefix": True}, {"add_prefix": "m."},
                                          {"strip_prefix": "module.", "keep_prefix": True}])
def test_a_prefix_option_that_changes_nothing_is_refused(tmp_path: Path, load_options: dict[str, Any]) -> None:
    paths = [tmp_path / f"checkpoint_{i}_{i * 10}.pt" for i in (1, 2)]
    for i, p in zip((1, 2), paths, strict=True):
        fairseq(p, i * 10, i)
    with pytest.raises(PlanError, match="keeps the checkpoint's own tensor names") as exc:
        average(paths, tmp_path / "avg.pt", load=LoadOptions(**load_options), write=WriteOptions(container=True))
    assert exc.value.params[0] == "container" and set(load_options) <= set(exc.value.params)
    assert not (tmp_path / "avg.pt").exists()


@pytest.mark.parametrize(("inputs", "flags", "flag"), [
    (TIMM, ["--add-prefix", "module."], "--add-prefix"),
    (LIGHTNING, ["--strip-prefix", "net."], "--strip-prefix"),
    (LIGHTNING, ["--keep-prefix"], "--keep-prefix"),
])
def test_cli_prefix_options_with_container_are_one_error_line(tmp_path: Path, inputs: list[Path], flags: list[str],
                                                                 flag: str) -> None:
    """They were ignored: the copy was byte for byte the one written without them."""
    line = error_line(run("swa", *inputs, "--container", *flags, "-o", tmp_path / "avg.pt"))
    assert line.startswith("Error: --container keeps the checkpoint's own tensor names") and f"leave out {flag}" in line
    assert not any(tmp_path.iterdir())


# ---------------------------------------------------------------- Megatron legacy rank files


def test_megatron_rank_file_model_replaced_extra_state_kept(tmp_path: Path) -> None:
    from test_megatron import make_legacy

    models = make_legacy(tmp_path / "run")
    files = [tmp_path / "run" / f"iter_{it:07d}" / "mp_rank_01" / "model_optim_rng.pt" for it in (10, 20)]
    out = tmp_path / "avg.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CkptavgWarning)
        average(files, out, write=WriteOptions(container=True, verify=True))
    want = mean([{k: v for k, v in models[(it, 1)].items() if isinstance(v, torch.Tensor)} for it in (10, 20)])
    got, src = load(out), load(files[-1])
    assert list(got) == [k for k in src if k not in ("optimizer", "opt_param_scheduler", "rng_state")]
    for k, v in got["model"].items():
        assert_same(v, want[k] if k in want else src["model"][k], k)  # _extra_state: BytesIO and None, copied
    for k in ("args", "checkpoint_version", "iteration", "num_floating_point_operations_so_far"):
        assert_same(got[k], src[k], k)


def test_megatron_keep_state_keeps_numpy_rng_state(tmp_path: Path) -> None:
    from test_megatron import make_legacy

    make_legacy(tmp_path / "run")
    files = [tmp_path / "run" / f"iter_{it:07d}" / "mp_rank_00" / "model_optim_rng.pt" for it in (10, 20)]
    out = tmp_path / "avg.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CkptavgWarning)
        average(files, out, write=WriteOptions(container=True, keep_training_state=True, verify=True))
    got, src = load(out), load(files[-1])
    assert list(got) == list(src)
    for k in ("optimizer", "opt_param_scheduler", "args"):
        assert_same(got[k], src[k], k)
    assert pickle.dumps(got["rng_state"][0]["np_rng_state"]) == pickle.dumps(src["rng_state"][0]["np_rng_state"])


# ---------------------------------------------------------------- safety


def record(text: str) -> str:
    CALLS.append(text)
    return text


class Planted:
    """Pickled as a call of `record`: loading it with torch.load(weights_only=False) runs that call."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (record, ("ran",))


def planted_run(tmp_path: Path) -> list[Path]:
    paths = []
    for i in (1, 2):
        paths.append(tmp_path / f"ckpt_{i}.pt")
        torch.save({"state_dict": {"w": torch.full((2,), float(i))}, "epoch": i, "hook": Planted()}, paths[-1])
    return paths


def test_a_class_outside_the_allow_list_is_refused_by_name(tmp_path: Path) -> None:
    paths = planted_run(tmp_path)
    with pytest.raises(CheckpointFormatError) as exc:
        average(paths, tmp_path / "avg.pt", load=LoadOptions(trust_pickle=False), write=WriteOptions(container=True))
    assert "test_container.record" in str(exc.value) and "--trust-pickle" in str(exc.value)
    assert not (tmp_path / "avg.pt").exists()


def test_with_trust_it_is_carried_through(tmp_path: Path) -> None:
    paths = planted_run(tmp_path)
    CALLS.clear()
    average(paths, tmp_path / "avg.pt", load=LoadOptions(trust_pickle=True), write=WriteOptions(container=True))
    assert CALLS == ["ran", "ran"]  # the trusted reader unpickled each input; writing the copy ran nothing
    got = load(tmp_path / "avg.pt")
    assert got["hook"] == "ran" and torch.equal(got["state_dict"]["w"], torch.full((2,), 1.5))


# ---------------------------------------------------------------- refusals


@pytest.mark.parametrize(("extra", "words"), [
    (["-o", "{tmp}/dir/"], "not a folder"),
    (["-o", "{tmp}/avg.safetensors"], "not safetensors"),
    (["-o", "{tmp}/avg.pt", "--max-shard-size", "1MB"], "--max-shard-size"),
    (["-o", "{tmp}/avg.pt", "--format", "safetensors"], "--format"),
    (["-o", "{tmp}/avg.pt", "--window", "2"], "output rows"),
])
def test_cli_refusals_are_one_error_line(tmp_path: Path, extra: list[str], words: str) -> None:
    args = [a.replace("{tmp}", str(tmp_path)) for a in extra]
    line = error_line(run("swa", *TIMM, "--container", *args))
    assert words in line and "--container" in line, line
    assert not any(tmp_path.iterdir())


def test_cli_legacy_torch_and_safetensors_inputs_are_refused_by_kind(tmp_path: Path) -> None:
    """Both used to be "broken zip archive ...; the file may be truncated": the newest input's kind is checked
    first. Both still average to weights without container."""
    legacy = [tmp_path / f"checkpoint-{i}.pth" for i in (1, 2)]
    safe = [tmp_path / f"step{i}.safetensors" for i in (1, 2)]
    for i, (lp, sp) in enumerate(zip(legacy, safe, strict=True)):
        torch.save({"model": {"w": torch.full((3,), float(i))}, "epoch": i}, lp, _use_new_zipfile_serialization=False)
        save_file({"w": torch.full((3,), float(i))}, sp)
    out = tmp_path / "out"
    out.mkdir()
    result = run("swa", *legacy, "--container", "-o", out / "x.pt")  # after the note that legacy files are read whole
    assert result.exit_code == 1 and [x for x in result.stderr.splitlines() if x.startswith("Error")] == [(
f"Error: {legacy[-1]}: a legacy (non-zip) torch file; --container copies a torch zip archive: "
                    "re-save it with a current torch.save, or leave out --container.")]
    line = error_line(run("swa", *safe, "--container", "-o", out / "x.pt"))
    assert line == (f"Error: {safe[-1]}: a safetensors file holds weights alone, no training checkpoint to copy; "
                    "leave out --container.")
    assert not any(out.iterdir())
    with pytest.raises(CheckpointFormatError, match="legacy"):
        read_tree(legacy[-1], trust=False)
    for inputs in (legacy, safe):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CkptavgWarning)
            average(inputs, out / "w.pt", write=WriteOptions(force=True))
        assert torch.equal(load(out / "w.pt")["w"], torch.full((3,), 0.5))


def test_format_dcp_with_container_is_refused() -> None:
    with pytest.raises(PlanError, match="not dcp; give format torch") as exc:
        WriteOptions(container=True, format="dcp")
    assert exc.value.params == ("container", "format")


def test_cli_keep_state_needs_container(tmp_path: Path) -> None:
    line = error_line(run("swa", *TIMM, "-o", tmp_path / "avg.pt", "--keep-state"))
    assert "--container" in line and "--keep-state" in line


def test_cli_sweep_refused(tmp_path: Path) -> None:
    line = error_line(run("ema", *TIMM, "--decay", "0.5,0.9", "--container", "-o", tmp_path / "e-{decay}.pt"))
    assert "output rows" in line


def test_cli_folder_input_refused(tmp_path: Path) -> None:
    line = error_line(run("swa", *sorted((ROOT / "transformers" / "bert-cls").glob("checkpoint-*")), "--container",
                          "-o", tmp_path / "avg.pt"))
    assert "folder" in line and "--container" in line


def test_library_names_the_parameters(tmp_path: Path) -> None:
    with pytest.raises(PlanError) as exc:
        average(TIMM, tmp_path / "avg.pt", write=WriteOptions(keep_training_state=True))
    assert exc.value.params == ("keep_training_state", "container")


def test_cli_writes_the_container(tmp_path: Path) -> None:
    result = run("ema", *LIGHTNING, "--decay", "0.5", "--container", "--verify", "-o", tmp_path / "avg.ckpt")
    assert result.exit_code == 0, result.output
    got = load(tmp_path / "avg.ckpt")
    assert "optimizer_states" not in got and got["epoch"] == load(LIGHTNING[-1])["epoch"]
    assert isinstance(Ema(decay=0.5), Ema)


# ---------------------------------------------------------------- pickled modules (Ultralytics), with --trust-pickle


class Scaled(torch.nn.Module):
    """A module with a buffer that state_dict() leaves out (persistent=False)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(3, 2)
        self.register_buffer("cache", torch.arange(4.0), persistent=False)


def module_run(tmp_path: Path) -> tuple[list[Path], list[dict[str, torch.Tensor]]]:
    paths, states = [], []
    for i in (1, 2, 3):
        torch.manual_seed(i)
        net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3), Scaled()).half()
        for p in net.parameters():
            p.requires_grad_(False)  # as Ultralytics saves its EMA
        net.cache = torch.full((2,), float(i))  # type: ignore[assignment]  # a plain attribute: kept, not a weight
        paths.append(tmp_path / f"epoch{i}.pt")
        torch.save({"epoch": i, "model": None, "ema": net, "optimizer": {"state": {}, "param_groups": []},
                    "train_args": {"imgsz": 32}}, paths[-1])
        states.append(net.state_dict())
    return paths, states


def test_pickled_module_needs_trust(tmp_path: Path) -> None:
    paths, _ = module_run(tmp_path)
    with pytest.raises(CheckpointFormatError, match="--trust-pickle"):
        average(paths, tmp_path / "avg.pt", write=WriteOptions(container=True))


def test_pickled_module_gets_the_mean_in_its_dtype(tmp_path: Path) -> None:
    paths, states = module_run(tmp_path)
    out = tmp_path / "avg.pt"
    average(paths, out, load=LoadOptions(trust_pickle=True), write=WriteOptions(container=True, verify=True))
    got, src = load(out), load(paths[-1])
    assert list(got) == ["epoch", "model", "ema", "train_args"]
    for k, t in mean(states).items():
        assert_same(got["ema"].state_dict()[k], t, k)
    assert not any(p.requires_grad for p in got["ema"].parameters())
    assert_same(got["ema"][2].cache, src["ema"][2].cache)  # the buffer state_dict() leaves out: the newest's
    assert_same(got["ema"].cache, src["ema"].cache)
    assert_same(got["train_args"], src["train_args"])


@pytest.mark.interop
def test_ultralytics_loads_the_copy(tmp_path: Path) -> None:
    ultralytics = pytest.importorskip("ultralytics")
    weights = ROOT / "ultralytics" / "train" / "weights"
    paths = [weights / f"epoch{i}.pt" for i in range(3)]
    out = tmp_path / "avg.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        average(paths, out, load=LoadOptions(trust_pickle=True), write=WriteOptions(container=True, verify=True))
    got, src = load(out), load(paths[-1])
    assert list(got) == [k for k in src if k not in ("optimizer", "scaler")]
    want = mean([load(p)["ema"].state_dict() for p in paths])
    for k, t in want.items():
        assert_same(got["ema"].state_dict()[k], t, k)
    for k in got:
        if k != "ema":
            assert_same(got[k], src[k], k)
    assert got["ema"].yaml == src["ema"].yaml and got["ema"].names == src["ema"].names
    model = ultralytics.YOLO(str(out)).model
    for k, t in want.items():
        assert torch.equal(model.state_dict()[k].to(t.dtype), t), k


# ---------------------------------------------------------------- Lightning's AttributeDict, determinism


class AttributeDict(dict):  # type: ignore[type-arg]
    """Pickled under the name of Lightning's own (a dict subclass): what hyper_parameters holds."""


AttributeDict.__module__ = "lightning.fabric.utilities.data"


def test_attribute_dict_hyper_parameters_round_trip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys
    import types

    fake = types.ModuleType("lightning.fabric.utilities.data")
    fake.AttributeDict = AttributeDict  # type: ignore[attr-defined]
    for name in ("lightning", "lightning.fabric", "lightning.fabric.utilities"):
        monkeypatch.setitem(sys.modules, name, sys.modules.get(name, types.ModuleType(name)))
    monkeypatch.setitem(sys.modules, "lightning.fabric.utilities.data", fake)
    paths, states = [], []
    for i in (1, 2):
        states.append({"model.w": torch.full((3,), float(i))})
        paths.append(tmp_path / f"epoch={i}-step={i * 4}.ckpt")
        torch.save({"epoch": i, "global_step": i * 4, "state_dict": states[-1],
                    "hyper_parameters": AttributeDict(lr=0.1, layers=[1, 2]), "optimizer_states": [{}]}, paths[-1])
    out = tmp_path / "avg.ckpt"
    average(paths, out, write=WriteOptions(container=True, verify=True))
    got = check_copy(out, paths[-1], "state_dict", mean(states), {"optimizer_states"})
    assert type(got["hyper_parameters"]) is AttributeDict and got["hyper_parameters"] == {"lr": 0.1, "layers": [1, 2]}


def test_the_same_inputs_give_the_same_bytes(tmp_path: Path) -> None:
    for name in ("a.pt", "b.pt"):
        average(TIMM, tmp_path / name, write=WriteOptions(container=True, keep_training_state=True))
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "b.pt").read_bytes()
