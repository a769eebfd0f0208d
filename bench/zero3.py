"""Peak memory of rebuilding fp32 weights from DeepSpeed ZeRO-3 partitions: ckptavg against DeepSpeed's own
`zero_to_fp32` on the same checkpoints (issue 15). Needs deepspeed (CPU, 2 gloo ranks); run by hand:

    python bench/zero3.py make /tmp/z3 --width 2048 --layers 8    # 3 tags of a 134 MB fp32 model
    python bench/zero3.py measure /tmp/z3

`measure` runs each tool as its own process and reports wall time and peak RSS (`wait4` rusage):
zero_to_fp32 on one tag, ckptavg on the same tag (a copy of one checkpoint), and the average of all tags:
ckptavg streaming against zero_to_fp32's state dicts averaged in memory (what a user without ckptavg writes).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WORLD = 2


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _worker(rank: int, out: str, port: int, width: int, layers: int, tags: int) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    import deepspeed
    import torch

    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
    cfg = {"train_batch_size": 2 * WORLD, "train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 3},
           "optimizer": {"type": "Adam", "params": {"lr": 1e-3, "torch_adam": True}}, "steps_per_print": 10**6}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    for step in range(1, tags + 1):
        loss = engine(torch.randn(2, width)).square().mean()
        engine.backward(loss)
        engine.step()
        engine.save_checkpoint(out, tag=f"global_step{step}")


def make(out: Path, width: int, layers: int, tags: int) -> None:
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(str(out), _port(), width, layers, tags), nprocs=WORLD)


def _measured(cmd: list[str]) -> tuple[float, float]:
    """(wall s, peak RSS MiB) of `cmd` run as a child process."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(REPO)})
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}")
    return wall, usage.ru_maxrss / 1024


_AVERAGE_WITH_ZERO_TO_FP32 = """
import sys, torch
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
from safetensors.torch import save_file
folder, tags, out = sys.argv[1], sys.argv[2].split(","), sys.argv[3]
total = None
for tag in tags:
    sd = get_fp32_state_dict_from_zero_checkpoint(folder, tag=tag)
    sd = {k: v.double() for k, v in sd.items()}
    total = sd if total is None else {k: total[k] + v for k, v in sd.items()}
    del sd
save_file({k: (v / len(tags)).float().contiguous() for k, v in total.items()}, out)
"""

_ONE_TAG_WITH_ZERO_TO_FP32 = """
import sys
from deepspeed.utils.zero_to_fp32 import convert_zero_checkpoint_to_fp32_state_dict
convert_zero_checkpoint_to_fp32_state_dict(sys.argv[1], sys.argv[3], tag=sys.argv[2], safe_serialization=True)
"""


def measure(folder: Path) -> None:
    tags = sorted((p.name for p in folder.glob("global_step*")), key=lambda t: int(t.removeprefix("global_step")))
    py = sys.executable
    out = folder.parent / f"{folder.name}-out"
    out.mkdir(exist_ok=True)
    size = sum(f.stat().st_size for f in (folder / tags[0]).glob("*model_states.pt")) / 2**20
    print(f"{len(tags)} tags; one tag's model-state files {size:.1f} MiB; python {sys.version.split()[0]}")
    rows = [
        ("import torch (floor)", [py, "-c", "import torch"]),
        ("zero_to_fp32, one tag", [py, "-c", _ONE_TAG_WITH_ZERO_TO_FP32, str(folder), tags[-1], str(out / "z.bin")]),
        ("ckptavg, one tag", [py, "-m", "ckptavg", "swa", str(folder / tags[-1]), "-o", str(out / "c1.safetensors"),
                              "-f", "-q"]),
        (f"zero_to_fp32 x{len(tags)} + mean in memory",
         [py, "-c", _AVERAGE_WITH_ZERO_TO_FP32, str(folder), ",".join(tags), str(out / "zavg.safetensors")]),
        (f"ckptavg swa of {len(tags)} tags", [py, "-m", "ckptavg", "swa", str(folder), "-o", str(out / "cavg.safetensors"),
                                              "-f", "-q"]),
    ]
    print("| tool | wall s | peak RSS MiB |\n|---|---|---|")
    for name, cmd in rows:
        wall, rss = _measured(cmd)
        print(f"| {name} | {wall:.2f} | {rss:.0f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make")
    m.add_argument("out", type=Path)
    m.add_argument("--width", type=int, default=2048)
    m.add_argument("--layers", type=int, default=8)
    m.add_argument("--tags", type=int, default=3)
    r = sub.add_parser("measure")
    r.add_argument("folder", type=Path)
    a = p.parse_args()
    if a.cmd == "make":
        make(a.out, a.width, a.layers, a.tags)
    else:
        measure(a.folder)


if __name__ == "__main__":
    main()
