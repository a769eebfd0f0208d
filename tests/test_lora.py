"""LoRA averaging (ckptavg.methods.lora, docs/ALGORITHMS.md §13): the worked example, exact concat, svd against a
dense reference SVD, factors, configs, and the real PEFT fixtures (r 4, alpha 8, four Trainer checkpoints)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ckptavg.errors import CheckpointFormatError, IncompatibleCheckpointsError, PlanError
from ckptavg.methods.lora import (
    LoraAverage,
    adapter_config_for,
    alpha_for,
    average_concat,
    average_factors,
    average_svd,
    concat_alpha,
    delta,
    factors_error,
    lora_pairs,
    plain_keys,
    scale,
)

REPO = Path(__file__).resolve().parent.parent
PEFT = REPO / "fixtures" / "real" / "peft"
TRAINER = [PEFT / "lora-trainer" / f"checkpoint-{s}" for s in (3, 6, 9, 12)]

Factors = tuple[list[torch.Tensor], list[torch.Tensor]]


def worked() -> Factors:
    """docs/ALGORITHMS.md §13's example: out 3, in 2, r 1, N 2."""
    return ([torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, -1.0]])],
            [torch.tensor([[1.0], [0.0], [2.0]]), torch.tensor([[0.0], [1.0], [1.0]])])


def dense_mean(As: list[torch.Tensor], Bs: list[torch.Tensor], weights: list[float], s: float = 1.0) -> torch.Tensor:
    return sum((w * delta(a, b, s) for w, a, b in zip(weights, As, Bs, strict=True)), torch.zeros(()))


def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    norm = float(torch.linalg.matrix_norm(ref))
    return float(torch.linalg.matrix_norm(x - ref)) / norm if norm else float(torch.linalg.matrix_norm(x))


def random_adapters(n: int, out: int, inn: int, r: int, seed: int, dtype: torch.dtype = torch.float64) -> Factors:
    g = torch.Generator().manual_seed(seed)
    return ([torch.randn(r, inn, generator=g, dtype=torch.float64).to(dtype) for _ in range(n)],
            [torch.randn(out, r, generator=g, dtype=torch.float64).to(dtype) for _ in range(n)])


