"""Megatron-LM checkpoints: torch_dist `iter_N/` folders written by megatron-core's own `dist_checkpointing.save`
(fixtures/real/megatron), read without --trust-pickle; and legacy `iter_N/mp_rank_XX/model_optim_rng.pt` files,
made here with torch.save in Megatron's layout (no Megatron needed).

References: `fixtures/real/megatron/expected/`, each iteration's state dict as megatron's own loader returned it,
and for legacy files the tensors that torch.save was given.
"""

from __future__ import annotations

import argparse
import io
import pickle
import random
import re
import shutil
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ckptavg import CheckpointFormatError, CkptavgWarning
from ckptavg.api import average
from ckptavg.read.checkpoint import LoadOptions
from ckptavg.read.dcp import extra_state_note, is_dcp_folder
from ckptavg.read.layouts import open_checkpoint
from ckptavg.read.megatron import (
    is_megatron_iteration,
    is_megatron_run,
    latest_iteration,
    megatron_iterations,
    megatron_step,
    open_megatron_folder,
)
from ckptavg.read.megatron_legacy import legacy_ranks, open_megatron_legacy

ROOT = Path(__file__).resolve().parent.parent / "fixtures" / "real" / "megatron"
RUN = ROOT / "checkpoints"
ITERS = ["iter_0000003", "iter_0000006", "iter_0000009"]
# Megatron stores the layer norms under the names of Transformer Engine's fused layers.
RENAMED = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "input_layernorm.bias": "self_attention.linear_qkv.layer_norm_bias",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
    "pre_mlp_layernorm.bias": "mlp.linear_fc1.layer_norm_bias",
}


def stored(expected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The loader's state dict in the names and shapes Megatron stores: the layers stacked on a first axis."""
    out: dict[str, torch.Tensor] = {}
    layers: dict[str, dict[int, torch.Tensor]] = {}
    for name, t in expected.items():
        if name.startswith("decoder.layers."):
            index, rest = name[len("decoder.layers."):].split(".", 1)
            layers.setdefault("decoder.layers." + RENAMED.get(rest, rest), {})[int(index)] = t
        else:
            out[name] = t
    for name, by_index in layers.items():
        out[name] = torch.stack([by_index[i] for i in range(len(by_index))])
    return out


def expected(name: str) -> dict[str, torch.Tensor]:
    return stored(load_file(ROOT / "expected" / f"{name}.safetensors"))


def assert_bits_equal(got: torch.Tensor, want: torch.Tensor, name: str) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape, name
    assert torch.equal(got.reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8)), name


def quiet(fn: Any, *args: Any) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CkptavgWarning)
        return fn(*args)


# ---------------------------------------------------------------- torch_dist


@pytest.mark.parametrize("name", ITERS)
def test_each_iteration_equals_megatrons_loader(name: str) -> None:
    """Without --trust-pickle, through the generic entry point (an iter_N folder is a DCP folder) and Megatron's."""
    want = expected(name)
    for ckpt in (quiet(open_checkpoint, RUN / name), quiet(open_megatron_folder, RUN / name)):
        assert set(ckpt.tensors) == set(want)
        for key, t in ckpt.tensors.items():
            assert_bits_equal(t.load(), want[key], key)
        assert ckpt.meta.step == int(name[5:])


def test_mean_of_the_iterations_equals_the_mean_of_the_loaders_state_dicts(tmp_path: Path) -> None:
    out = tmp_path / "avg.safetensors"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        average([RUN / n for n in ITERS], out)
    got, wants = load_file(out), [expected(n) for n in ITERS]
    assert set(got) == set(wants[0])
    for key, t in got.items():
        assert_bits_equal(t, (sum(w[key].double() for w in wants) / 3).float(), key)
    notes = [str(w.message) for w in caught if isinstance(w.message, CkptavgWarning)]
    assert sum("'_extra_state' entries" in n for n in notes) == 1, notes  # once per run, not per checkpoint
    assert "3 of 3 checkpoints" in notes[0] and "safetensors" not in notes[0]
    assert not any("_extra_state" in k for k in got)


