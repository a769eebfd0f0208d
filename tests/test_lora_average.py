"""Averaging real PEFT adapters end to end (--lora svd|concat|factors; docs/ALGORITHMS.md §13): each output's update
s'·B·A against a float64 dense reference built from the input files, the written adapter_config.json, the errors
reported by plan, the metadata, and the refusals."""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from typer.testing import Result

from ckptavg.api import average, plan_checkpoints
from ckptavg.errors import IncompatibleCheckpointsError, NonFiniteError, PlanError
from ckptavg.methods.base import Entry, Plan, TensorAccess, WeightMatrix, Weights
from ckptavg.methods.lora import LoraAverage, lora_pairs, scale

REPO = Path(__file__).resolve().parent.parent
PEFT = REPO / "fixtures" / "real" / "peft"
TRAINER = [PEFT / "lora-trainer" / f"checkpoint-{s}" for s in (3, 6, 9, 12)]
RSLORA = [PEFT / "rslora-manual" / f"step_{s}" for s in (3, 6, 9)]
Cli = Callable[..., Result]


def _adapters(folders: Sequence[Path]) -> list[dict[str, torch.Tensor]]:
    return [load_file(f / "adapter_model.safetensors") for f in folders]


def _config(folder: Path) -> dict[str, Any]:
    return dict(json.loads((folder / "adapter_config.json").read_text()))


def _s(config: dict[str, Any]) -> float:
    return scale(config["r"], config["lora_alpha"], config.get("use_rslora", False))


def _mean_updates(folders: Sequence[Path], weights: Sequence[float] | None = None) -> dict[str, torch.Tensor]:
    """Per layer, the float64 dense mean update s Σ w_k B_k A_k of the input files."""
    states, s = _adapters(folders), _s(_config(folders[-1]))
    w = weights or [1 / len(states)] * len(states)
    return {layer: sum((wk * s * (st[b].double() @ st[a].double()) for wk, st in zip(w, states, strict=True)),
                       torch.zeros(()))
            for layer, (a, b) in lora_pairs(states[0]).items()}


def _updates(out: Path) -> dict[str, torch.Tensor]:
    """Per layer, the update s'·B·A that the written adapter folder stands for (its own adapter_config.json)."""
    state, s = load_file(out / "adapter_model.safetensors"), _s(_config(out))
    return {layer: s * (state[b].double() @ state[a].double()) for layer, (a, b) in lora_pairs(state).items()}


def _best(m: torch.Tensor, rank: int) -> tuple[torch.Tensor, float]:
    """The dense float64 best rank-`rank` approximation of m, and its relative Frobenius error."""
    u, sv, vh = torch.linalg.svd(m, full_matrices=False)
    return (u[:, :rank] * sv[:rank]) @ vh[:rank], float(sv[rank:].norm() / sv.norm())


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x - ref).norm() / ref.norm())


def test_default_svd_is_the_best_rank_r_approximation(cli: Cli, tmp_path: Path) -> None:
    out = tmp_path / "svd"
    r = cli("swa", *TRAINER, "-o", f"{out}/", "-q")
    assert r.exit_code == 0, r.output
    got, means = _updates(out), _mean_updates(TRAINER)
    assert set(got) == set(means) and len(got) == 2
    for layer, m in means.items():
        best, err = _best(m, 4)
        assert err > 1e-3  # the mean of 4 rank-4 updates is not rank 4: the test can tell svd from concat
        assert _rel(got[layer], best) < 1e-6, layer
        assert _rel(got[layer], m) == pytest.approx(err, rel=1e-4)
    config = _config(out)
    assert (config["r"], config["lora_alpha"]) == (4, 8)
    # modules_to_save (the classifier) is the plain float64 mean, as before
    state, inputs = load_file(out / "adapter_model.safetensors"), _adapters(TRAINER)
    mean = torch.stack([x["base_model.model.classifier.weight"].double() for x in inputs]).mean(0).float()
    assert torch.equal(state["base_model.model.classifier.weight"], mean)


def test_concat_is_the_exact_mean_update(cli: Cli, tmp_path: Path) -> None:
    out = tmp_path / "concat"
    r = cli("swa", *TRAINER, "--lora", "concat", "-o", f"{out}/", "-q")
    assert r.exit_code == 0, r.output
    config = _config(out)
    assert (config["r"], config["lora_alpha"]) == (16, 32)
    state = load_file(out / "adapter_model.safetensors")
    assert state["base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight"].shape == (16, 16)
    assert state["base_model.model.bert.encoder.layer.0.attention.self.query.lora_B.weight"].shape == (16, 16)
    for layer, m in _mean_updates(TRAINER).items():
        assert _rel(_updates(out)[layer], m) < 1e-6, layer


