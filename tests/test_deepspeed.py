"""DeepSpeed tag folders as inputs: the fp32 weights rebuilt from the ZeRO partitions must be exactly what
DeepSpeed's own `zero_to_fp32` returns (fixtures/real/deepspeed/expected, written by DeepSpeed), read lazily
and without unpickling anything outside the allow-list.

References are zero_to_fp32's outputs (and, with -m interop where DeepSpeed is installed, zero_to_fp32 itself),
never ckptavg.
"""

from __future__ import annotations

import os
import pickle
import shutil
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from refs import ranged_bytes
from safetensors.torch import load_file

from ckptavg import CheckpointFormatError
from ckptavg.layout import check_layout
from ckptavg.read.checkpoint import LoadOptions
from ckptavg.read.deepspeed import (
    deepspeed_step,
    deepspeed_tag_of,
    deepspeed_tags,
    is_deepspeed_run,
    is_deepspeed_tag,
    open_deepspeed,
)
from ckptavg.read.deepspeed_zero import GatheredTensor
from ckptavg.reduce.tensor import reduce_tensor

ROOT = Path(__file__).resolve().parent.parent / "fixtures" / "real" / "deepspeed"
RUNS = ["zero1", "zero2", "zero3", "zero2-extras", "zero3-extras"]
TAGS = ["global_step2", "global_step4", "global_step6"]


def expected(run: str, tag: str, module: bool = False) -> dict[str, torch.Tensor]:
    return load_file(ROOT / "expected" / run / f"{tag}{'.module' if module else ''}.safetensors")


def assert_bits_equal(got: torch.Tensor, want: torch.Tensor, name: str) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape, name
    assert torch.equal(got.reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8)), name


def copy_run(run: str, tmp_path: Path) -> Path:
    dst = tmp_path / run
    shutil.copytree(ROOT / run, dst)
    return dst


def one_line_error(exc: pytest.ExceptionInfo[CheckpointFormatError]) -> str:
    text = str(exc.value)
    assert "\n" not in text
    return text


# ---------------------------------------------------------------- the weights, as zero_to_fp32 rebuilds them


@pytest.mark.parametrize("run", RUNS)
def test_each_tag_equals_zero_to_fp32(run: str) -> None:
    for tag in TAGS:
        ckpt = open_deepspeed(ROOT / run / tag, LoadOptions())
        want = expected(run, tag)
        assert set(ckpt.tensors) == set(want)
        for name, t in ckpt.tensors.items():
            assert (t.dtype, t.shape) == (want[name].dtype, tuple(want[name].shape)), name
            assert_bits_equal(t.load(), want[name], name)


@pytest.mark.parametrize("run", RUNS)
def test_mean_of_tags_equals_mean_of_zero_to_fp32(run: str) -> None:
    ckpts = [open_deepspeed(ROOT / run / tag, LoadOptions()) for tag in TAGS]
    wants = [expected(run, tag) for tag in TAGS]
    for spec in check_layout(ckpts):
        got = reduce_tensor(spec, ckpts, [1 / 3] * 3)
        # num_batches_tracked is not averaged: copied from the newest
        want = (sum(w[spec.name].double() for w in wants) / 3).to(spec.out_dtype) if spec.averaged else wants[-1][spec.name]
        assert_bits_equal(got, want, spec.name)


def test_extras_hold_buffers_frozen_and_tied_weights() -> None:
    """The extras fixtures exercise what zero_to_fp32 takes from outside the partitions."""
    for run in ("zero2-extras", "zero3-extras"):
        ckpt = open_deepspeed(ROOT / run / "global_step6", LoadOptions())
        assert ckpt.tensors["1.running_mean"].dtype == torch.float32
        assert ckpt.tensors["1.num_batches_tracked"].dtype == torch.int64
        assert ckpt.tensors["7.weight"] is ckpt.tensors["5.weight"]  # tied: one tensor, two names
        assert ckpt.tensors["0.weight"].shape == (15, 8)  # frozen, and of odd size in ZeRO-3 (padded)
        assert_bits_equal(ckpt.tensors["0.bias"].load(), expected(run, "global_step6")["0.bias"], "0.bias")


@pytest.mark.parametrize("run", RUNS)
def test_the_run_folder_averages_to_the_mean_of_zero_to_fp32(run: str, tmp_path: Path) -> None:
    """`ckptavg swa ds_out/ -o avg.safetensors`: the run folder means its tags (from `latest`'s folder)."""
    from typer.testing import CliRunner

    from ckptavg.cli.app import app

    out = tmp_path / "avg.safetensors"
    result = CliRunner().invoke(app, ["swa", str(ROOT / run), "-o", str(out)])
    assert result.exit_code == 0, result.output
    got, wants = load_file(out), [expected(run, tag) for tag in TAGS]
    assert set(got) == set(wants[0])
    for name, t in got.items():
        floating = wants[0][name].dtype.is_floating_point
        want = (sum(w[name].double() for w in wants) / 3).float() if floating else wants[-1][name]
        assert_bits_equal(t, want, name)