def reference_svd(m: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Dense truncated SVD of M: its rank-`rank` part, singular values, relative error."""
    u, sv, vh = torch.linalg.svd(m, full_matrices=False)
    k = min(rank, sv.numel())
    m_r = (u[:, :k] * sv[:k]) @ vh[:k]
    total = float(torch.linalg.vector_norm(sv))
    return m_r, sv, (float(torch.linalg.vector_norm(sv[k:])) / total if total else 0.0)


# --- docs/ALGORITHMS.md §13's worked example --------------------------------------------------------------


def test_worked_example_mean_update() -> None:
    As, Bs = worked()
    expected = torch.tensor([[0.5, 1.0], [1.5, -0.5], [2.5, 1.5]], dtype=torch.float64)
    assert torch.equal(dense_mean(As, Bs, [0.5, 0.5]), expected)
    sv = torch.linalg.svdvals(expected)
    assert sv.tolist() == pytest.approx([3.240370, 1.322876], abs=1e-6)


def test_worked_example_factors() -> None:
    As, Bs = worked()
    a, b = average_factors(As, Bs, [0.5, 0.5])
    assert a.dtype == b.dtype == torch.float64
    assert torch.equal(b @ a, torch.tensor([[1.0, 0.25], [1.0, 0.25], [3.0, 0.75]], dtype=torch.float64))
    err = factors_error(As, Bs, [0.5, 0.5])
    assert err == pytest.approx(0.446, abs=5e-4)
    assert err == pytest.approx(rel(b @ a, dense_mean(As, Bs, [0.5, 0.5])), rel=1e-12)
    assert LoraAverage("factors").average(list(zip(As, Bs, strict=True)), [0.5, 0.5]).error == err


def test_worked_example_svd() -> None:
    As, Bs = worked()
    a, b, err = average_svd(As, Bs, [0.5, 0.5], 1)
    assert a.shape == (1, 2) and b.shape == (3, 1)
    assert err == pytest.approx(0.377964, abs=1e-6)
    m_r, _, ref_err = reference_svd(dense_mean(As, Bs, [0.5, 0.5]), 1)
    assert torch.allclose(b @ a, m_r, rtol=0, atol=1e-12)
    assert err == pytest.approx(ref_err, rel=1e-12)
    # B = U Σ^½ and A = Σ^½ Vᵀ: both factors carry the same norm
    assert float(b.norm()) == pytest.approx(float(a.norm()), rel=1e-12)


def test_worked_example_concat() -> None:
    As, Bs = worked()
    a, b = average_concat(As, Bs, [0.5, 0.5])
    assert a.shape == (2, 2) and b.shape == (3, 2)
    assert torch.equal(b @ a, dense_mean(As, Bs, [0.5, 0.5]))
    assert LoraAverage("concat").average(list(zip(As, Bs, strict=True)), [0.5, 0.5]).error == 0.0


# --- random data --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,out,inn,r", [(3, 64, 48, 4), (2, 300, 200, 8), (5, 6, 7, 4), (4, 3, 50, 2), (1, 10, 10, 3)])
def test_concat_exact(n: int, out: int, inn: int, r: int) -> None:
    As, Bs = random_adapters(n, out, inn, r, seed=n * out)
    g = torch.Generator().manual_seed(1)
    weights = torch.rand(n, generator=g, dtype=torch.float64).tolist()
    s = scale(r, 16, rslora=True)
    new_r, new_alpha = concat_alpha(r, n, 16, rslora=True)
    a, b = average_concat(As, Bs, weights)
    assert a.shape == (new_r, inn) and b.shape == (out, new_r)
    got = delta(a, b, scale(new_r, new_alpha, rslora=True))
    assert rel(got, dense_mean(As, Bs, weights, s)) < 1e-12


@pytest.mark.parametrize("n,out,inn,r,rank", [
    (3, 200, 150, 4, 4),     # out, in >> N·r
    (4, 500, 300, 8, 8),
    (4, 6, 5, 4, 4),         # N·r > min(out, in)
    (3, 12, 3, 2, 2),
    (2, 40, 30, 4, 3),       # lower output rank
    (5, 40, 30, 2, 7),       # higher output rank, still below N·r
    (2, 3, 4, 2, 8),         # rank above every singular value: zero-padded
])
def test_svd_equals_dense_reference(n: int, out: int, inn: int, r: int, rank: int) -> None:
    As, Bs = random_adapters(n, out, inn, r, seed=out + inn, dtype=torch.float32)
    weights = [1.0 / n] * n
    a, b, err = average_svd(As, Bs, weights, rank)
    assert a.dtype == b.dtype == torch.float64
    assert a.shape == (rank, inn) and b.shape == (out, rank)
    m = dense_mean(As, Bs, weights)
    m_r, sv, ref_err = reference_svd(m, rank)
    assert float(torch.linalg.matrix_norm(b @ a - m_r)) <= 1e-10 * float(sv[0])
    assert err == pytest.approx(ref_err, abs=1e-10)
    if rank >= min(out, inn, n * r):
        assert err < 1e-12


def test_svd_rank_deficient() -> None:
    # every adapter spans the same 2 directions of a rank-4 space: M has rank 2
    g = torch.Generator().manual_seed(7)
    basis_b, basis_a = torch.randn(50, 2, generator=g, dtype=torch.float64), torch.randn(2, 40, generator=g, dtype=torch.float64)
    As = [torch.cat([torch.randn(2, 2, generator=g, dtype=torch.float64) @ basis_a, torch.zeros(2, 40, dtype=torch.float64)])
          for _ in range(3)]
    Bs = [torch.cat([basis_b @ torch.randn(2, 2, generator=g, dtype=torch.float64), torch.zeros(50, 2, dtype=torch.float64)], 1)
          for _ in range(3)]
    weights = [0.2, 0.3, 0.5]
    m = dense_mean(As, Bs, weights)
    for rank in (1, 2, 4):
        a, b, err = average_svd(As, Bs, weights, rank)
        m_r, sv, ref_err = reference_svd(m, rank)
        assert float(torch.linalg.matrix_norm(b @ a - m_r)) <= 1e-10 * float(sv[0])
        assert err == pytest.approx(ref_err, abs=1e-10)
    assert average_svd(As, Bs, weights, 2)[2] < 1e-12


def test_zero_adapters() -> None:
    # PEFT initialises B to zero: the first checkpoint of a run can be exactly this
    As = [torch.randn(4, 10, dtype=torch.float64) for _ in range(3)]
    Bs = [torch.zeros(12, 4) for _ in range(3)]
    for mode in ("svd", "concat", "factors"):
        layer = LoraAverage(mode).average(list(zip(As, Bs, strict=True)), [1 / 3] * 3)
        assert layer.error == 0.0
        assert torch.isfinite(layer.A).all() and torch.isfinite(layer.B).all()
        assert not delta(layer.A, layer.B).any()
    a, b, err = average_svd([torch.zeros(2, 5)], [torch.zeros(6, 2)], [1.0], 2)
    assert err == 0.0 and not a.any() and not b.any()


def test_factors_identical_adapters_come_back() -> None:
    As, Bs = random_adapters(1, 30, 20, 4, seed=3, dtype=torch.float32)
    a, b = average_factors(As * 3, Bs * 3, [1 / 3] * 3)
    assert torch.equal(a.to(torch.float32), As[0]) and torch.equal(b.to(torch.float32), Bs[0])
    assert factors_error(As * 3, Bs * 3, [1 / 3] * 3) < 1e-14
    # weights as given, never √w (peft's pitfall): N identical adapters at 1/N are not N times too large
    assert rel(delta(a, b), delta(As[0], Bs[0])) < 1e-7


@pytest.mark.parametrize("weights", [[0.25, 0.25, 0.5], [0.7, 0.5, -0.2], [0.3, 0.3, 0.3], [1.0, 1.0, 1.0]])
def test_factors_error_equals_dense(weights: list[float]) -> None:
    As, Bs = random_adapters(3, 40, 30, 4, seed=11)
    a, b = average_factors(As, Bs, weights)
    assert factors_error(As, Bs, weights) == pytest.approx(rel(b @ a, dense_mean(As, Bs, weights)), rel=1e-10)


def test_conv_and_bf16_factors() -> None:
    g = torch.Generator().manual_seed(5)
    As = [torch.randn(4, 3, 3, 3, generator=g).to(torch.bfloat16) for _ in range(2)]
    Bs = [torch.randn(8, 4, 1, 1, generator=g).to(torch.bfloat16) for _ in range(2)]
    a, b = average_concat(As, Bs, [0.5, 0.5])
    assert a.shape == (8, 3, 3, 3) and b.shape == (8, 8, 1, 1) and a.dtype == torch.float64
    m = dense_mean(As, Bs, [0.5, 0.5])
    assert rel(delta(a, b), m) < 1e-12
    a, b, err = average_svd(As, Bs, [0.5, 0.5], 4)
    assert a.shape == (4, 3, 3, 3) and b.shape == (8, 4, 1, 1)
    assert err == pytest.approx(reference_svd(m, 4)[2], abs=1e-10)


def test_shape_mismatch_refused() -> None:
    with pytest.raises(IncompatibleCheckpointsError):
        average_concat([torch.zeros(2, 3), torch.zeros(3, 3)], [torch.zeros(4, 2), torch.zeros(4, 3)], [0.5, 0.5])
    with pytest.raises(IncompatibleCheckpointsError):
        average_svd([torch.zeros(2, 3)], [torch.zeros(4, 3)], [1.0], 2)
    with pytest.raises(PlanError):
        average_factors([torch.zeros(2, 3)], [torch.zeros(4, 2)], [0.5, 0.5])


# --- scales, plans and configs ---------------------------------------------------------------------------------


def test_scale_and_alpha() -> None:
    assert scale(4, 8) == 2.0 and scale(4, 8, rslora=True) == 4.0
    assert concat_alpha(4, 4, 8) == (16, 32)
    assert concat_alpha(4, 4, 8, rslora=True) == (16, 16.0)
    for r, n, alpha in [(2, 3, 8), (16, 5, 32), (8, 7, 5.5)]:
        for rs in (False, True):
            new_r, new_alpha = concat_alpha(r, n, alpha, rs)
            assert scale(new_r, new_alpha, rs) == pytest.approx(scale(r, alpha, rs), rel=1e-15)
    assert scale(8, alpha_for(8, 4, 8)) == scale(4, 8) and scale(2, alpha_for(2, 4, 8, True), True) == scale(4, 8, True)
    with pytest.raises(PlanError):
        scale(0, 8)


def test_plan_validation() -> None:
    assert LoraAverage() == LoraAverage("svd", None)
    for bad, params in [({"mode": "mean"}, ("lora",)), ({"rank": 0}, ("lora.rank",)), ({"rank": 2.0}, ("lora.rank",)),
                        ({"mode": "concat", "rank": 4}, ("lora.rank",))]:
        with pytest.raises(PlanError) as e:
            LoraAverage(**bad)  # type: ignore[arg-type]
        assert e.value.params == params
    with pytest.raises(PlanError) as e:
        LoraAverage("svd", -1)
    assert e.value.with_names({"lora.rank": "--lora-rank"}).startswith("--lora-rank must")


def test_adapter_config_for() -> None:
    config = json.loads((TRAINER[0] / "adapter_config.json").read_text())
    assert adapter_config_for(config, "factors", 4) == config
    assert adapter_config_for(config, "svd", 4) == config
    out = adapter_config_for(config, "concat", 4)
    assert (out["r"], out["lora_alpha"]) == (16, 32) and isinstance(out["lora_alpha"], int)
    assert {k: v for k, v in out.items() if k not in ("r", "lora_alpha")} == {k: v for k, v in config.items()
                                                                              if k not in ("r", "lora_alpha")}
    assert config["r"] == 4  # the input is left alone
    rs = adapter_config_for({**config, "use_rslora": True}, "concat", 4)
    assert (rs["r"], rs["lora_alpha"]) == (16, 16)
    low = adapter_config_for(config, "svd", 4, rank=2)
    assert low["r"] == 2 and scale(2, low["lora_alpha"]) == scale(4, 8)
    patterned = {**config, "rank_pattern": {"query": 8}, "alpha_pattern": {"value": 4}}
    cat = adapter_config_for(patterned, "concat", 3)
    assert cat["rank_pattern"] == {"query": 24} and cat["alpha_pattern"] == {"value": 12}
    assert adapter_config_for({**patterned, "use_rslora": True}, "concat", 4)["alpha_pattern"] == {"value": 8}
    with pytest.raises(PlanError, match="rank_pattern"):
        adapter_config_for(patterned, "svd", 4, rank=2)
    with pytest.raises(CheckpointFormatError):
        adapter_config_for({"r": "4", "lora_alpha": 8}, "concat", 2)


def test_key_pairing() -> None:
    names = ["m.q.lora_A.weight", "m.q.lora_B.weight", "m.classifier.weight", "m.q.lora_B.bias",
             "m.emb.lora_embedding_A", "m.emb.lora_embedding_B", "m.v.lora_A.default.weight", "m.v.lora_B.default.weight",
             "m.emb2.lora_embedding_A.default", "m.emb2.lora_embedding_B.default", "m.q.lora_magnitude_vector"]
    assert lora_pairs(names) == {"m.q": ("m.q.lora_A.weight", "m.q.lora_B.weight"),
                                 "m.emb": ("m.emb.lora_embedding_A", "m.emb.lora_embedding_B"),
                                 "m.v[default]": ("m.v.lora_A.default.weight", "m.v.lora_B.default.weight"),
                                 "m.emb2[default]": ("m.emb2.lora_embedding_A.default", "m.emb2.lora_embedding_B.default")}
    assert plain_keys(names) == ["m.classifier.weight", "m.q.lora_B.bias", "m.q.lora_magnitude_vector"]
    with pytest.raises(CheckpointFormatError, match="other half"):
        lora_pairs(["m.q.lora_A.weight"])
    with pytest.raises(CheckpointFormatError, match="clash"):
        lora_pairs(["m.q.lora_A.weight", "m.q.lora_embedding_B"])


# --- the real PEFT fixtures --------------------------------------------------------------------------------


def load_run(folders: list[Path]) -> tuple[dict[str, tuple[str, str]], list[str], list[dict[str, torch.Tensor]]]:
    states = [load_file(str(f / "adapter_model.safetensors")) for f in folders]
    return lora_pairs(states[0]), plain_keys(states[0]), states


def test_real_key_names() -> None:
    pairs, plain, _ = load_run(TRAINER)
    prefix = "base_model.model.bert.encoder.layer.0.attention.self."
    assert sorted(pairs) == [prefix + "query", prefix + "value"]
    assert plain == ["base_model.model.classifier.bias", "base_model.model.classifier.weight"]
    rs_pairs, rs_plain, _ = load_run(sorted((PEFT / "rslora-manual").glob("step_*")))
    assert sorted(rs_pairs) == ["base_model.model.0", "base_model.model.3"] and rs_plain == []


def real_errors(folders: list[Path]) -> dict[str, dict[str, float]]:
    """Every layer of a run averaged uniformly in each mode: concat checked exact; the errors of svd and factors."""
    pairs, _, states = load_run(folders)
    config = json.loads((folders[0] / "adapter_config.json").read_text())
    s = scale(config["r"], config["lora_alpha"], config.get("use_rslora", False))
    weights = [1 / len(states)] * len(states)
    errors: dict[str, dict[str, float]] = {"svd": {}, "factors": {}}
    for layer, (ka, kb) in pairs.items():
        factors = [(st[ka], st[kb]) for st in states]
        mean = dense_mean([a for a, _ in factors], [b for _, b in factors], weights, s)
        cat = LoraAverage("concat").average(factors, weights)
        out = adapter_config_for(config, "concat", len(states))
        assert rel(delta(cat.A, cat.B, scale(out["r"], out["lora_alpha"], out.get("use_rslora", False))), mean) < 1e-12
        for mode in ("svd", "factors"):
            got = LoraAverage(mode).average(factors, weights)
            assert got.error == pytest.approx(rel(delta(got.A, got.B, s), mean), rel=1e-9, abs=1e-12)
            errors[mode][layer] = got.error
    return errors


def test_real_trainer_run() -> None:
    errors = real_errors(TRAINER)
    print("\nlora-trainer checkpoint-3..12 (uniform), per-layer relative errors:", json.dumps(errors, indent=1))
    assert all(e > 0 for e in errors["factors"].values())
    assert all(0 <= e < 1 for e in errors["svd"].values())


def test_real_rslora_run() -> None:
    errors = real_errors(sorted((PEFT / "rslora-manual").glob("step_*")))
    assert all(e > 0 for e in errors["factors"].values())


@pytest.mark.interop
def test_peft_loads_concat_adapter(tmp_path: Path) -> None:
    """PeftModel.from_pretrained on our concat adapter merges to the mean of the four checkpoints' merged weights."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    base_dir = PEFT / "lora-trainer-base"

    def merged(folder: Path) -> dict[str, torch.Tensor]:
        base = transformers.AutoModelForSequenceClassification.from_pretrained(base_dir)
        model = peft.PeftModel.from_pretrained(base, folder).merge_and_unload()
        return {k: v.detach().to(torch.float64) for k, v in model.state_dict().items()}

    pairs, plain, states = load_run(TRAINER)
    weights = [1 / len(states)] * len(states)
    config = json.loads((TRAINER[0] / "adapter_config.json").read_text())
    out: dict[str, torch.Tensor] = {}
    for ka, kb in pairs.values():
        layer = LoraAverage("concat").average([(st[ka], st[kb]) for st in states], weights)
        out[ka], out[kb] = layer.A.to(torch.float32), layer.B.to(torch.float32)
    for k in plain:
        out[k] = sum((w * st[k].to(torch.float64) for w, st in zip(weights, states, strict=True)),
                     torch.zeros(())).to(torch.float32)
    save_file(out, str(tmp_path / "adapter_model.safetensors"))
    (tmp_path / "adapter_config.json").write_text(json.dumps(adapter_config_for(config, "concat", len(states))))
    ours = merged(tmp_path)
    each = [merged(f) for f in TRAINER]
    for key, value in ours.items():
        mean = sum((w * m[key] for w, m in zip(weights, each, strict=True)), torch.zeros(()))
        assert torch.allclose(value, mean, rtol=0, atol=1e-6 * max(1.0, float(mean.abs().max()))), key
    assert math.isfinite(sum(float(v.sum()) for v in ours.values()))
    # the updates were applied, not dropped on load
    base = transformers.AutoModelForSequenceClassification.from_pretrained(base_dir).state_dict()
    moved = [k for k in pairs if float((ours[k.removeprefix("base_model.model.") + ".weight"] - base[k.removeprefix(
        "base_model.model.") + ".weight"]).abs().max()) > 1e-5]
    assert sorted(moved) == sorted(pairs)
