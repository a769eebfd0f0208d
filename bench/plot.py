"""Draw bench/scaling.png from the scaling rows of bench/results.jsonl (run `python bench/run.py scaling` first).

    pip install matplotlib   # only for this plot; ckptavg does not need it
    python bench/plot.py
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).resolve().parent


def main() -> None:
    rows = [json.loads(line) for line in (HERE / "results.jsonl").read_text().splitlines() if line.strip()]
    latest: dict[tuple[int, int], dict[str, float]] = {}
    for r in rows:
        if r.get("bench") == "scaling":
            latest[(r["size"], r["n"])] = r  # the newest run of each point wins
    by_size: dict[int, list[tuple[int, float, float]]] = defaultdict(list)
    imports = []
    for (size, n), r in sorted(latest.items()):
        # wall time as measured: ckptavg skips the interpreter's teardown, which `import torch` pays, so a
        # difference of the two can be negative for small runs; the floor is drawn as a line instead
        by_size[size].append((n, r["wall"], r["rss"] - r["import_rss"]))
        imports.append(r["import_wall"])
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(10, 4))
    for size, pts in sorted(by_size.items()):
        ns = [p[0] for p in pts]
        ax_t.plot(ns, [p[1] for p in pts], "o-", label=f"{size} MiB each")
        ax_m.plot(ns, [p[2] for p in pts], "o-", label=f"{size} MiB each")
    floor = sorted(imports)[len(imports) // 2]
    ax_t.axhline(floor, color="grey", linestyle="--", label=f"`import torch` ({floor:.2f} s, median)")
    ax_t.set(xlabel="checkpoints N", ylabel="wall s", title="ckptavg swa: time", xticks=[2, 4, 8, 16])
    ax_m.set(xlabel="checkpoints N", ylabel="peak RSS MiB minus `import torch`", title="ckptavg swa: memory",
             xticks=[2, 4, 8, 16])
    ax_t.set_ylim(bottom=0)
    ax_m.set_ylim(0, 60)  # from zero: the growth from 2 to 16 checkpoints is ~1.5 MiB, not a slope
    for ax in (ax_t, ax_m):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(HERE / "scaling.png", dpi=110)
    print(HERE / "scaling.png")


if __name__ == "__main__":
    main()
