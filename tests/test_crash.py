"""Crash safety: a signal, a kill or a full disk during a long write never leaves a partial file at the
output path; and `verify_output` (`--verify`) catches a written file that was altered afterwards.

The signal tests run `python -m ckptavg swa` as a real process on four ~64 MB checkpoints (made once per
module) and signal it while the temp file `.<output name>.*.ckptavg-partial` is growing, so the signal
lands mid-write. The full-disk tests cap the file size of the child with RLIMIT_FSIZE.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import struct
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ckptavg import average_checkpoints, plan_checkpoints
from ckptavg.errors import OutputError
from ckptavg.layout import TensorSpec
from ckptavg.write.placing import TEMP_SUFFIX
from ckptavg.write.verify import verify_output

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="signals and RLIMIT_FSIZE as on Linux")

CHECKPOINTS = 4
TENSORS = 32
SHAPE = (512, 1024)  # float32: 2 MiB per tensor, 64 MiB per checkpoint
OUTPUT_BYTES = TENSORS * SHAPE[0] * SHAPE[1] * 4


@pytest.fixture(scope="module")
def big_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four 64 MiB checkpoints: averaging them takes long enough to signal the process mid-write."""
    run = tmp_path_factory.mktemp("big_run")
    for i in range(CHECKPOINTS):
        save_file({f"layer{j:02d}.weight": torch.full(SHAPE, float(i + j)) for j in range(TENSORS)},
                  run / f"step={100 * (i + 1)}.safetensors")
    return run


def temp_files(folder: Path) -> list[Path]:
    return sorted(folder.glob(f".*{TEMP_SUFFIX}"))


