"""What many people write: load every checkpoint fully, then sum in float32 and divide.

    python bench/baselines/naive_sum.py DIR OUT.safetensors
"""

import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def load(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path) if path.suffix == ".safetensors" else torch.load(path, map_location="cpu", weights_only=True)


def main() -> None:
    files = sorted(p for p in Path(sys.argv[1]).iterdir() if p.suffix in (".safetensors", ".pt"))
    states = [load(p) for p in files]
    avg = {}
    for k, v in states[0].items():
        if v.is_floating_point():
            avg[k] = (sum(s[k].float() for s in states) / len(states)).to(v.dtype)
        else:
            avg[k] = states[-1][k]
    save_file(avg, sys.argv[2])


if __name__ == "__main__":
    main()