def test_extra_state_is_noted_listed_and_never_averaged() -> None:
    ckpt = open_megatron_folder(RUN / ITERS[0])  # listed on the checkpoint; the run notes it once (extra_state_note)
    assert not any("_extra_state" in k for k in ckpt.tensors)
    assert len(ckpt.extra_state) == 4 and all("._extra_state/shard_" in n for n in ckpt.extra_state)
    assert any("_extra_state" in e for e in ckpt.other_entries)
    note = str(extra_state_note([ckpt, ckpt]))
    assert re.search(r"2 of 2 checkpoints hold '_extra_state' entries \(4 in .*not averaged.*copy them from the newest",
                     note), note
    assert any("common.pt" in e for e in ckpt.other_entries)


def test_run_folder_iterations_and_step() -> None:
    assert is_megatron_run(RUN) and not is_megatron_run(RUN / ITERS[0]) and not is_megatron_run(ROOT / "expected")
    assert megatron_iterations(RUN) == [RUN / n for n in ITERS]
    assert latest_iteration(RUN) == 9
    assert all(is_megatron_iteration(RUN / n) and is_dcp_folder(RUN / n) for n in ITERS)
    assert megatron_step(RUN / "iter_0000009") == 9
    assert megatron_step(Path("run/iter_0000020/mp_rank_01/model_optim_rng.pt")) == 20
    assert megatron_step(Path("run/release/mp_rank_00/model_optim_rng.pt")) is None


def test_tracker_file_that_is_not_an_iteration(tmp_path: Path) -> None:
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("release")
    assert latest_iteration(tmp_path) is None and not is_megatron_run(tmp_path)
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("nine")
    with pytest.raises(CheckpointFormatError, match="not an iteration"):
        latest_iteration(tmp_path)


class Planted:
    """Pickled into a copy's .metadata under a name outside the allow-list."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (print, ("ran",))


def test_a_class_outside_the_allow_list_is_refused_by_name(tmp_path: Path) -> None:
    folder = tmp_path / ITERS[0]
    shutil.copytree(RUN / ITERS[0], folder)
    md = pickle.loads((folder / ".metadata").read_bytes())  # the test's own fixture: trusted here
    md.all_local_plans = [Planted()]
    (folder / ".metadata").write_bytes(pickle.dumps(md))
    with pytest.raises(CheckpointFormatError) as exc:
        open_megatron_folder(folder)
    text = str(exc.value)
    assert "'builtins.print'" in text and "--trust-pickle" in text and "Megatron" in text


def test_another_sharded_backend_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / ITERS[0]
    shutil.copytree(RUN / ITERS[0], folder)
    (folder / "metadata.json").write_text('{"sharded_backend": "zarr", "sharded_backend_version": 1}')
    with pytest.raises(CheckpointFormatError, match="sharded backend 'zarr'"):
        open_megatron_folder(folder)


# ---------------------------------------------------------------- legacy model_optim_rng.pt


def legacy_model(seed: int) -> OrderedDict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    return OrderedDict([
        ("embedding.word_embeddings.weight", torch.randn(8, 4, generator=g)),
        ("decoder.layers.0.mlp.linear_fc1.weight", torch.randn(6, 4, generator=g)),
        ("decoder.layers.0.mlp.linear_fc1._extra_state", io.BytesIO(b"te fp8 state")),  # Transformer Engine's
        ("decoder.layers.0.mlp.linear_fc2._extra_state", None),
    ])


def make_legacy(run: Path, iterations: tuple[int, ...] = (10, 20), ranks: int = 2) -> dict[tuple[int, int], Any]:
    """What Megatron-LM's save_checkpoint writes for --ckpt-format torch, per iteration and tensor-parallel rank."""
    models = {}
    for it in iterations:
        for rank in range(ranks):
            folder = run / f"iter_{it:07d}" / f"mp_rank_{rank:02d}"
            folder.mkdir(parents=True)
            model = models[(it, rank)] = legacy_model(it * 10 + rank)
            torch.save({
                "args": argparse.Namespace(num_layers=1, params_dtype=torch.float32, save=str(run)),
                "checkpoint_version": 3.0,
                "iteration": it,
                "model": model,
                "optimizer": {"optimizer": {"state": {0: {"exp_avg": torch.ones(8, 4)}},
                                            "param_groups": [{"lr": 0.1, "params": [0]}]}},
                "opt_param_scheduler": {"max_lr": 0.1, "num_steps": it},
                "rng_state": [{"random_rng_state": random.getstate(), "np_rng_state": np.random.get_state(),
                               "torch_rng_state": torch.get_rng_state(), "rng_tracker_states": {}}],
                "num_floating_point_operations_so_far": 0,
            }, folder / "model_optim_rng.pt")
    (run / "latest_checkpointed_iteration.txt").write_text(str(iterations[-1]))
    return models