def test_concat_of_rslora_scales_alpha_by_root_n(cli: Cli, tmp_path: Path) -> None:
    out = tmp_path / "rs"
    assert cli("swa", *RSLORA, "--lora", "concat", "-o", f"{out}/", "-q").exit_code == 0
    config = _config(out)
    assert config["use_rslora"] and config["r"] == 6
    assert config["lora_alpha"] == pytest.approx(8 * math.sqrt(3), rel=1e-12)
    for layer, m in _mean_updates(RSLORA).items():
        assert _rel(_updates(out)[layer], m) < 1e-6, layer


def test_svd_at_another_rank(cli: Cli, tmp_path: Path) -> None:
    out = tmp_path / "r2"
    assert cli("swa", *TRAINER, "--lora-rank", "2", "-o", f"{out}/", "-q").exit_code == 0
    config = _config(out)
    assert (config["r"], config["lora_alpha"]) == (2, 4)  # the scale alpha/r is kept
    for layer, m in _mean_updates(TRAINER).items():
        assert _rel(_updates(out)[layer], _best(m, 2)[0]) < 1e-6, layer


def test_factors_is_the_mean_of_the_factors(cli: Cli, tmp_path: Path) -> None:
    out = tmp_path / "f.safetensors"
    r = cli("swa", *TRAINER, "--lora", "factors", "-o", out, "-q")
    assert r.exit_code == 0 and "averaged factor by factor" in r.stderr
    got, inputs = load_file(out), _adapters(TRAINER)
    for k in got:
        assert torch.equal(got[k], torch.stack([x[k].double() for x in inputs]).mean(0).float()), k


@pytest.mark.parametrize("mode", ["svd", "factors", "concat"])
def test_plan_json_errors_are_the_dense_ones(cli: Cli, mode: str) -> None:
    r = cli("plan", "swa", *TRAINER, "--lora", mode, "--json")
    assert r.exit_code == 0, r.output
    lora = json.loads(r.stdout)["lora"]
    assert lora["mode"] == mode and lora["layers"] == 2
    states = _adapters(TRAINER)
    for layer, m in _mean_updates(TRAINER).items():
        a, b = lora_pairs(states[0])[layer]
        if mode == "svd":
            want = _best(m, 4)[1]
        elif mode == "factors":
            mean_a = torch.stack([x[a].double() for x in states]).mean(0)
            mean_b = torch.stack([x[b].double() for x in states]).mean(0)
            want = _rel(_s(_config(TRAINER[-1])) * mean_b @ mean_a, m)
        else:
            want = 0.0
        assert lora["outputs"][0][layer] == pytest.approx(want, rel=1e-9, abs=1e-12), layer
    assert lora["max_error"] == max(lora["outputs"][0].values())
    text = cli("plan", "swa", *TRAINER, "--lora", mode)
    assert f"LoRA: {mode}" in text.stdout and "relative error of the mean update" in text.stdout


def test_a_single_file_output_records_r_and_alpha(cli: Cli, tmp_path: Path) -> None:
    out = tmp_path / "c.safetensors"
    r = cli("swa", *TRAINER, "--lora", "concat", "-o", out, "--json")
    assert r.exit_code == 0, r.output
    with safe_open(str(out), "pt") as f:
        meta = json.loads(f.metadata()["ckptavg_lora"])
    assert (meta["mode"], meta["r"], meta["lora_alpha"], meta["max_error"]) == ("concat", 16, 32, 0.0)
    assert set(meta["errors"]) == set(lora_pairs(load_file(out)))
    assert json.loads(r.stdout)["lora"]["r"] == 16


def test_summary_names_the_worst_layer(cli: Cli, tmp_path: Path) -> None:
    r = cli("swa", *TRAINER, "-o", tmp_path / "o.safetensors")
    assert r.exit_code == 0, r.output
    line = next(x for x in r.stdout.splitlines() if x.startswith("LoRA: svd, r 4, lora_alpha 8"))
    assert "max 0.0139 (base_model.model.bert.encoder.layer.0.attention.self.query)" in line and "mean 0.0118" in line


