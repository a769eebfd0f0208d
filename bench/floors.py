"""The floor the speed target is measured against: one float32 streaming pass over the input bytes, in process.

Reads every input file once in 4 MiB pieces into a reused buffer (readinto: no mapping) and adds each
piece, viewed as the checkpoint's dtype, into a float32 accumulator. Prints the seconds of the pass alone: the best of
three, with one torch thread and with the default number.

    python bench/floors.py DIR float32|bfloat16
"""

import sys
import time
from pathlib import Path

import torch

PIECE = 4 * 2**20


def main() -> None:
    files = sorted(p for p in Path(sys.argv[1]).iterdir() if p.is_file())
    dtype = getattr(torch, sys.argv[2])
    best = min(one_pass(files, dtype, threads) for threads in (1, torch.get_num_threads()) for _ in range(3))
    print(f"{best:.4f}")


def one_pass(files: list[Path], dtype: torch.dtype, threads: int) -> float:
    torch.set_num_threads(threads)
    buf = torch.empty(PIECE, dtype=torch.uint8)
    acc = torch.zeros(PIECE // dtype.itemsize, dtype=torch.float32)
    mv = memoryview(buf.numpy())
    start = time.perf_counter()
    for p in files:
        with open(p, "rb", buffering=0) as f:
            while n := f.readinto(mv):
                k = n // dtype.itemsize
                acc[:k].add_(buf[: k * dtype.itemsize].view(dtype))
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