@pytest.mark.parametrize("run", ["zero1", "zero2"])
def test_key_module_gives_the_module_weights(run: str) -> None:
    for tag in TAGS:
        ckpt = open_deepspeed(ROOT / run / tag, LoadOptions(key="module"))
        want = expected(run, tag, module=True)
        assert set(ckpt.tensors) == set(want) and ckpt.location.startswith("module")
        for name, t in ckpt.tensors.items():
            assert_bits_equal(t.load(), want[name], name)


def test_metadata_step_and_format() -> None:
    for stage in (1, 2, 3):
        for tag in TAGS:
            ckpt = open_deepspeed(ROOT / f"zero{stage}" / tag, LoadOptions())
            assert ckpt.format == f"deepspeed (ZeRO-{stage})"
            assert ckpt.meta.step == int(tag.removeprefix("global_step")) == deepspeed_step(ROOT / f"zero{stage}" / tag)
            assert ckpt.meta.step_source == "tag name"
            assert ckpt.meta.lr is not None and ckpt.meta.lr > 0
            assert ckpt.location == "fp32 master partitions"
            assert ckpt.file_metadata == {"ds_version": "0.19.8"}
            assert "lr_scheduler" in ckpt.other_entries and "module" not in ckpt.other_entries
        assert is_deepspeed_run(ROOT / f"zero{stage}") and not is_deepspeed_tag(ROOT / f"zero{stage}")
        assert [p.name for p in deepspeed_tags(ROOT / f"zero{stage}")] == TAGS


def test_files_of_a_tag_point_at_the_tag() -> None:
    tag = ROOT / "zero3" / "global_step2"
    for f in tag.iterdir():
        assert deepspeed_tag_of(f) == tag
    assert deepspeed_tag_of(ROOT / "zero3" / "latest") is None
    assert deepspeed_tag_of(ROOT / "expected" / "zero3" / "global_step2.safetensors") is None


def test_step_from_global_steps_when_the_tag_has_another_name(tmp_path: Path) -> None:
    run = copy_run("zero2", tmp_path)
    (run / "global_step4").rename(run / "best")
    assert deepspeed_step(run / "best") == 4
    ckpt = open_deepspeed(run / "best", LoadOptions())
    assert ckpt.meta.step == 4 and "global_steps" in (ckpt.meta.step_source or "")


# ---------------------------------------------------------------- lazy: nothing read before load()