def start_average(inputs: Path, output: Path, **popen: object) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if k != "CKPTAVG_DEBUG"}
    return subprocess.Popen([sys.executable, "-m", "ckptavg", "swa", str(inputs), "-o", str(output), "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, **popen)  # type: ignore[call-overload]


def written(proc: subprocess.Popen[str]) -> int:
    """Bytes the process has passed to write() so far (the temp file is allocated whole at once, so its
    size does not tell how far the writing is)."""
    try:
        io = Path(f"/proc/{proc.pid}/io").read_text()
    except OSError:  # the process has just ended
        return 0
    return int(next(line.split()[1] for line in io.splitlines() if line.startswith("wchar:")))


def wait_until_writing(proc: subprocess.Popen[str], folder: Path, timeout: float = 60) -> Path:
    """Poll until the temp file holds the header and some data, but far from all of it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = temp_files(folder)
        if found and found[0].exists() and written(proc) > 1024 * 1024:
            return found[0]
        if proc.poll() is not None:
            break
        time.sleep(0.001)
    proc.kill()
    out, err = proc.communicate()
    raise AssertionError(f"the temp file never grew (exit {proc.returncode}): {err[-2000:]}")


@pytest.mark.parametrize("signum, codes", [(signal.SIGINT, {130}), (signal.SIGTERM, {130, 143})], ids=["SIGINT", "SIGTERM"])
def test_signal_during_write_leaves_nothing(big_run: Path, tmp_path: Path, signum: int, codes: set[int]) -> None:
    """130 is the README's code for an interruption; SIGTERM may also use the conventional 128 + 15."""
    output = tmp_path / "avg.safetensors"
    proc = start_average(big_run, output)
    wait_until_writing(proc, tmp_path)
    assert written(proc) < OUTPUT_BYTES, "the write finished before the signal; make the inputs larger"
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode in codes, (proc.returncode, err)
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "interrupted" in lines[0], err
    assert not output.exists()
    assert temp_files(tmp_path) == []
    assert list(tmp_path.iterdir()) == []


def test_sigkill_leaves_at_most_the_named_temp_file(big_run: Path, tmp_path: Path) -> None:
    output = tmp_path / "avg.safetensors"
    proc = start_average(big_run, output)
    temp = wait_until_writing(proc, tmp_path)
    proc.kill()
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not output.exists()
    left = list(tmp_path.iterdir())
    assert left == [temp], left  # only the clearly named temp file: hidden, .avg.safetensors.*.ckptavg-partial
    assert temp.name.startswith(".avg.safetensors.") and temp.name.endswith(TEMP_SUFFIX)


def _limit_file_size(ignore_sigxfsz: bool) -> Callable[[], None]:
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (4 * 1024 * 1024, 4 * 1024 * 1024))
        if ignore_sigxfsz:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        else:  # what a shell with `ulimit -f` hands over: the default action, a core dump
            signal.signal(signal.SIGXFSZ, signal.SIG_DFL)

    return limit


def test_file_size_limit_does_not_kill_the_process(big_run: Path, tmp_path: Path) -> None:
    """With SIGXFSZ at its default action (what a shell with `ulimit -f` hands over) the kernel would kill the
    process with a core dump when the file reaches the limit. CPython ignores SIGXFSZ at startup, so write()
    fails with EFBIG instead and ckptavg can report it; this guards that the CLI keeps it that way."""
    output = tmp_path / "avg.safetensors"
    proc = start_average(big_run, output, preexec_fn=_limit_file_size(ignore_sigxfsz=False))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, (proc.returncode, err)  # -SIGXFSZ (-25) if the signal had killed it
    assert "File too large" in err
    assert not output.exists()


def test_full_disk_is_one_error_line(big_run: Path, tmp_path: Path) -> None:
    """RLIMIT_FSIZE of 4 MiB for a 64 MiB output: write() fails with EFBIG, as it fails with ENOSPC on a full disk."""
    output = tmp_path / "avg.safetensors"
    proc = start_average(big_run, output, preexec_fn=_limit_file_size(ignore_sigxfsz=True))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, (proc.returncode, err)
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "avg.safetensors" in lines[0], err
    assert not output.exists()
    assert list(tmp_path.iterdir()) == [], "the temp file was left behind"


@pytest.mark.parametrize("exc", [KeyboardInterrupt, OSError])
def test_failure_mid_stream_in_process(tmp_path: Path, exc: type[BaseException]) -> None:
    """The deterministic twin of the signal tests: the progress callback raises after the first tensors."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    for i in range(2):
        save_file({f"t{j}": torch.full((256, 256), float(i + j)) for j in range(8)}, inputs / f"c{i}.safetensors")
    output = tmp_path / "out" / "avg.safetensors"
    output.parent.mkdir()
    calls = 0

    def progress(done: int, total: int) -> None:
        nonlocal calls
        calls += 1
        if calls == 3:  # of 4: progress is reported once per batch of 128 Ki elements (two tensors here)
            assert temp_files(output.parent), "the temp file should exist while streaming"
            raise exc("stop")

    with pytest.raises(exc):
        average_checkpoints(inputs, output, progress=progress)
    assert calls == 3
    assert list(output.parent.iterdir()) == []


# ---------------------------------------------------------------- verify_output


def _written(tmp_path: Path) -> tuple[Path, list[TensorSpec]]:
    """An average written by ckptavg, and the specs it was written from."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    for i in range(3):
        g = torch.Generator().manual_seed(i)
        save_file({"a.weight": torch.randn(6, 5, generator=g), "a.bias": torch.randn(5, generator=g).half(),
                   "b.scale": torch.randn(4, generator=g).bfloat16(), "steps": torch.tensor(i + 1)},
                  inputs / f"step={i + 1}.safetensors")
    output = tmp_path / "avg.safetensors"
    average_checkpoints(inputs, output)
    return output, plan_checkpoints(inputs).specs


def _header(path: Path) -> tuple[int, dict[str, dict[str, object]]]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return n, json.loads(raw[8:8 + n])


def _rewrite_header(path: Path, edit: Callable[[dict[str, dict[str, object]]], None]) -> None:
    """Edit the header's JSON and write it back padded to its old length, leaving the data untouched."""
    n, header = _header(path)
    edit(header)
    raw = json.dumps(header, separators=(",", ":")).encode()
    assert len(raw) <= n
    data = path.read_bytes()
    path.write_bytes(data[:8] + raw + b" " * (n - len(raw)) + data[8 + n:])


def _poke(path: Path, key: str, index: int, value: torch.Tensor) -> None:
    """Overwrite element `index` of tensor `key` in the file with `value` (same dtype)."""
    n, header = _header(path)
    begin = header[key]["data_offsets"][0]  # type: ignore[index]
    at = 8 + n + begin + index * value.element_size()
    data = bytearray(path.read_bytes())
    data[at:at + value.element_size()] = value.view(torch.uint8).numpy().tobytes()
    path.write_bytes(bytes(data))


def test_verify_accepts_what_was_written(tmp_path: Path) -> None:
    output, specs = _written(tmp_path)
    verify_output(output, specs, check_finite=True)


@pytest.mark.parametrize(
    "key, dtype, value",
    [("a.weight", torch.float32, float("nan")), ("a.bias", torch.float16, float("inf")),
     ("b.scale", torch.bfloat16, float("-inf"))],
)
def test_verify_catches_nonfinite_injected_after_writing(tmp_path: Path, key: str, dtype: torch.dtype, value: float) -> None:
    output, specs = _written(tmp_path)
    _poke(output, key, 3, torch.tensor([value], dtype=dtype))
    verify_output(output, specs, check_finite=False)  # layout still right: only the finiteness check sees it
    with pytest.raises(OutputError) as info:
        verify_output(output, specs, check_finite=True)
    message = str(info.value)
    assert str(output) in message and f"'{key}'" in message and "index 3" in message


@pytest.mark.parametrize(
    "edit, words",
    [
        (lambda h: h["a.weight"].update(shape=[5, 6]), ["'a.weight'", "shape", "[5, 6]", "[6, 5]"]),
        (lambda h: h["b.scale"].update(dtype="F16"), ["'b.scale'", "F16", "BF16"]),
        (lambda h: h.__setitem__("a.wEight", h.pop("a.weight")), ["'a.weight'", "missing", "'a.wEight'"]),
        (lambda h: h["a.weight"].update(dtype="I32"), ["'a.weight'", "I32", "F32"]),
    ],
    ids=["shape-changed", "dtype-changed-same-size", "key-renamed", "float-became-int"],
)
def test_verify_catches_a_header_altered_after_writing(tmp_path: Path, edit: Callable[..., None], words: list[str]) -> None:
    output, specs = _written(tmp_path)
    _rewrite_header(output, edit)
    with pytest.raises(OutputError) as info:
        verify_output(output, specs, check_finite=False)
    message = str(info.value)
    assert str(output) in message
    for word in words:
        assert word in message, (word, message)


def test_verify_catches_truncation_and_trailing_bytes(tmp_path: Path) -> None:
    output, specs = _written(tmp_path)
    good = output.read_bytes()
    output.write_bytes(good[:-3])
    with pytest.raises(OutputError, match="avg.safetensors"):
        verify_output(output, specs, check_finite=False)
    # trailing bytes: ckptavg's reader tolerates them, safetensors does not; verify uses both
    output.write_bytes(good + b"\0" * 8)
    with pytest.raises(OutputError, match="safetensors"):
        verify_output(output, specs, check_finite=False)


def test_verify_catches_specs_that_differ(tmp_path: Path) -> None:
    """The other direction: an intact file checked against the plan of another layout."""
    output, specs = _written(tmp_path)
    extra = [*specs, TensorSpec("c.weight", (2,), torch.float32, torch.float32)]
    with pytest.raises(OutputError, match="'c.weight' is missing"):
        verify_output(output, extra, check_finite=False)
    with pytest.raises(OutputError, match="unexpected"):
        verify_output(output, specs[1:], check_finite=False)


def test_verify_reads_in_blocks_and_finds_a_late_nan(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A tensor of 12 MiB checked in 1 MiB blocks: Python-side memory stays at one block, and a NaN in the
    last block is reported at its true flat index."""
    import ckptavg.write.verify as verify

    monkeypatch.setattr(verify, "BLOCK_BYTES", 1024 * 1024)
    path = tmp_path / "big.safetensors"
    numel = 3 * 1024 * 1024
    save_file({"w": torch.ones(numel)}, path)
    spec = TensorSpec("w", (numel,), torch.float32, torch.float32)
    tracemalloc.start()
    try:
        verify_output(path, [spec], check_finite=True)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 3 * 1024 * 1024, peak
    _poke(path, "w", numel - 2, torch.tensor([float("nan")]))
    with pytest.raises(OutputError, match=f"index {numel - 2}"):
        verify_output(path, [spec], check_finite=True)


def test_cli_verify_passes_and_changes_nothing(tmp_path: Path) -> None:
    """--verify on a sound run: the same bytes as without it."""
    from typer.testing import CliRunner

    from ckptavg.cli.app import app

    output, _ = _written(tmp_path)
    again = tmp_path / "verified.safetensors"
    result = CliRunner().invoke(app, ["swa", str(tmp_path / "in"), "-o", str(again), "--verify", "--quiet"])
    assert result.exit_code == 0, result.output
    assert again.read_bytes() == output.read_bytes()


def test_cli_verify_failure_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file damaged between writing and the check (a NaN poked into its data) fails --verify: one Error line
    naming the tensor, and neither the output nor the temp file is left."""
    from typer.testing import CliRunner

    import ckptavg.write.output as api
    from ckptavg.cli.app import app

    real = api.verify_output

    def damage_then_verify(path: Path, specs: list[TensorSpec], check_finite: bool) -> None:
        _poke(path, "a.weight", 0, torch.tensor([float("nan")]))
        real(path, specs, check_finite)

    monkeypatch.setattr(api, "verify_output", damage_then_verify)
    _written(tmp_path)
    out = tmp_path / "out" / "avg.safetensors"
    out.parent.mkdir()
    result = CliRunner().invoke(app, ["swa", str(tmp_path / "in"), "-o", str(out), "--verify"])
    assert result.exit_code == 1, result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "'a.weight'" in lines[0], result.stderr
    assert list(out.parent.iterdir()) == []