def test_windows_average_each_row(cli: Cli, tmp_path: Path) -> None:
    """Several outputs from one read: each window's adapter is the mean update of its own checkpoints."""
    out = tmp_path / "w"
    r = cli("swa", *TRAINER, "--window", "2", "--stride", "2", "--lora", "concat", "-o", f"{out}/", "-q")
    assert r.exit_code == 0, r.output
    rows = sorted(out.iterdir())  # an adapter folder per window
    assert len(rows) == 2
    for row, members in zip(rows, (TRAINER[:2], TRAINER[2:]), strict=True):
        state = load_file(row / "adapter_model.safetensors")
        assert (_config(row)["r"], _config(row)["lora_alpha"]) == (8, 16)  # rank 2·4, the inputs' scale
        for layer, m in _mean_updates(members).items():
            a, b = lora_pairs(state)[layer]
            assert _rel(_s(_config(row)) * (state[b].double() @ state[a].double()), m) < 1e-6


class _TwoRows(Plan):
    """Rows weighing two and four adapters: concat pads the first to the second's rank."""

    method: ClassVar[str] = "two-rows"

    def weights(self, ckpts: Sequence[Entry], data: TensorAccess | None = None) -> WeightMatrix:
        return WeightMatrix((Weights((0.5, 0.5, 0.0, 0.0), name="a"), Weights((0.25,) * 4, name="b")))


def test_concat_rows_with_fewer_adapters_are_zero_padded() -> None:
    report = plan_checkpoints(TRAINER, _TwoRows(), lora=LoraAverage("concat"))
    assert report.lora is not None and report.lora.config is not None and report.lora.config["r"] == 16
    s = _s(_config(TRAINER[-1]))
    for row, weights in zip(report.lora.tensors, ((0.5, 0.5, 0, 0), (0.25,) * 4), strict=True):
        for layer, m in _mean_updates(TRAINER, weights).items():
            a, b = report.lora.layers[layer]
            assert row[a].shape == (16, 16)
            assert _rel(s * (row[b].double() @ row[a].double()), m) < 1e-6