@pytest.fixture
def preads(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Bytes asked for by each os.preadv (every tensor read in ckptavg goes through it)."""
    seen: list[int] = []
    real = os.preadv

    def counting(fd: int, buffers: Any, offset: int) -> int:
        n = real(fd, buffers, offset)
        seen.append(n)
        return n

    monkeypatch.setattr(os, "preadv", counting)
    yield seen


@pytest.mark.parametrize("run", ["zero2", "zero3", "zero3-extras"])
def test_nothing_is_read_before_load_and_only_the_weights_after(run: str, preads: list[int]) -> None:
    ckpt = open_deepspeed(ROOT / run / "global_step2", LoadOptions())
    assert preads == []
    assert any(isinstance(t, GatheredTensor) for t in ckpt.tensors.values())
    unique = {id(t): t for t in ckpt.tensors.values()}.values()
    for t in unique:
        t.load()
    # exactly the weights' bytes: no Adam moments, no ZeRO-3 padding
    assert sum(preads) == sum(t.nbytes for t in unique)


@pytest.mark.parametrize("run", ["zero2", "zero3", "zero3-extras"])
def test_any_run_of_a_gathered_weight_reads_its_bytes(run: str) -> None:
    """Gathered weights are streamed block by block (bench/zero3.py: flat memory): the byte runs of every
    element range, read one after another, are the weight, across the ranks' piece boundaries."""
    ckpt = open_deepspeed(ROOT / run / "global_step2", LoadOptions())
    gathered = [t for t in ckpt.tensors.values() if isinstance(t, GatheredTensor)]
    assert gathered and all(t.streamable for t in gathered)
    for t in gathered:
        whole = t.load().reshape(-1).view(torch.uint8)
        for block in (1, 3, 7, max(1, t.numel // 2)):
            assert ranged_bytes(t, block) == whole.numpy().tobytes()


# ---------------------------------------------------------------- refusals


def test_missing_rank_partition_is_refused(tmp_path: Path) -> None:
    for stage in (2, 3):
        tag = copy_run(f"zero{stage}", tmp_path) / "global_step4"
        (tag / "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
        with pytest.raises(CheckpointFormatError) as e:
            open_deepspeed(tag, LoadOptions())
        text = one_line_error(e)
        assert str(tag) in text and f"ZeRO-{stage}" in text and "1 optimizer partition file(s) of the 2" in text
        assert "rank 1" in text and "copy the whole tag folder" in text


def test_truncated_optimizer_file_is_refused(tmp_path: Path) -> None:
    tag = copy_run("zero3", tmp_path) / "global_step2"
    victim = tag / "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    with pytest.raises(CheckpointFormatError) as e:
        open_deepspeed(tag, LoadOptions())
    text = one_line_error(e)
    assert str(victim) in text and "truncated" in text


def test_partition_shorter_than_its_pickle_is_refused_on_load(tmp_path: Path) -> None:
    """Bytes cut from inside a record (the archive's directory intact) are found when the weight is read."""
    tag = copy_run("zero2", tmp_path) / "global_step2"
    ckpt = open_deepspeed(tag, LoadOptions())
    gathered = next(t for t in ckpt.tensors.values() if isinstance(t, GatheredTensor))
    last = gathered.pieces[-1]
    with open(last.path, "r+b") as f:
        f.truncate(last.offset + last.nbytes // 2)
    with pytest.raises(CheckpointFormatError, match="truncated"):
        gathered.load()


class _Opener:
    """Unpickling this would open (create) a file: it must be refused before anything runs."""

    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.target, "w"))


def _replace_optim(tag: Path, rank: int, extra: Any) -> Path:
    """Rewrite one rank's optimizer file with `extra` added to its optimizer_state_dict."""
    path = tag / f"bf16_zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"
    state = {"optimizer_state_dict": {"zero_stage": 2, "partition_count": [2], "extra": extra}, "ds_version": "0.19.8"}
    torch.save(state, path)
    return path


def test_optimizer_file_with_a_class_outside_the_allow_list_is_refused(tmp_path: Path) -> None:
    tag = copy_run("zero2", tmp_path) / "global_step2"
    marker = tmp_path / "ran"
    path = _replace_optim(tag, 1, _Opener(str(marker)))
    with pytest.raises(CheckpointFormatError) as e:
        open_deepspeed(tag, LoadOptions())
    text = one_line_error(e)
    assert not marker.exists()
    assert str(path) in text and "'io.open'" in text
    assert "training state" in text and "--trust-pickle" not in text and "zero_to_fp32" in text


def fake_deepspeed_class(monkeypatch: pytest.MonkeyPatch, module: str, name: str) -> type:
    """A class that pickles as DeepSpeed's `module.name` (DeepSpeed itself is not needed to write the file)."""
    fake = types.ModuleType(module)
    cls = type(name, (), {"__module__": module, "__qualname__": name})
    setattr(fake, name, cls)
    parts = module.split(".")
    for i in range(1, len(parts)):
        monkeypatch.setitem(sys.modules, ".".join(parts[:i]), sys.modules.get(".".join(parts[:i])) or types.ModuleType(""))
    monkeypatch.setitem(sys.modules, module, fake)
    return cls


def test_deepspeed_class_outside_the_allow_list_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A real DeepSpeed name that the rebuild does not need (its config model) is refused by name too."""
    config = fake_deepspeed_class(monkeypatch, "deepspeed.runtime.zero.config", "DeepSpeedZeroConfig")
    tag = copy_run("zero2", tmp_path) / "global_step2"
    path = _replace_optim(tag, 0, config())
    with pytest.raises(CheckpointFormatError) as e:
        open_deepspeed(tag, LoadOptions())
    text = one_line_error(e)
    assert str(path) in text and "deepspeed.runtime.zero.config.DeepSpeedZeroConfig" in text and "training state" in text


def test_bad_zero_stage_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    enum = fake_deepspeed_class(monkeypatch, "deepspeed.runtime.zero.config", "ZeroStageEnum")
    stage = type("Stage", (), {"__reduce__": lambda self: (enum, (7,))})
    tag = copy_run("zero2", tmp_path) / "global_step2"
    _replace_optim(tag, 0, stage())
    with pytest.raises(CheckpointFormatError, match="unreadable DeepSpeed checkpoint file .*ZeRO stage 7"):
        open_deepspeed(tag, LoadOptions())


def test_model_states_with_a_class_outside_the_allow_list_suggest_trust_pickle(tmp_path: Path) -> None:
    tag = copy_run("zero2", tmp_path) / "global_step2"
    path = tag / "mp_rank_00_model_states.pt"
    states = torch.load(path, weights_only=True)
    states["client_state"] = _Opener(str(tmp_path / "ran"))
    torch.save(states, path)
    with pytest.raises(CheckpointFormatError) as e:
        open_deepspeed(tag, LoadOptions())
    text = one_line_error(e)
    assert str(path) in text and "'io.open'" in text and "--trust-pickle" in text
    assert not (tmp_path / "ran").exists()


def test_empty_latest_is_refused(tmp_path: Path) -> None:
    run = copy_run("zero3", tmp_path)
    (run / "latest").write_text("")
    with pytest.raises(CheckpointFormatError) as e:
        deepspeed_tags(run)
    text = one_line_error(e)
    assert str(run / "latest") in text and "empty" in text and "global_stepN/" in text


def test_latest_naming_a_missing_tag_is_refused(tmp_path: Path) -> None:
    run = copy_run("zero3", tmp_path)
    shutil.rmtree(run / "global_step6")
    with pytest.raises(CheckpointFormatError, match="names tag 'global_step6', which is not a DeepSpeed tag folder"):
        deepspeed_tags(run)


def test_zero3_placeholders_without_partitions_are_refused(tmp_path: Path) -> None:
    tag = copy_run("zero3", tmp_path) / "global_step2"
    for p in tag.glob("*_optim_states.pt"):
        p.unlink()
    for options in (LoadOptions(), LoadOptions(key="module")):
        with pytest.raises(CheckpointFormatError) as e:
            open_deepspeed(tag, options)
        text = one_line_error(e)
        assert str(tag / "zero_pp_rank_0_mp_rank_00_model_states.pt") in text
        assert "ZeRO-3" in text and "0-element placeholders" in text and "whole tag folder" in text


def test_zero2_model_states_without_partitions_point_at_key_module(tmp_path: Path) -> None:
    tag = copy_run("zero2", tmp_path) / "global_step2"
    for p in tag.glob("*_optim_states.pt"):
        p.unlink()
    with pytest.raises(CheckpointFormatError) as e:
        open_deepspeed(tag, LoadOptions())
    text = one_line_error(e)
    assert str(tag / "mp_rank_00_model_states.pt") in text and "ZeRO-2" in text and "--key module" in text
    assert set(open_deepspeed(tag, LoadOptions(key="module")).tensors) == set(expected("zero2", "global_step2", True))


def test_run_folder_is_not_a_tag() -> None:
    with pytest.raises(CheckpointFormatError, match="a DeepSpeed run folder, not one tag"):
        open_deepspeed(ROOT / "zero2", LoadOptions())


def test_missing_zero3_model_states_are_refused(tmp_path: Path) -> None:
    tag = copy_run("zero3-extras", tmp_path) / "global_step2"
    (tag / "zero_pp_rank_1_mp_rank_00_model_states.pt").unlink()
    with pytest.raises(CheckpointFormatError, match=r"without the model states of rank\(s\) 1"):
        open_deepspeed(tag, LoadOptions())
    (tag / "zero_pp_rank_0_mp_rank_00_model_states.pt").rename(tag / "zero_pp_rank_1_mp_rank_00_model_states.pt")
    with pytest.raises(CheckpointFormatError, match="without rank 0's model states"):
        open_deepspeed(tag, LoadOptions())


def test_pickle_in_the_allow_list_gives_inert_records() -> None:
    """The loss scaler comes back as a record of plain values, not DeepSpeed's class."""
    from ckptavg.read.deepspeed_pickle import Record, load_deepspeed_file

    obj = load_deepspeed_file(ROOT / "zero2" / "global_step2" / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt", True)
    scaler = obj["optimizer_state_dict"]["loss_scaler"]
    assert isinstance(scaler, Record) and scaler.__dict__ == {"cur_scale": 1.0, "dynamic": False}
    assert obj["optimizer_state_dict"]["zero_stage"] == 2
    with pytest.raises(pickle.UnpicklingError):
        scaler.__setstate__(["not", "a", "dict"])


# ---------------------------------------------------------------- DeepSpeed's own loader, where installed


@pytest.mark.interop
@pytest.mark.parametrize("run", RUNS)
def test_interop_equals_deepspeed_zero_to_fp32(run: str) -> None:
    pytest.importorskip("deepspeed")
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    for tag in TAGS:
        want = get_fp32_state_dict_from_zero_checkpoint(str(ROOT / run), tag=tag)
        ckpt = open_deepspeed(ROOT / run / tag, LoadOptions())
        assert list(ckpt.tensors) == list(want)  # zero_to_fp32's order too
        for name, t in ckpt.tensors.items():
            assert_bits_equal(t.load(), want[name], name)
