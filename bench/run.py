"""Benchmark runner: ckptavg against what users would pick instead, each as its own process.

    python bench/run.py speed      # 8 x 100 and 8 x 500 MiB, fp32 and bf16, safetensors and .pt
    python bench/run.py scaling    # N = 2, 4, 8, 16 x 50, 100, 500 MiB (safetensors fp32)
    python bench/run.py memory     # peak RSS, 2 vs 16 checkpoints, 100 MiB and 500 MiB
    python bench/run.py distributed  # 4 x 2 GiB sharded transformer: 1 process vs torchrun with 2
    python bench/run.py sweep      # 8 x 100 MiB: 1 output row, 5 rows from one read, 5 separate runs (issue 19)
    python bench/run.py outputs    # 8 x 100 MiB: the same average written as safetensors and as a torch .pt

Checkpoints are generated once under --data (default /tmp/ckptavg-bench, about 20 GB for everything).
Every command runs once to warm the page cache, then --reps times; the median wall time and peak RSS
(from wait4's rusage of that one process) are reported. Results are appended as JSON lines to
bench/results.jsonl and printed as markdown tables, which bench/RESULTS.md quotes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PY = sys.executable
MiB = 2**20
# Installed packages run from cached bytecode. A shell that sets PYTHONDONTWRITEBYTECODE (this sandbox
# does) would make every run compile ckptavg's ~30 modules from source, 0.09 s that no user pays.
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def measure(cmd: list[str], reps: int, fresh: Path | list[Path] | None = None) -> dict[str, float]:
    """Median wall seconds and peak RSS (MiB) of `cmd` over `reps` runs, after one warm-up run.

    `fresh`: an output file removed (untimed) before each run, so that every tool writes a new file, as
    a user does; overwriting costs ~0.1-0.3 s more in the file system, whoever writes.
    """
    walls, rss, out = [], [], ""
    for i in range(reps + 1):
        for path in [fresh] if isinstance(fresh, Path) else fresh or []:
            path.unlink(missing_ok=True)
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        out = proc.stdout.read().decode() if proc.stdout else ""
        err = proc.stderr.read().decode() if proc.stderr else ""
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err}")
        if i:  # the first run only warms the page cache
            walls.append(wall)
            rss.append(usage.ru_maxrss / 1024)
    return {"wall": statistics.median(walls), "rss": statistics.median(rss), "stdout": out.strip()}


def dataset(data: Path, mix: str, size: int, dtype: str, fmt: str, n: int) -> Path:
    """A folder with at least `n` checkpoints of this kind, generated when missing."""
    d = data / f"{mix}-{size}-{dtype}-{fmt}"
    have = len(list(d.iterdir())) if d.is_dir() else 0
    if have < n:
        subprocess.run([PY, str(HERE / "make_ckpts.py"), "--mix", mix, "--size-mib", str(size), "--n", str(n),
                        "--dtype", dtype, "--format", fmt, "--out", str(d)], check=True)
    return d


def first_n(d: Path, n: int, scratch: Path) -> Path:
    """A folder of symlinks to the first `n` checkpoints of `d` (so N can vary over one generated set)."""
    sub = scratch / f"{d.name}-n{n}"
    if not sub.is_dir():
        sub.mkdir(parents=True)
        for p in sorted(d.iterdir())[:n]:
            (sub / p.name).symlink_to(p)
    return sub


def tools(inputs: Path, out: Path, dtype: str) -> dict[str, list[str]]:
    return {
        "ckptavg": [PY, "-m", "ckptavg", "swa", str(inputs), "-o", str(out), "--force", "-q"],
        "naive": [PY, str(HERE / "baselines" / "naive_sum.py"), str(inputs), str(out)],
        "swa_utils": [PY, str(HERE / "baselines" / "swa_utils_loop.py"), str(inputs), str(out)],
    }


def record(row: dict[str, object]) -> None:
    with open(HERE / "results.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")


def speed(a: argparse.Namespace) -> None:
    print("| mix | size | dtype | format | tool | wall s | peak RSS MiB | RSS - import torch | floor s | wall / floor |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for size in a.sizes:
        for dtype in a.dtypes:
            for fmt in a.formats:
                # the `import torch` floor is measured next to each configuration: on this VM it drifted by
                # 0.5 s (1.25-1.79 s) within one run, more than the differences being measured
                base = measure([PY, "-c", "import torch"], a.reps)
                d = dataset(a.data, a.mix, size, dtype, fmt, 8)
                d8 = first_n(d, 8, a.data / "views")
                f32 = min(float(measure([PY, str(HERE / "floors.py"), str(d8), dtype], 1)["stdout"]) for _ in range(2))
                floor = base["wall"] + f32
                out = a.data / "out.safetensors"
                for tool, cmd in tools(d8, out, dtype).items():
                    if tool != "ckptavg" and a.only_ckptavg:
                        continue
                    m = measure(cmd, a.reps, fresh=out)
                    row = {"bench": "speed", "mix": a.mix, "size": size, "dtype": dtype, "format": fmt, "n": 8,
                           "tool": tool, "wall": m["wall"], "rss": m["rss"], "import_wall": base["wall"],
                           "import_rss": base["rss"], "f32_pass": f32}
                    record(row)
                    print(f"| {a.mix} | {size} | {dtype} | {fmt} | {tool} | {m['wall']:.2f} | {m['rss']:.0f} | "
                          f"{m['rss'] - base['rss']:.1f} | {floor:.2f} | {m['wall'] / floor:.2f} |", flush=True)


def scaling(a: argparse.Namespace) -> None:
    base = measure([PY, "-c", "import torch"], a.reps)
    print("| size MiB | N | wall s | peak RSS MiB | RSS - import torch |")
    print("|---|---|---|---|---|")
    for size in a.sizes:
        d = dataset(a.data, a.mix, size, "float32", "safetensors", max(a.ns))
        for n in a.ns:
            out = a.data / "out.safetensors"
            m = measure(tools(first_n(d, n, a.data / "views"), out, "float32")["ckptavg"], a.reps, fresh=out)
            record({"bench": "scaling", "mix": a.mix, "size": size, "n": n, "tool": "ckptavg", "wall": m["wall"],
                    "rss": m["rss"], "import_wall": base["wall"], "import_rss": base["rss"]})
            print(f"| {size} | {n} | {m['wall']:.2f} | {m['rss']:.0f} | {m['rss'] - base['rss']:.1f} |", flush=True)


def distributed(a: argparse.Namespace) -> None:
    """One process against torchrun with 2 processes, on a sharded multi-GB transformer (issue 7)."""
    d = dataset(a.data, "transformer", a.sizes[0], "float32", "hf-sharded", 4)
    out = a.data / "dist-out"
    single = [PY, "-m", "ckptavg", "swa", str(d), "-o", f"{out}/", "--max-shard-size", "1GB", "--force", "-q"]
    two = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", *single[1:]]
    print("| processes | wall s | peak RSS MiB (largest process) |")
    print("|---|---|---|")
    for n, cmd in ((1, single), (2, two)):
        m = measure(cmd, a.reps)
        record({"bench": "distributed", "size": a.sizes[0], "n": 4, "processes": n, "wall": m["wall"], "rss": m["rss"]})
        print(f"| {n} | {m['wall']:.2f} | {m['rss']:.0f} |", flush=True)


DECAYS = ["0.9", "0.95", "0.99", "0.995", "0.999"]


def sweep(a: argparse.Namespace) -> None:
    """One output row against five rows from one read (`ema --decay` with a comma list and an `-o` template)
    and against five separate runs, for each N; the reps are interleaved, so that drift on a shared machine
    hits every variant alike (issue 19: five rows within 1.5 x one row, RSS above one row by the rows'
    accumulator blocks, flat in N)."""
    base = measure([PY, "-c", "import torch"], a.reps)
    size = a.sizes[0]
    d = dataset(a.data, a.mix, size, "float32", "safetensors", max(a.ns))
    print("| N | variant | wall s (median) | wall s (min-max) | / one row | peak RSS MiB | RSS - import torch | "
          "RSS - one row |")
    print("|---|---|---|---|---|---|---|---|")
    for n in a.ns:
        view = first_n(d, n, a.data / "views")
        one = a.data / "one.safetensors"
        many = [a.data / f"sweep-{x}.safetensors" for x in DECAYS]
        cli = [PY, "-m", "ckptavg", "ema", str(view), "--force", "-q", "--decay"]
        separate = " && ".join(f"{PY} -m ckptavg ema {view} --force -q --decay {x} -o {a.data}/sep-{x}.safetensors"
                               for x in DECAYS)
        variants = {
            "1 row": ([*cli, DECAYS[0], "-o", str(one)], [one]),
            "5 rows, one read": ([*cli, ",".join(DECAYS), "-o", str(a.data / "sweep-{decay}.safetensors")], many),
            "5 separate runs": (["sh", "-c", separate], [a.data / f"sep-{x}.safetensors" for x in DECAYS]),
        }
        runs: dict[str, list[dict[str, float]]] = {k: [] for k in variants}
        for _ in range(a.reps):
            for name, (cmd, outs) in variants.items():
                runs[name].append(measure(cmd, 1, fresh=outs))
        ref = statistics.median(r["wall"] for r in runs["1 row"])
        ref_rss = statistics.median(r["rss"] for r in runs["1 row"])
        for name, ms in runs.items():
            walls = [m["wall"] for m in ms]
            wall, rss = statistics.median(walls), statistics.median(m["rss"] for m in ms)
            record({"bench": "sweep", "mix": a.mix, "size": size, "n": n, "variant": name, "wall": wall, "rss": rss,
                    "walls": walls, "import_wall": base["wall"], "import_rss": base["rss"]})
            print(f"| {n} | {name} | {wall:.2f} | {min(walls):.2f}-{max(walls):.2f} | {wall / ref:.2f} | {rss:.0f} | "
                  f"{rss - base['rss']:.1f} | {rss - ref_rss:+.1f} |", flush=True)


def outputs(a: argparse.Namespace) -> None:
    """The same average written as safetensors and as a `.pt` (our streaming torch.save writer), reps
    interleaved (issue 16: the torch writer streams too, so time and memory match safetensors')."""
    base = measure([PY, "-c", "import torch"], a.reps)
    size, n = a.sizes[0], a.ns[0]
    view = first_n(dataset(a.data, a.mix, size, "float32", "safetensors", n), n, a.data / "views")
    variants = {suffix: a.data / f"out{suffix}" for suffix in (".safetensors", ".pt")}
    runs: dict[str, list[dict[str, float]]] = {k: [] for k in variants}
    for _ in range(a.reps):
        for suffix, out in variants.items():
            runs[suffix].append(measure([PY, "-m", "ckptavg", "swa", str(view), "-o", str(out), "-q"], 1, fresh=out))
    print("| N x MiB | output | wall s (median) | wall s (min-max) | peak RSS MiB | RSS - import torch | file MiB |")
    print("|---|---|---|---|---|---|---|")
    for suffix, ms in runs.items():
        walls = [m["wall"] for m in ms]
        wall, rss = statistics.median(walls), statistics.median(m["rss"] for m in ms)
        record({"bench": "outputs", "mix": a.mix, "size": size, "n": n, "output": suffix, "wall": wall, "rss": rss,
                "walls": walls, "import_rss": base["rss"]})
        print(f"| {n} x {size} | `{suffix}` | {wall:.2f} | {min(walls):.2f}-{max(walls):.2f} | {rss:.0f} | "
              f"{rss - base['rss']:.1f} | {variants[suffix].stat().st_size / MiB:.1f} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["speed", "scaling", "memory", "distributed", "sweep", "outputs"])
    ap.add_argument("--data", type=Path, default=Path("/tmp/ckptavg-bench"))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--mix", choices=["resnet", "transformer"], default="resnet")
    ap.add_argument("--sizes", type=int, nargs="+", default=None)
    ap.add_argument("--ns", type=int, nargs="+", default=[2, 4, 8, 16])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--formats", nargs="+", default=["safetensors", "pt"])
    ap.add_argument("--only-ckptavg", action="store_true", help="skip the baselines")
    a = ap.parse_args()
    if a.what == "speed":
        a.sizes = a.sizes or [100, 500]
        speed(a)
    elif a.what == "scaling":
        a.sizes = a.sizes or [50, 100, 500]
        scaling(a)
    elif a.what == "memory":
        a.sizes, a.ns = a.sizes or [100, 500], [2, 16]
        scaling(a)
    elif a.what == "sweep":
        a.sizes, a.ns = a.sizes or [100], a.ns if a.ns != [2, 4, 8, 16] else [8]
        sweep(a)
    elif a.what == "outputs":
        a.sizes, a.ns = a.sizes or [100], a.ns if a.ns != [2, 4, 8, 16] else [8]
        outputs(a)
    else:
        a.sizes = a.sizes or [2048]
        distributed(a)


if __name__ == "__main__":
    main()
