"""Discovery on the layouts the real training libraries write (fixtures/real): each checkpoint once, run folders,
steps from parent folders, fairseq names and counts, and what `plan` says it skipped."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import Result

import ckptavg
from ckptavg import CkptavgWarning, Selection, SelectionError
from ckptavg.read.metadata import meta_from_name

REAL = Path(__file__).resolve().parent.parent / "fixtures" / "real"
BERT, TIMM, LIGHTNING = REAL / "transformers" / "bert-cls", REAL / "timm" / "train", REAL / "lightning" / "checkpoints"


def mean64(files: list[Path]) -> dict[str, torch.Tensor]:
    states = [load_file(f) for f in files]
    return {k: sum((s[k].double() for s in states), torch.zeros(())) / len(states) for k in states[0]}


def assert_mean(out: Path, files: list[Path]) -> None:
    got, want, first = load_file(out), mean64(files), load_file(files[0])
    for k, v in want.items():
        if first[k].is_floating_point():  # integer buffers (num_batches_tracked) come from the newest
            torch.testing.assert_close(got[k].double(), v, rtol=1e-6, atol=1e-7)


def test_transformers_run_folder_means_its_checkpoints_not_the_final_model(cli: Callable[..., Result]) -> None:
    with pytest.warns(CkptavgWarning, match="left out 1 .*model.safetensors .*final model"):
        report = ckptavg.plan_checkpoints(BERT)
    assert [c.name for c in report.checkpoints] == ["checkpoint-3", "checkpoint-6", "checkpoint-9", "checkpoint-12"]
    assert report.skipped == [(BERT / "model.safetensors", report.skipped[0][1])]
    text = cli("plan", "swa", BERT)
    assert text.exit_code == 0 and "skipped 1:" in text.stdout and "bert-cls/model.safetensors: the final model" in text.stdout
    as_json = json.loads(cli("plan", "swa", BERT, "--json").stdout)
    assert [s["path"] for s in as_json["skipped"]] == [str(BERT / "model.safetensors")]
    assert "final model" in as_json["skipped"][0]["reason"]


def test_a_checkpoint_folder_without_numbered_children_is_one_checkpoint() -> None:
    report = ckptavg.plan_checkpoints(BERT / "checkpoint-3")
    assert [c.name for c in report.checkpoints] == ["checkpoint-3"] and report.skipped == []


def test_transformers_average_is_the_mean_of_the_checkpoints(tmp_path: Path) -> None:
    out = tmp_path / "avg.safetensors"
    with pytest.warns(CkptavgWarning, match="left out"):
        ckptavg.average(BERT, out)
    expected = REAL / "transformers" / "expected" / "bert-cls"
    assert_mean(out, [expected / f"checkpoint-{n}.safetensors" for n in (3, 6, 9, 12)])


def test_timm_counts_each_epoch_once(tmp_path: Path) -> None:
    out = tmp_path / "avg.safetensors"
    with pytest.warns(CkptavgWarning, match="last.pth.tar .*the same bytes as .*checkpoint-4.pth.tar"):
        result = ckptavg.average(TIMM, out)
    assert [c.meta.epoch for c in result.report.checkpoints] == [2, 3, 4]
    assert {p.name for p, _ in result.report.skipped} == {"last.pth.tar", "model_best.pth.tar"}
    assert_mean(out, [REAL / "timm" / "expected" / f"checkpoint-{e}.safetensors" for e in (2, 3, 4)])


def test_timm_hard_links_are_the_same_file(tmp_path: Path) -> None:
    """As timm made them: checkpoint-4, last and model_best are one inode (git stored copies)."""
    run = tmp_path / "train"
    run.mkdir()
    for name in ("checkpoint-2.pth.tar", "checkpoint-3.pth.tar", "last.pth.tar"):
        shutil.copy(TIMM / name, run / name)
    os.link(run / "last.pth.tar", run / "checkpoint-4.pth.tar")
    os.link(run / "last.pth.tar", run / "model_best.pth.tar")
    with pytest.warns(CkptavgWarning, match="the same file"):
        report = ckptavg.plan_checkpoints(run)
    assert [c.name for c in report.checkpoints] == ["checkpoint-2.pth.tar", "checkpoint-3.pth.tar", "checkpoint-4.pth.tar"]
    assert all("the same file" in why for _, why in report.skipped) and len(report.skipped) == 2


def test_symlinked_alias_is_the_same_file(tmp_path: Path) -> None:
    shutil.copy(LIGHTNING / "epoch=2-step=12.ckpt", tmp_path / "epoch=2-step=12.ckpt")
    shutil.copy(LIGHTNING / "epoch=3-step=16.ckpt", tmp_path / "epoch=3-step=16.ckpt")
    (tmp_path / "last.ckpt").symlink_to(tmp_path / "epoch=3-step=16.ckpt")
    with pytest.warns(CkptavgWarning, match="last.ckpt"):
        report = ckptavg.plan_checkpoints(tmp_path)
    assert [c.meta.step for c in report.checkpoints] == [12, 16]


def test_lightning_skips_last_ckpt() -> None:
    with pytest.warns(CkptavgWarning, match="last.ckpt"):
        report = ckptavg.plan_checkpoints(LIGHTNING)
    assert [c.meta.step for c in report.checkpoints] == [4, 8, 12, 16]
    assert [p.name for p, _ in report.skipped] == ["last.ckpt"]


def test_an_alias_with_no_twin_is_kept(tmp_path: Path) -> None:
    shutil.copy(LIGHTNING / "last.ckpt", tmp_path / "last.ckpt")
    report = ckptavg.plan_checkpoints(tmp_path)
    assert [c.name for c in report.checkpoints] == ["last.ckpt"] and report.skipped == []


def test_an_alias_at_the_step_of_a_numbered_checkpoint_is_skipped(tmp_path: Path) -> None:
    """Different bytes (another save of the same step), same step: the alias repeats the numbered file."""
    shutil.copy(LIGHTNING / "epoch=2-step=12.ckpt", tmp_path / "epoch=2-step=12.ckpt")
    shutil.copy(LIGHTNING / "epoch=3-step=16.ckpt", tmp_path / "epoch=3-step=16.ckpt")
    state = torch.load(LIGHTNING / "last.ckpt", weights_only=True)
    state["note"] = "saved again"
    torch.save(state, tmp_path / "last.ckpt")
    with pytest.warns(CkptavgWarning, match=r"an alias of .*epoch=3-step=16.ckpt \(the same step, 16\)"):
        report = ckptavg.plan_checkpoints(tmp_path)
    assert len(report.checkpoints) == 2


def test_best_never_picks_one_checkpoint_twice() -> None:
    with pytest.warns(CkptavgWarning, match="left out"):
        report = ckptavg.plan_checkpoints(TIMM, select=Selection(best=3, metric="metric", mode="max"))
    paths = [c.path for c in report.checkpoints]
    assert len(paths) == 3 and len({p.resolve() for p in paths}) == 3
    assert not any(p.name.startswith(("last", "model_best")) for p in paths)


def test_explicit_duplicates_are_kept_but_not_counted_twice(tmp_path: Path) -> None:
    a, b = TIMM / "checkpoint-4.pth.tar", TIMM / "last.pth.tar"
    with pytest.raises(SelectionError, match=r"checkpoint-4.pth.tar and .*last.pth.tar are one checkpoint"):
        ckptavg.plan_checkpoints([a, b])
    with pytest.raises(SelectionError, match="one checkpoint"):  # the newest two by name: checkpoint-4 and last
        ckptavg.plan_checkpoints([TIMM / "checkpoint-3.pth.tar", a, b], select=Selection(last=2, order="name"))
    report = ckptavg.plan_checkpoints([TIMM / "checkpoint-3.pth.tar", a, b], select=Selection(last=1, order="name"))
    assert [c.name for c in report.checkpoints] == ["last.pth.tar"] and report.skipped == []
    link = tmp_path / "link.pth.tar"
    link.symlink_to(a)
    with pytest.raises(SelectionError, match="one checkpoint"):
        ckptavg.plan_checkpoints([a, link])


def test_explicit_duplicate_selection_error_in_the_cli(cli: Callable[..., Result]) -> None:
    got = cli("plan", "swa", TIMM / "checkpoint-4.pth.tar", TIMM / "model_best.pth.tar")
    assert got.exit_code != 0 and "are one checkpoint" in got.output and "--last" in got.output


def test_two_distinct_checkpoints_at_one_step_are_an_error(tmp_path: Path) -> None:
    save_file({"w": torch.zeros(2)}, tmp_path / "run_a-step=5.safetensors")
    save_file({"w": torch.ones(2)}, tmp_path / "run_b-step=5.safetensors")
    with pytest.raises(SelectionError, match="two different checkpoints at step 5: two runs mixed"):
        ckptavg.plan_checkpoints(tmp_path)


def test_two_ema_profiles_at_one_step_are_an_error_for_swa() -> None:
    with pytest.raises(SelectionError, match="two EMA profiles"):
        ckptavg.plan_checkpoints(REAL / "ema_pytorch" / "post_hoc")
    report = ckptavg.plan_checkpoints(str(REAL / "ema_pytorch" / "post_hoc" / "0.*.pt"))
    assert [c.meta.step for c in report.checkpoints] == [4, 8, 12]


def test_steps_from_an_accelerate_step_folder(tmp_path: Path) -> None:
    for n, new in ((2, 2), (4, 10), (6, 9)):  # by name 10 < 2 < 9 (as text): only the folder step orders them
        shutil.copytree(REAL / "accelerate" / "steps" / f"step_{n}", tmp_path / f"step_{new}")
    report = ckptavg.plan_checkpoints(str(tmp_path / "step_*" / "model_1.safetensors"))
    assert report.order == "step" and [c.meta.step for c in report.checkpoints] == [2, 9, 10]
    assert report.checkpoints[0].meta.step_source == "folder name 'step_2' (1 level up)"


def test_steps_from_a_diffusers_checkpoint_folder(tmp_path: Path) -> None:
    src = REAL / "diffusers" / "unconditional"
    for n in (2, 4, 6):
        shutil.copytree(src / f"checkpoint-{n}" / "unet_ema", tmp_path / f"checkpoint-{n * 10 if n > 2 else n}" / "unet_ema")
    report = ckptavg.plan_checkpoints(str(tmp_path / "checkpoint-*" / "unet_ema" / "*.safetensors"))
    assert [c.meta.step for c in report.checkpoints] == [2, 40, 60]
    assert report.checkpoints[1].meta.step_source == "folder name 'checkpoint-40' (2 levels up)"


def test_steps_from_megatron_and_deepspeed_folder_names() -> None:
    from ckptavg.read.names import folder_count, meta_from_parents

    assert folder_count("iter_0000010") == ("step", 10) and folder_count("global_step6") == ("step", 6)
    assert meta_from_parents(Path("run/iter_0000010/mp_rank_00/model_optim_rng.pt")).step == 10
    assert meta_from_parents(Path("exp_steps100/data/a.pt")).step is None  # only whole checkpoint-folder names


def fairseq_state(epoch: int, updates: int, value: float) -> dict[str, object]:
    """The structure fairseq's checkpoint_utils.save_checkpoint writes (fairseq does not install here, so these
    are small torch files with the same entries): model, optimizer_history with num_updates, extra_state with
    the epoch iterator's state."""
    return {
        "model": {"w": torch.full((3,), value)},
        "optimizer_history": [{"criterion_name": "CrossEntropyCriterion", "optimizer_name": "FairseqAdam",
                               "lr_scheduler_state": {"best": 1.0}, "num_updates": updates}],
        "extra_state": {"train_iterator": {"epoch": epoch, "iterations_in_epoch": 0, "shuffle": True},
                        "val_loss": 1.0 / (epoch + 1)},
        "last_optimizer_state": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0]}]},
    }


