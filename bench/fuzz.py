"""Run the fuzz targets of tests/test_fuzz.py for much longer than the test suite does, by hand.

    python bench/fuzz.py --examples 200000                 # split evenly over every target
    python bench/fuzz.py --examples 20000 --targets safetensors-header torch-zip-repacked --save /tmp/findings

Each target runs in chunks of random (not derandomised) hypothesis examples with a fresh seed per chunk, so a
failure in one chunk does not end the run: it is recorded (exception and message, de-duplicated), its
shrunk input is saved when --save is given, and the next chunk continues. The address space is capped
(--memory-gib), so an absurd allocation shows as a MemoryError finding instead of swapping the machine.

The property checked is tests/test_fuzz.check_file: opening the bytes and loading every tensor either works
(and agrees with safetensors/torch.load where they read the file too) or raises a CkptavgError, within
HANG_SECONDS; for the folder targets of tests/test_fuzz_sidecars.py (a Hugging Face index or trainer_state.json,
a DCP .metadata) the same for the folder, and no tensor read from outside it. Exit status 1 when anything was
found.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis.strategies import SearchStrategy

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import test_fuzz  # noqa: E402 - the targets and the checker live with the tests
import test_fuzz_sidecars  # noqa: E402

Check = Callable[[bytes, Path], None]
# name: (strategy, check(data, scratch)); file targets write one file, folder targets a file of a folder
TARGETS: dict[str, tuple[Callable[[], SearchStrategy[bytes]], Check]] = {
    **{name: (strategy, lambda data, scratch: test_fuzz.check_file(data, scratch / "input.bin"))
       for name, strategy in test_fuzz.TARGETS.items()},
    **test_fuzz_sidecars.FOLDER_TARGETS,
}

CHUNK = 2000  # examples per hypothesis run: a finding costs at most the rest of one chunk


def main() -> int:
    args = parse_args()
    if args.memory_gib:
        limit = args.memory_gib * 2**30
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    targets = args.targets or list(TARGETS)
    per_target = max(args.examples // len(targets), 1)
    work = Path(tempfile.mkdtemp(prefix="ckptavg-fuzz-"))
    started = time.monotonic()
    counts: Counter[str] = Counter()
    findings: dict[str, tuple[str, bytes]] = {}
    for name in targets:
        t0 = time.monotonic()
        counts[name] = fuzz_target(name, per_target, args.seed, work, findings, args.save)
        print(f"{name}: {counts[name]} examples in {time.monotonic() - t0:.0f} s, "
              f"{sum(1 for k in findings if k.startswith(name + ':'))} distinct findings", flush=True)
    print(f"\n{sum(counts.values())} examples over {len(targets)} targets in {time.monotonic() - started:.0f} s "
          f"(seed {args.seed}); {len(findings)} distinct findings")
    for key, (where, _) in findings.items():
        print(f"\n== {key}\n{where}")
    return 1 if findings else 0


def fuzz_target(name: str, examples: int, base_seed: int, work: Path, findings: dict[str, tuple[str, bytes]],
                save: Path | None) -> int:
    make, check = TARGETS[name]
    strategy = make()
    ran = 0
    last = b""
    for chunk in range(10**9):
        if ran >= examples:
            break
        before = ran

        @settings(max_examples=min(CHUNK, examples - ran), deadline=None, derandomize=False, database=None,
                  phases=[Phase.generate, Phase.shrink], report_multiple_bugs=False,
                  suppress_health_check=list(HealthCheck))
        @seed(base_seed * 1_000_003 + chunk)
        @given(strategy)
        def run(data: bytes) -> None:
            nonlocal ran, last
            ran += 1
            last = data
            check(data, work)

        try:
            run()
        except Exception as e:  # noqa: BLE001 - every failure is a finding to record, then the run goes on
            record(name, e, last, findings, save)
        if ran == before:  # the strategy is exhausted
            break
    return ran


def record(target: str, error: BaseException, data: bytes, findings: dict[str, tuple[str, bytes]], save: Path | None) -> None:
    first = (str(error).strip().splitlines() or [""])[0][:160]
    key = f"{target}: {type(error).__name__}: {first}"
    if key in findings:
        return
    where = "".join(traceback.format_tb(error.__traceback__)[-3:]) + f"{type(error).__name__}: {first}"
    findings[key] = (where, data)
    if save:
        save.mkdir(parents=True, exist_ok=True)
        path = save / f"{target}-{len(findings)}.bin"
        path.write_bytes(data)
        where += f"\ninput saved to {path}"
        findings[key] = (where, data)
    print(f"  finding: {key}", flush=True)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=50_000, help="total examples, split over the targets")
    parser.add_argument("--targets", nargs="*", choices=list(TARGETS), help="default: every target")
    parser.add_argument("--seed", type=int, default=int(time.time()), help="base of the per-chunk seeds")
    parser.add_argument("--memory-gib", type=int, default=16, help="address-space cap (0: none)")
    parser.add_argument("--save", type=Path, help="folder for the shrunk input of each finding")
    return parser.parse_args()


if __name__ == "__main__":
    sys.exit(main())
