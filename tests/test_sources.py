"""Finding checkpoints, sniffing formats, locating weights, reading metadata."""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from refs import FORMATS, MANIFEST, RUNS, fixture_paths, reference_state_dict
from safetensors.torch import save_file

from ckptavg import CheckpointFormatError, LoadOptions, SelectionError, find_checkpoints, open_checkpoint
from ckptavg.read.metadata import meta_from_name
from ckptavg.read.safetensors_file import sniff

SNIFFED = {
    "plain": "torch-zip", "lightning": "torch-zip", "ddp": "torch-zip", "timm": "torch-zip",
    "legacy": "torch-legacy", "safetensors": "safetensors",
}


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_opens_with_the_right_tensors(fmt: str) -> None:
    for path in fixture_paths(fmt):
        ckpt = open_checkpoint(path)
        ref = reference_state_dict(fmt, path)
        names = {k.removeprefix("model.") for k in ckpt.tensors}
        assert names == set(ref), path
        for key, lazy in ckpt.tensors.items():
            assert torch.equal(lazy.load(), ref[key.removeprefix("model.")]), (path, key)
        if fmt in SNIFFED:
            assert ckpt.format == SNIFFED[fmt] and sniff(path) == SNIFFED[fmt]
        else:
            assert ckpt.format.startswith("hf-folder")


@pytest.mark.parametrize(
    "fmt, step_source, epoch_source",
    [
        ("lightning", "checkpoint 'global_step'", "checkpoint 'epoch'"),
        ("safetensors", "safetensors metadata 'step'", "safetensors metadata 'epoch'"),
        ("hf", "trainer_state.json 'global_step'", "trainer_state.json 'epoch'"),
        ("ddp", "file name", None),
        ("plain", None, "file name"),
        ("timm", None, "checkpoint 'epoch'"),
    ],
)
def test_metadata_and_its_source(fmt: str, step_source: str | None, epoch_source: str | None) -> None:
    for path, row in zip(fixture_paths(fmt), MANIFEST, strict=True):
        meta = open_checkpoint(path).meta
        assert meta.step_source == step_source and meta.epoch_source == epoch_source
        if step_source:
            assert meta.step == row["global_step"]
        if epoch_source:  # HF counts completed epochs (1-based), the others the epoch index
            assert meta.epoch == row["epoch"] + (1 if fmt == "hf" else 0)


@pytest.mark.parametrize(
    "name, folder, step, epoch",
    [
        ("step=1200.pt", False, 1200, None),
        ("global_step=7-epoch=2.ckpt", False, 7, 2),
        ("checkpoint-1200", True, 1200, None),
        ("checkpoint-3.pth.tar", False, None, None),  # timm counts epochs there, not steps
        ("epoch=3.ckpt", False, None, 3),
        ("model_ep3.pt", False, None, 3),
        ("iter_0001200.pt", False, 1200, None),
        ("timestep5.pt", False, None, None),
        ("deep.pt", False, None, None),
    ],
)
def test_meta_from_name(name: str, folder: bool, step: int | None, epoch: int | None) -> None:
    meta = meta_from_name(name, folder=folder)
    assert (meta.step, meta.epoch) == (step, epoch)


def test_directory_skips_non_checkpoints() -> None:
    found = find_checkpoints(str(RUNS / "lightning"))
    assert [p.suffix for p in found] == [".ckpt"] * len(MANIFEST)
    assert all(p.name != "train.log" for p in found)


def test_hf_folder_given_directly_is_one_checkpoint() -> None:
    folder = fixture_paths("hf-sharded")[0]
    assert find_checkpoints(str(folder)) == [folder]


def test_explicit_non_checkpoint_file_is_an_error() -> None:
    with pytest.raises(CheckpointFormatError, match="not a checkpoint"):
        find_checkpoints(str(RUNS / "lightning" / "train.log"))


def test_empty_directory_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(SelectionError, match="holds no checkpoint"):
        find_checkpoints(str(tmp_path))