def test_fairseq_names() -> None:
    m = meta_from_name("checkpoint_3_1200.pt")
    assert (m.epoch, m.step) == (3, 1200) and "fairseq" in (m.step_source or "")
    m = meta_from_name("checkpoint7.pt")
    assert (m.epoch, m.step) == (7, None)


def test_fairseq_run(tmp_path: Path) -> None:
    """checkpoint{E}.pt, checkpoint_{E}_{U}.pt, and checkpoint_last.pt (a copy) / checkpoint_best.pt (a save of
    the same update): the aliases are left out; the stored update count orders the run."""
    torch.save(fairseq_state(1, 10, 1.0), tmp_path / "checkpoint1.pt")
    torch.save(fairseq_state(2, 15, 2.0), tmp_path / "checkpoint_2_15.pt")
    torch.save(fairseq_state(2, 20, 3.0), tmp_path / "checkpoint2.pt")
    shutil.copy(tmp_path / "checkpoint2.pt", tmp_path / "checkpoint_last.pt")
    best = fairseq_state(1, 10, 1.0)
    best["extra_state"] = {"epoch": 1}  # older fairseq kept the epoch here
    torch.save(best, tmp_path / "checkpoint_best.pt")
    with pytest.warns(CkptavgWarning, match="left out 2"):
        report = ckptavg.plan_checkpoints(tmp_path)
    assert [c.name for c in report.checkpoints] == ["checkpoint1.pt", "checkpoint_2_15.pt", "checkpoint2.pt"]
    assert [c.meta.step for c in report.checkpoints] == [10, 15, 20] and report.order == "step"
    assert report.checkpoints[0].meta.step_source == "checkpoint ['optimizer_history'][-1]['num_updates'] (fairseq)"
    assert report.checkpoints[0].meta.epoch_source == "checkpoint ['extra_state']['train_iterator']['epoch'] (fairseq)"
    reasons = dict((p.name, why) for p, why in report.skipped)
    assert "the same bytes" in reasons["checkpoint_last.pt"] and "the same step, 10" in reasons["checkpoint_best.pt"]
    got = ckptavg.open_checkpoint(tmp_path / "checkpoint_best.pt").meta
    assert got.epoch == 1 and got.epoch_source == "checkpoint ['extra_state']['epoch'] (fairseq)"
