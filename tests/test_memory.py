"""Peak memory does not grow with the number of checkpoints averaged.

For each input format, `python -m ckptavg swa DIR -o OUT --quiet` runs as a fresh process on 2 and on
12 checkpoints of a ~53 MB model; the peak RSS of each run is read from getrusage in a tiny wrapper
process. Streaming one tensor at a time, the difference must stay well below one checkpoint.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss units and MALLOC_MMAP_THRESHOLD_ are Linux/glibc"),
]

BIG = 24  # float32 tensors of 1100 x 500 (2.2 MB each): 52.8 MB per checkpoint
BIG_SHAPE = (1100, 500)
SMALL = 3
FEW, MANY = 2, 12

# Runs the command given as its arguments and prints the child's peak RSS (KiB on Linux).
PEAK_RSS = (
    "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True); "
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
)


def tensor(ckpt: int, name: str) -> torch.Tensor:
    """The seeded value of one tensor of one checkpoint, so a reference can rebuild any tensor alone."""
    seed = 1_000 * ckpt + NAMES.index(name)
    shape = BIG_SHAPE if name.startswith("big") else BIG_SHAPE[1:]
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def step_of(ckpt: int) -> int:
    return 100 * (ckpt + 1)


NAMES = [f"big{j}.weight" for j in range(BIG)] + [f"small{j}.bias" for j in range(SMALL)]


def state_dict(ckpt: int) -> dict[str, torch.Tensor]:
    sd = {name: tensor(ckpt, name) for name in NAMES}
    sd["tracked.num_batches"] = torch.tensor(step_of(ckpt), dtype=torch.int64)  # an int64 scalar
    return sd


def write_run(folder: Path, fmt: str, count: int) -> list[Path]:
    folder.mkdir(parents=True)
    paths = []
    for i in range(count):
        path = folder / f"step={step_of(i)}.{fmt}"
        sd = state_dict(i)
        if fmt == "pt":
            torch.save(sd, path)
        else:
            save_file(sd, path)
        paths.append(path)
    return paths


def peak_rss_kib(inputs: Path, output: Path) -> int:
    env = dict(os.environ)
    env.pop("CKPTAVG_DEBUG", None)
    # Fix glibc's mmap threshold (setting it disables the dynamic adjustment): freed multi-MB buffers then go
    # back to the OS at once, so the peak reflects live memory rather than glibc's heap caching, which varies
    # by 10-20 MB from run to run independently of the number of checkpoints.
    env["MALLOC_MMAP_THRESHOLD_"] = str(128 * 1024)
    proc = subprocess.run(
        [sys.executable, "-c", PEAK_RSS, sys.executable, "-m", "ckptavg", "swa", str(inputs), "-o", str(output),
         "--quiet"],
        capture_output=True, text=True, timeout=120, env=env,
    )
    assert proc.returncode == 0, proc.stderr
    return int(proc.stdout.split()[-1])


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_peak_memory_does_not_grow_with_checkpoint_count(tmp_path: Path, fmt: str) -> None:
    work = tmp_path / fmt
    try:
        many = write_run(work / "many", fmt, MANY)
        few_dir = work / "few"
        few_dir.mkdir()
        for p in many[:FEW]:  # the same bytes: link, do not rewrite
            try:
                os.link(p, few_dir / p.name)
            except OSError:
                shutil.copy(p, few_dir / p.name)
        one_checkpoint = min(p.stat().st_size for p in many)
        assert one_checkpoint > 50 * 10**6

        out_few, out_many = work / "few.safetensors", work / "many.safetensors"
        peaks = {FEW: peak_rss_kib(few_dir, out_few), MANY: peak_rss_kib(work / "many", out_many)}
        growth = (peaks[MANY] - peaks[FEW]) * 1024
        print(f"\n{fmt}: peak RSS {FEW} checkpoints {peaks[FEW] / 1024:.1f} MiB, {MANY} checkpoints "
              f"{peaks[MANY] / 1024:.1f} MiB, growth {growth / 2**20:.1f} MiB, one checkpoint "
              f"{one_checkpoint / 2**20:.1f} MiB")
        assert growth < one_checkpoint / 4, (peaks, one_checkpoint)

        # The streamed result is right: compare a few tensors with the mean computed here.
        for out, count in ((out_few, FEW), (out_many, MANY)):
            with safe_open(out, "pt") as f:
                assert set(f.keys()) == {*NAMES, "tracked.num_batches"}
                for name in ("big0.weight", f"big{BIG - 1}.weight", "small1.bias"):
                    expected = torch.stack([tensor(i, name).double() for i in range(count)]).mean(0).float()
                    torch.testing.assert_close(f.get_tensor(name), expected)
                # integer buffers are copied from the newest checkpoint
                assert torch.equal(f.get_tensor("tracked.num_batches"), torch.tensor(step_of(count - 1)))
    finally:
        shutil.rmtree(work, ignore_errors=True)

