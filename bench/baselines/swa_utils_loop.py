"""The reference implementation as a user would drive it: one AveragedModel (use_buffers=True), fed one
checkpoint at a time through load_state_dict.

    python bench/baselines/swa_utils_loop.py DIR OUT.safetensors
"""

import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.optim.swa_utils import AveragedModel


class Flat(nn.Module):
    """A module holding a state dict's tensors: floating ones as parameters, the others as buffers."""

    def __init__(self, state: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.names = list(state)
        for i, v in enumerate(state.values()):
            if v.is_floating_point():
                self.register_parameter(f"t{i}", nn.Parameter(torch.empty_like(v), requires_grad=False))
            else:
                self.register_buffer(f"t{i}", torch.empty_like(v))

    def load(self, state: dict[str, torch.Tensor]) -> None:
        self.load_state_dict({f"t{i}": state[k] for i, k in enumerate(self.names)})


def load(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path) if path.suffix == ".safetensors" else torch.load(path, map_location="cpu", weights_only=True)


def main() -> None:
    files = sorted(p for p in Path(sys.argv[1]).iterdir() if p.suffix in (".safetensors", ".pt"))
    first = load(files[0])
    model = Flat(first)
    avg = None
    for p in files:
        model.load(first if p == files[0] else load(p))
        if avg is None:
            avg = AveragedModel(model, use_buffers=True)
        else:
            avg.update_parameters(model)
    state = avg.module.state_dict()
    save_file({k: state[f"t{i}"].contiguous() for i, k in enumerate(model.names)}, sys.argv[2])


if __name__ == "__main__":
    main()