def test_format_is_judged_by_bytes_not_extension(tmp_path: Path) -> None:
    save_file({"w": torch.ones(2)}, tmp_path / "weights.pt")
    torch.save({"w": torch.ones(2)}, tmp_path / "weights.safetensors")
    assert open_checkpoint(tmp_path / "weights.pt").format == "safetensors"
    assert open_checkpoint(tmp_path / "weights.safetensors").format == "torch-zip"


def _save(tmp_path: Path, obj: object, name: str = "c.pt") -> Path:
    path = tmp_path / name
    torch.save(obj, path)
    return path


@pytest.mark.parametrize("wrapper", ["state_dict", "model", "model_state_dict", "module", "net"])
def test_weights_found_under_usual_keys(wrapper: str, tmp_path: Path) -> None:
    path = _save(tmp_path, {wrapper: {"a.w": torch.ones(2)}, "epoch": 4, "optimizer": {"lr": torch.ones(1)}})
    ckpt = open_checkpoint(path)
    assert list(ckpt.tensors) == ["a.w"] and ckpt.location == wrapper and ckpt.meta.epoch == 4


def test_nested_dicts_flatten_and_explicit_key(tmp_path: Path) -> None:
    path = _save(tmp_path, {"model_ema": {"enc": {"w": torch.ones(2), "b": torch.zeros(2)}}, "misc": 3})
    ckpt = open_checkpoint(path, LoadOptions(key="model_ema"))
    assert list(ckpt.tensors) == ["enc.w", "enc.b"]
    nested = open_checkpoint(path, LoadOptions(key="model_ema.enc"))
    assert list(nested.tensors) == ["w", "b"]
    with pytest.raises(CheckpointFormatError, match="no entry 'state_dict_ema'.*model_ema"):
        open_checkpoint(path, LoadOptions(key="state_dict_ema"))


@pytest.mark.parametrize(
    "keys, stripped",
    [
        (["module.a", "module.b"], ""),  # keep_prefix variant checked below
        (["_orig_mod.a", "_orig_mod.b"], ""),
        (["module._orig_mod.a", "module._orig_mod.b"], ""),
        (["module.a", "b"], None),  # not every key has it: keep
    ],
)
def test_prefix_stripping(keys: list[str], stripped: str | None, tmp_path: Path) -> None:
    path = _save(tmp_path, OrderedDict((k, torch.ones(1)) for k in keys))
    got = list(open_checkpoint(path).tensors)
    assert got == (keys if stripped is None else ["a", "b"])
    assert list(open_checkpoint(path, LoadOptions(keep_prefix=True)).tensors) == keys


def test_non_contiguous_and_shared_storage_tensors(tmp_path: Path) -> None:
    base = torch.arange(12.0).reshape(3, 4)
    sd = {"t": base.t(), "view": base[1], "same": base}
    path = _save(tmp_path, sd)
    ckpt = open_checkpoint(path)
    for k, v in sd.items():
        assert torch.equal(ckpt.tensors[k].load(), v), k


def test_zero_dim_and_empty_tensors(tmp_path: Path) -> None:
    sd = {"scalar": torch.tensor(3.5), "empty": torch.zeros(0, 4), "n": torch.tensor(7)}
    path = _save(tmp_path, sd)
    ckpt = open_checkpoint(path)
    for k, v in sd.items():
        got = ckpt.tensors[k].load()
        assert got.shape == v.shape and torch.equal(got, v)


def test_namespace_args_load_safely(tmp_path: Path) -> None:
    import argparse

    path = _save(tmp_path, {"args": argparse.Namespace(lr=0.1), "model": {"w": torch.ones(1)}, "num_updates": 9})
    ckpt = open_checkpoint(path)
    assert ckpt.meta.step == 9 and ckpt.meta.step_source == "checkpoint 'num_updates'"


def test_sharded_index_naming_missing_shard(tmp_path: Path) -> None:
    folder = tmp_path / "checkpoint-5"
    folder.mkdir()
    save_file({"a": torch.ones(1)}, folder / "model-00001-of-00002.safetensors")
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointFormatError, match="model-00002-of-00002.safetensors.*missing"):
        open_checkpoint(folder)