def test_legacy_file_gives_the_model_only_without_trust_pickle(tmp_path: Path) -> None:
    models = make_legacy(tmp_path)
    ckpt = open_megatron_legacy(tmp_path / "iter_0000020" / "mp_rank_01" / "model_optim_rng.pt")
    assert len(ckpt.extra_state) == 2, ckpt.extra_state  # noted once per run (extra_state_note)
    want = {k: v for k, v in models[(20, 1)].items() if isinstance(v, torch.Tensor)}
    assert ckpt.location == "model" and set(ckpt.tensors) == set(want)
    for key, t in ckpt.tensors.items():
        assert_bits_equal(t.load(), want[key], key)
    assert ckpt.meta.step == 20 and "iteration" in (ckpt.meta.step_source or "")
    assert "optimizer" in ckpt.other_entries and "rng_state" in ckpt.other_entries


def test_legacy_ranks_across_iterations(tmp_path: Path) -> None:
    make_legacy(tmp_path)
    assert is_megatron_run(tmp_path) and latest_iteration(tmp_path) == 20
    ranks = legacy_ranks(megatron_iterations(tmp_path))
    assert ranks == legacy_ranks([tmp_path])
    assert [r for r, _ in ranks] == ["mp_rank_00", "mp_rank_01"]
    for rank, files in ranks:
        assert files == [tmp_path / f"iter_{it:07d}" / rank / "model_optim_rng.pt" for it in (10, 20)]


def test_legacy_rank_by_rank_mean(tmp_path: Path) -> None:
    """What averaging rank by rank computes: each rank's mean over the iterations, from its own files."""
    models = make_legacy(tmp_path)
    for rank, files in legacy_ranks([tmp_path]):
        ckpts = [quiet(open_megatron_legacy, f) for f in files]
        r = int(rank[-2:])
        for key in ckpts[0].tensors:
            got = (sum(c.tensors[key].load().double() for c in ckpts) / 2).float()
            want = (models[(10, r)][key].double() + models[(20, r)][key].double()) / 2
            assert_bits_equal(got, want.float(), key)


def test_legacy_ranks_that_differ_between_iterations_are_refused(tmp_path: Path) -> None:
    make_legacy(tmp_path / "a", (10,), ranks=2)
    make_legacy(tmp_path / "b", (20,), ranks=1)
    with pytest.raises(CheckpointFormatError, match="different parallelism"):
        legacy_ranks([tmp_path / "a" / "iter_0000010", tmp_path / "b" / "iter_0000020"])


def test_legacy_file_with_another_class_is_refused_by_name(tmp_path: Path) -> None:
    path = tmp_path / "iter_0000001" / "mp_rank_00" / "model_optim_rng.pt"
    path.parent.mkdir(parents=True)
    torch.save({"model": {"w": torch.ones(2)}, "iteration": 1, "args": Planted()}, path)
    with pytest.raises(CheckpointFormatError) as exc:
        open_megatron_legacy(path)
    assert "__builtin__.print'" in str(exc.value) and "--trust-pickle" in str(exc.value)  # torch.save's protocol 2
    ckpt = open_megatron_legacy(path, LoadOptions(trust_pickle=True))  # the opt-in unpickles it (prints "ran")
    assert list(ckpt.tensors) == ["w"]


def test_legacy_virtual_pipeline_stages(tmp_path: Path) -> None:
    path = tmp_path / "iter_0000005" / "mp_rank_00" / "model_optim_rng.pt"
    path.parent.mkdir(parents=True)
    torch.save({"model0": {"a": torch.ones(2)}, "model1": {"a": torch.zeros(2)}, "iteration": 5}, path)
    ckpt = open_megatron_legacy(path)
    assert set(ckpt.tensors) == {"model0.a", "model1.a"} and ckpt.location == "model0, model1"