def test_library_refusals(tmp_path: Path) -> None:
    plain = REPO / "fixtures" / "runs" / "plain"
    with pytest.raises(PlanError, match="applies to LoRA adapters") as e:
        plan_checkpoints(plain, lora=LoraAverage("concat"))
    assert e.value.params == ("lora",)
    # adapters of different scales: their updates cannot be summed
    other = tmp_path / "checkpoint-15"
    shutil.copytree(TRAINER[-1], other)
    config = _config(other) | {"lora_alpha": 16}
    (other / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(IncompatibleCheckpointsError, match="lora_alpha 8 but .* has 16"):
        average([TRAINER[0], other], tmp_path / "x.safetensors")
    # a change of rank needs an adapter_config.json to record the new r and lora_alpha
    files = [tmp_path / f"a{i}.safetensors" for i in range(2)]
    for src, dst in zip(TRAINER, files, strict=False):
        shutil.copy(src / "adapter_model.safetensors", dst)
    with pytest.raises(PlanError, match="no adapter_config.json") as e:
        plan_checkpoints(files, lora=LoraAverage("concat"))
    assert e.value.with_names({"lora": "--lora", "lora.rank": "--lora-rank"}).endswith(
        "or use --lora svd without --lora-rank.")
    assert plan_checkpoints(files).lora is not None  # svd at the same rank needs no config


@pytest.mark.parametrize(("args", "shown"), [
    (["--lora", "svd"], "Error: --lora svd applies to LoRA adapters, but the inputs hold no lora_A/lora_B factors; "
                        "leave out --lora."),
    (["--lora", "concat", "--lora-rank", "2"], "Error: --lora-rank applies to svd only, not to concat."),
])
def test_cli_refusals_are_one_line(cli: Cli, tmp_path: Path, args: list[str], shown: str) -> None:
    inputs = REPO / "fixtures" / "runs" / "plain" if "LoRA adapters" in shown else PEFT / "lora-trainer"
    r = cli("swa", inputs, *args, "-o", tmp_path / "x.safetensors")
    assert r.exit_code == 1
    assert r.stderr.splitlines() == [shown]
    assert not (tmp_path / "x.safetensors").exists()


def _write_adapters(tmp_path: Path, shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]], config: dict[str, Any],
                    n: int = 2) -> list[Path]:
    """n adapter folders (PEFT's saved names) with random factors of `shapes` (layer -> A shape, B shape), a
    modules_to_save head, and `config`."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(7)
    folders = []
    for i in range(n):
        folder = tmp_path / f"checkpoint-{i + 1}"
        folder.mkdir()
        state = {"base_model.model.head.weight": torch.randn(2, 4, generator=g)}
        for layer, (a, b) in shapes.items():
            kind = "lora_embedding_{}" if layer == "emb" else "lora_{}.weight"
            state[f"base_model.model.{layer}.{kind.format('A')}"] = torch.randn(a, generator=g)
            state[f"base_model.model.{layer}.{kind.format('B')}"] = torch.randn(b, generator=g)
        save_file(state, folder / "adapter_model.safetensors")
        (folder / "adapter_config.json").write_text(json.dumps({"r": 2, "lora_alpha": 6, **config}))
        folders.append(folder)
    return folders


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_merge_orients_each_update_as_peft_applies_it(tmp_path: Path, fan_in_fan_out: bool) -> None:
    """W + s Σ w_k ΔW_k with PEFT's ΔW: B·A (linear), (B·A)ᵀ (embedding; Conv1D with fan_in_fan_out), B·A reshaped
    to the kernel (conv); modules_to_save replace the base's tensor; the rest is copied."""
    from safetensors.torch import save_file

    if fan_in_fan_out:  # GPT-2's Conv1D stores in × out, square or not
        shapes = {"c_attn": ((2, 4), (12, 2)), "c_proj": ((2, 4), (4, 2))}
        base = {"c_attn.weight": torch.randn(4, 12), "c_proj.weight": torch.randn(4, 4)}
    else:
        # a square embedding (4 × 4): only knowing it is one tells that its update is transposed
        shapes = {"lin": ((2, 4), (6, 2)), "emb": ((2, 4), (4, 2)), "conv": ((2, 3, 3, 3), (5, 2, 1, 1))}
        base = {"lin.weight": torch.randn(6, 4), "emb.weight": torch.randn(4, 4), "conv.weight": torch.randn(5, 3, 3, 3)}
    base |= {"head.weight": torch.randn(2, 4), "lin.bias": torch.randn(6), "counter": torch.tensor(3)}
    save_file(base, tmp_path / "base.safetensors")
    folders = _write_adapters(tmp_path, shapes, {"fan_in_fan_out": fan_in_fan_out})
    out = tmp_path / "merged.safetensors"
    average(folders, out, lora=LoraAverage("merge", base=tmp_path / "base.safetensors"))
    got, states = load_file(out), _adapters(folders)
    assert set(got) == set(base)
    for layer in shapes:
        a_key, b_key = lora_pairs(states[0])[f"base_model.model.{layer}"]
        update = sum((0.5 * 3 * (st[b_key].double().flatten(1) @ st[a_key].double().flatten(1)) for st in states),
                     torch.zeros(()))
        update = update.T if layer == "emb" or fan_in_fan_out else update.reshape(base[f"{layer}.weight"].shape)
        want = (base[f"{layer}.weight"].double() + update).float()
        torch.testing.assert_close(got[f"{layer}.weight"], want, rtol=1e-6, atol=1e-6)
    head = (states[0]["base_model.model.head.weight"].double() + states[1]["base_model.model.head.weight"].double()) / 2
    assert torch.equal(got["head.weight"], head.float())
    assert torch.equal(got["lin.bias"], base["lin.bias"]) and torch.equal(got["counter"], base["counter"])
    with safe_open(str(out), "pt") as f:
        assert json.loads(f.metadata()["ckptavg_lora"])["mode"] == "merge"


