"""Generate realistic checkpoint sets for the benchmarks (run by hand; see bench/RESULTS.md).

    python bench/make_ckpts.py --mix resnet --size-mib 100 --n 8 --dtype float32 --format safetensors \
        --out /tmp/ckptavg-bench/resnet-100-float32-safetensors

Tensor mixes:
- resnet: ResNet-50's tensors (convolutions, BatchNorm weights and buffers with their int64
  num_batches_tracked, the classifier), channel widths scaled so the checkpoint has about the asked size.
- transformer: a GPT-style stack (token embedding, per layer LayerNorms, fused QKV, projection and a 4x MLP,
  with biases), layers added until the asked size is reached.

Formats: safetensors, pt (a plain torch.save state dict), lightning (a .ckpt with `state_dict` under
`model.` and an epoch/global_step), hf (a Hugging Face folder with model.safetensors and config.json),
hf-sharded (the same with 1 GB shards and model.safetensors.index.json).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

Shapes = list[tuple[str, tuple[int, ...]]]


def resnet_shapes(width: float) -> Shapes:
    """ResNet-50's state dict layout, with every channel count multiplied by `width`."""
    def c(n: int) -> int:
        return max(8, int(round(n * width / 8)) * 8)

    out: Shapes = [("conv1.weight", (c(64), 3, 7, 7))]
    out += _bn("bn1", c(64))
    inplanes = c(64)
    for li, (planes, blocks) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3), strict=True), 1):
        p = c(planes)
        for b in range(blocks):
            pre = f"layer{li}.{b}"
            out += [(f"{pre}.conv1.weight", (p, inplanes, 1, 1))] + _bn(f"{pre}.bn1", p)
            out += [(f"{pre}.conv2.weight", (p, p, 3, 3))] + _bn(f"{pre}.bn2", p)
            out += [(f"{pre}.conv3.weight", (4 * p, p, 1, 1))] + _bn(f"{pre}.bn3", 4 * p)
            if b == 0:
                out += [(f"{pre}.downsample.0.weight", (4 * p, inplanes, 1, 1))] + _bn(f"{pre}.downsample.1", 4 * p)
            inplanes = 4 * p
    return out + [("fc.weight", (1000, inplanes)), ("fc.bias", (1000,))]


def _bn(pre: str, n: int) -> Shapes:
    return [(f"{pre}.{k}", (n,)) for k in ("weight", "bias", "running_mean", "running_var")] + [
        (f"{pre}.num_batches_tracked", ())
    ]


def transformer_shapes(d: int, layers: int, vocab: int = 32000) -> Shapes:
    out: Shapes = [("tok_emb.weight", (vocab, d)), ("pos_emb.weight", (2048, d))]
    for i in range(layers):
        p = f"blocks.{i}"
        out += [(f"{p}.ln1.weight", (d,)), (f"{p}.ln1.bias", (d,))]
        out += [(f"{p}.attn.qkv.weight", (3 * d, d)), (f"{p}.attn.qkv.bias", (3 * d,))]
        out += [(f"{p}.attn.proj.weight", (d, d)), (f"{p}.attn.proj.bias", (d,))]
        out += [(f"{p}.ln2.weight", (d,)), (f"{p}.ln2.bias", (d,))]
        out += [(f"{p}.mlp.fc.weight", (4 * d, d)), (f"{p}.mlp.fc.bias", (4 * d,))]
        out += [(f"{p}.mlp.proj.weight", (d, 4 * d)), (f"{p}.mlp.proj.bias", (d,))]
    return out + [("ln_f.weight", (d,)), ("ln_f.bias", (d,))]


def numel(shapes: Shapes) -> int:
    return sum(math.prod(s) for _, s in shapes)


def shapes_for(mix: str, size_mib: float, itemsize: int) -> Shapes:
    target = size_mib * 2**20 / itemsize
    if mix == "resnet":
        return resnet_shapes(math.sqrt(target / numel(resnet_shapes(1.0))))
    d = 512 if size_mib <= 128 else 1024 if size_mib <= 1024 else 2048
    layers = 1
    while numel(transformer_shapes(d, layers + 1)) <= target:
        layers += 1
    return transformer_shapes(d, layers)


def make_state(shapes: Shapes, dtype: torch.dtype, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    for name, shape in shapes:
        if name.endswith("num_batches_tracked"):
            sd[name] = torch.tensor(1000 * (seed + 1), dtype=torch.int64)
        elif name.endswith("running_var"):
            sd[name] = torch.rand(shape, generator=g).add_(0.5).to(dtype)
        else:
            sd[name] = torch.randn(shape, generator=g).mul_(0.05).to(dtype)
    return sd


def save(sd: dict[str, torch.Tensor], fmt: str, out: Path, i: int) -> Path:
    if fmt == "safetensors":
        path = out / f"ckpt-{i:02d}.safetensors"
        save_file(sd, path)
    elif fmt == "pt":
        path = out / f"ckpt-{i:02d}.pt"
        torch.save(sd, path)
    elif fmt == "lightning":
        path = out / f"epoch={i}-step={100 * (i + 1)}.ckpt"
        torch.save({"epoch": i, "global_step": 100 * (i + 1), "state_dict": {f"model.{k}": v for k, v in sd.items()}}, path)
    elif fmt == "hf":
        path = out / f"checkpoint-{100 * (i + 1)}"
        path.mkdir()
        save_file(sd, path / "model.safetensors", metadata={"format": "pt"})
        (path / "config.json").write_text(json.dumps({"model_type": "bench"}))
    elif fmt == "hf-sharded":
        path = out / f"checkpoint-{100 * (i + 1)}"
        path.mkdir()
        shards: list[dict[str, torch.Tensor]] = [{}]
        for k, v in sd.items():  # greedy 1 GB shards, like transformers' save_pretrained
            if shards[-1] and sum(t.nbytes for t in shards[-1].values()) + v.nbytes > 10**9:
                shards.append({})
            shards[-1][k] = v
        weight_map = {}
        for j, part in enumerate(shards, 1):
            name = f"model-{j:05d}-of-{len(shards):05d}.safetensors"
            save_file(part, path / name, metadata={"format": "pt"})
            weight_map.update({k: name for k in part})
        total = sum(v.nbytes for v in sd.values())
        (path / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
        (path / "config.json").write_text(json.dumps({"model_type": "bench"}))
    else:
        raise SystemExit(f"unknown format {fmt}")
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mix", choices=["resnet", "transformer"], default="resnet")
    ap.add_argument("--size-mib", type=float, default=100)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    ap.add_argument("--format", choices=["safetensors", "pt", "lightning", "hf", "hf-sharded"], default="safetensors")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    dtype = getattr(torch, a.dtype)
    shapes = shapes_for(a.mix, a.size_mib, dtype.itemsize)
    a.out.mkdir(parents=True, exist_ok=True)
    for i in range(a.n):
        save(make_state(shapes, dtype, i), a.format, a.out, i)
    mib = sum(math.prod(s) * (8 if n.endswith("num_batches_tracked") else dtype.itemsize) for n, s in shapes) / 2**20
    print(f"{a.out}: {a.n} x {mib:.1f} MiB, {len(shapes)} tensors, largest {max(math.prod(s) for _, s in shapes)} elements")


if __name__ == "__main__":
    main()