def test_merge_refusals(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    folders = _write_adapters(tmp_path, {"lin": ((2, 4), (6, 2))}, {})
    save_file({"lin.weight": torch.randn(4, 4), "head.weight": torch.randn(2, 4)}, tmp_path / "wrong.safetensors")
    save_file({"other.weight": torch.randn(6, 4), "head.weight": torch.randn(2, 4)}, tmp_path / "other.safetensors")
    with pytest.raises(IncompatibleCheckpointsError, match=r"base tensor lin.weight has shape \(4, 4\)"):
        plan_checkpoints(folders, lora=LoraAverage("merge", base=tmp_path / "wrong.safetensors"))
    with pytest.raises(IncompatibleCheckpointsError, match="base has no tensor lin.weight") as e:
        plan_checkpoints(folders, lora=LoraAverage("merge", base=tmp_path / "other.safetensors"))
    assert e.value.params == ("base",)
    with pytest.raises(PlanError, match="give base") as p:
        LoraAverage("merge")
    assert p.value.params == ("base", "lora")
    with pytest.raises(PlanError, match="base goes with lora merge"):
        LoraAverage("svd", base=tmp_path)
    nan = tmp_path / "nan.safetensors"
    save_file({"lin.weight": torch.randn(6, 4), "lin.bias": torch.tensor([float("nan")] * 6),
               "head.weight": torch.randn(2, 4)}, nan)
    with pytest.raises(NonFiniteError, match=r"nan.safetensors: 'lin.bias' contains NaN"):
        average(folders, tmp_path / "m.safetensors", lora=LoraAverage("merge", base=nan))
    for folder in folders:
        (folder / "adapter_config.json").write_text(json.dumps({"r": 2, "lora_alpha": 6, "use_dora": True}))
    with pytest.raises(PlanError, match="DoRA"):
        plan_checkpoints(folders, lora=LoraAverage("merge", base=tmp_path / "wrong.safetensors"))


def test_merge_to_a_folder_takes_the_bases_sidecars(cli: Cli, tmp_path: Path) -> None:
    out = tmp_path / "m"
    r = cli("swa", *TRAINER, "--lora", "merge", "--base", PEFT / "lora-trainer-base", "-o", f"{out}/", "-q")
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert set(load_file(out / "model.safetensors")) == set(load_file(PEFT / "lora-trainer-base" / "model.safetensors"))
    r = cli("swa", *TRAINER, "--lora", "merge", "-o", tmp_path / "x.safetensors")
    assert r.stderr.splitlines() == ["Error: --lora merge writes the --base model with the mean update added: give "
                                     "--base, the model folder or file the adapters were trained on."]


@pytest.mark.parametrize("flags", [["--add-prefix", "x."], ["--strip-prefix", "base_model."],
                                   ["--add-prefix", "x.", "--strip-prefix", "base_model."]])
def test_merge_refuses_prefix_options_that_change_nothing(cli: Cli, tmp_path: Path, flags: list[str]) -> None:
    """They renamed the adapters' tensors only: the merge writes the base's names (adapter tensors are matched to
    them by their ends), and the output's tensors were the same with and without them."""
    r = cli("swa", *TRAINER[:2], "--lora", "merge", "--base", PEFT / "lora-trainer-base", *flags, "-o",
            tmp_path / "m.safetensors")
    named = " and ".join(f for f in ("--strip-prefix", "--add-prefix") if f in flags)
    assert r.exit_code == 1 and r.stderr.splitlines() == [
        f"Error: --lora merge writes the base model's own tensor names, so {named.split(' and ')[0]} changes nothing; "
        f"leave out {named}."]
    assert not any(tmp_path.iterdir())


def test_a_sharded_adapter_is_said_to_be_for_ckptavg_only(cli: Cli, tmp_path: Path) -> None:
    out = tmp_path / "sh"
    r = cli("swa", *TRAINER, "--lora", "concat", "--max-shard-size", "2KB", "-o", f"{out}/", "-q")
    assert r.exit_code == 0, r.output
    assert "PEFT loads an adapter from one adapter_model.safetensors" in r.stderr and "--max-shard-size" in r.stderr
    assert (out / "adapter_model.safetensors.index.json").is_file() and _config(out)["r"] == 16
    assert "PEFT loads" not in cli("swa", *TRAINER, "--lora", "concat", "-o", f"{tmp_path / 'one'}/", "-q").stderr


def test_graft_weighs_factors_apart(cli: Cli, tmp_path: Path) -> None:
    """Graft gives A and B their own weights: no update B·A is their mean, so only factors averages them."""
    r = cli("graft", *TRAINER, "-o", tmp_path / "g.safetensors")
    assert r.exit_code == 1 and len(r.stderr.splitlines()) == 1
    assert "get different weights" in r.stderr and "use --lora factors" in r.stderr
    r = cli("graft", *TRAINER, "--lora", "factors", "-o", tmp_path / "g.safetensors", "--json")
    assert r.exit_code == 0, r.output
    lora = json.loads(r.stdout)["lora"]
    assert (lora["max_error"], lora["worst_layer"], lora["outputs"]) == (None, None, [{}])
    assert "A and B weighed apart" in cli("plan", "graft", *TRAINER, "--lora", "factors").stdout


def test_a_base_alone_means_merge(cli: Cli) -> None:
    r = cli("plan", "swa", *TRAINER, "--base", PEFT / "lora-trainer-base", "--json")
    assert r.exit_code == 0, r.output
    plan = json.loads(r.stdout)
    assert plan["lora"]["mode"] == "merge" and plan["lora"]["base"] == str(PEFT / "lora-trainer-base")
    assert plan["tensors"] == len(load_file(PEFT / "lora-trainer-base" / "model.safetensors"))  # the base's layout


def test_dora_adapters_are_said_to_be_approximate(tmp_path: Path) -> None:
    folders = []
    for src in TRAINER[:2]:
        folders.append(tmp_path / src.name)
        shutil.copytree(src, folders[-1])
        (folders[-1] / "adapter_config.json").write_text(json.dumps(_config(src) | {"use_dora": True}))
    with pytest.warns(UserWarning, match="DoRA adapters: .* not the mean of the adapted weights"):
        report = plan_checkpoints(folders)
    assert any("DoRA" in w for w in report.warning_texts())


def test_a_scored_soup_of_adapters_needs_lora_factors(cli: Cli, tmp_path: Path) -> None:
    """Soup scores each candidate as the mean of its tensors (factor by factor for adapters): writing svd or
    concat would write something else than what was scored, so that is refused before any scoring."""
    evals = tmp_path / "evals.py"
    evals.write_text("import pathlib\n"
                     f"LOG = pathlib.Path({str(tmp_path / 'log')!r})\n"
                     "def score(sd):\n"
                     "    LOG.open('a').write('x')\n"
                     "    return -sum(float(t.float().abs().sum()) for t in sd.values())\n")
    for lora in ([], ["--lora", "concat"]):
        r = cli("soup", *TRAINER, "--eval", f"{evals}:score", *lora, "-o", tmp_path / "soup.safetensors")
        assert r.exit_code == 1 and len(r.stderr.splitlines()) == 1, r.output
        assert "--lora factors" in r.stderr and not (tmp_path / "log").exists()  # refused before scoring
    r = cli("soup", *TRAINER, "--eval", f"{evals}:score", "--lora", "factors", "-o", tmp_path / "soup.safetensors", "-q")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "log").exists()  # scored, and written as scored
    assert cli("soup", *TRAINER, "--uniform", "-o", tmp_path / "u.safetensors", "-q").exit_code == 0  # nothing scored


def test_rows_of_adapters_in_a_folder_are_adapter_folders(cli: Cli, tmp_path: Path) -> None:
    """A sweep of adapters into a folder writes one PEFT adapter folder per row, each with the config that holds
    its r and lora_alpha (a bare weights file could not be loaded: concat changes r)."""
    out = tmp_path / "sweep"
    r = cli("ema", *TRAINER, "--decay", "0.5,0.9", "--lora", "concat", "-o", f"{out}/", "-q")
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in out.iterdir()) == ["decay=0.5", "decay=0.9"]
    for row in out.iterdir():
        assert {"adapter_model.safetensors", "adapter_config.json"} <= {p.name for p in row.iterdir()}
        assert (_config(row)["r"], _config(row)["lora_alpha"]) == (16, 32)


def test_an_svd_rank_above_n_r_says_the_rest_is_zeros(cli: Cli, tmp_path: Path) -> None:
    r = cli("swa", *TRAINER, "--lora-rank", "20", "-o", f"{tmp_path / 'r20'}/", "-q")
    assert r.exit_code == 0, r.output
    assert "--lora-rank 20 is more than the mean update can have (at most 4 adapters x r = 16)" in r.stderr
    state = load_file(tmp_path / "r20" / "adapter_model.safetensors")
    a = state["base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight"]
    assert a.shape[0] == 20 and not a[16:].any() and a[:16].abs().sum(1).min() > 0  # exactly the zero padding
    assert "is more than" not in cli("swa", *TRAINER, "--lora-rank", "16", "-o", f"{tmp_path / 'r16'}/", "-q").stderr


@pytest.mark.parametrize("how", [LoraAverage("svd"), LoraAverage("merge", base=str(PEFT / "lora-trainer-base"))])
def test_progress_counts_the_tensors_the_plan_computes(tmp_path: Path, how: LoraAverage) -> None:
    """The LoRA layers (and a merge's every tensor) are computed, not streamed: progress still moves through
    them and ends at its total."""
    calls: list[tuple[int, int]] = []
    average(TRAINER[:2], f"{tmp_path / 'out'}/", lora=how, progress=lambda done, total: calls.append((done, total)))
    assert len(calls) > 2 and calls[-1][0] == calls[-1][1] > 0
    assert all(a[0] <= b[0] for a, b in zip(calls, calls[1:], strict=False))
