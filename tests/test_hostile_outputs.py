"""Hostile output paths and options (issue 18): racing runs, odd `-o` targets, long names, folders and sidecar
temps left behind on failure, numbers that overflow, strict JSON, user modules that exit.

Every CLI case checks the error contract of test_cli.py: one `Error:` line (exit 1, or 2 for usage), no
traceback, nothing written at the output path, no temp file left, the inputs byte for byte as they were.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import shutil
import socket
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_cli import TEMP_GLOB, partial_files, stderr_lines
from typer.testing import Result

from ckptavg import OutputError
from ckptavg.errors import PlanError
from ckptavg.methods.schedules import ema_step_weights
from ckptavg.results import strict_json
from ckptavg.write import hf_folder
from ckptavg.write.output import OpenOutput
from ckptavg.write.placing import NAME_MAX, TEMP_SUFFIX, place, temp_beside
from ckptavg.write.safetensors import check_output

Cli = Callable[..., Result]
REPO = Path(__file__).resolve().parent.parent


def state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"weight": torch.randn(4, 3, generator=g), "bias": torch.randn(3, generator=g)}


@pytest.fixture
def inputs(tmp_path: Path) -> list[Path]:
    """Two small safetensors checkpoints in their own folder."""
    src = tmp_path / "in"
    src.mkdir()
    paths = [src / "a.safetensors", src / "b.safetensors"]
    for seed, p in enumerate(paths):
        save_file(state(seed), p)
    return paths


def one_error(result: Result, code: int = 1) -> str:
    """The single `Error:` line of a failed run (exit `code`, no traceback, nothing on stdout)."""
    assert result.exit_code == code, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    lines = stderr_lines(result)
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    return lines[0]


def files_as_they_are(root: Path) -> dict[str, str]:
    """Every file (hash), link (target), directory and other file (its kind) under `root`, like test_cli's
    `snapshot` but never opening a FIFO (that would block)."""
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            mode = os.lstat(p).st_mode
            out[str(p)] = ("link -> " + os.readlink(p) if stat.S_ISLNK(mode) else "dir" if stat.S_ISDIR(mode)
                           else hashlib.sha256(p.read_bytes()).hexdigest() if stat.S_ISREG(mode) else f"{mode:o}")
    return out


def refused(cli: Cli, tmp_path: Path, args: list[object], *, code: int = 1) -> str:
    """Run `args`; it must fail with one error line and change nothing under `tmp_path`."""
    before = files_as_they_are(tmp_path)
    line = one_error(cli(*args), code)
    assert files_as_they_are(tmp_path) == before
    assert partial_files(tmp_path) == []
    return line


# ---------------------------------------------------------------- -o that is not a regular file


@pytest.mark.parametrize("force", [False, True])
def test_fifo_output_is_refused_even_with_force(cli: Cli, tmp_path: Path, inputs: list[Path], force: bool) -> None:
    out = tmp_path / "out.safetensors"
    os.mkfifo(out)
    line = refused(cli, tmp_path, ["swa", *inputs, "-o", out, *(["--force"] if force else [])])
    assert "FIFO" in line and "not a regular file" in line
    assert stat.S_ISFIFO(os.lstat(out).st_mode)


@pytest.mark.parametrize("force", [False, True])
def test_socket_output_is_refused_even_with_force(cli: Cli, tmp_path: Path, inputs: list[Path], force: bool) -> None:
    out = tmp_path / "s.safetensors"
    if len(os.fsencode(out)) > 100:  # AF_UNIX paths are short
        pytest.skip("temp path too long for a socket")
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(os.fspath(out))
        line = refused(cli, tmp_path, ["swa", *inputs, "-o", out, *(["--force"] if force else [])])
    finally:
        sock.close()
    assert "socket" in line


def test_device_output_is_refused_even_with_force() -> None:
    """Checked at the library level: a regression here through the CLI with --force would replace /dev/null."""
    with pytest.raises(OutputError, match="character device"):
        check_output(Path("/dev/null"), [], force=True)


def test_place_with_force_never_replaces_a_fifo(tmp_path: Path) -> None:
    """Even if a FIFO appears at the output between the check and the rename, the commit refuses it."""
    final, temp = tmp_path / "out.safetensors", tmp_path / "temp"
    os.mkfifo(final)
    temp.write_bytes(b"x")
    with pytest.raises(OutputError, match="FIFO"):
        place(temp, final, force=True)
    assert stat.S_ISFIFO(os.lstat(final).st_mode)


@pytest.mark.parametrize("force", [False, True])
def test_directory_where_a_folder_output_file_goes_is_refused(cli: Cli, tmp_path: Path, inputs: list[Path],
                                                              force: bool) -> None:
    out = tmp_path / "out"
    (out / "model.safetensors").mkdir(parents=True)
    line = refused(cli, tmp_path, ["swa", *inputs, "-o", f"{out}/", *(["--force"] if force else [])])
    assert "model.safetensors" in line and "directory" in line


def test_dangling_symlink_output_counts_as_existing(cli: Cli, tmp_path: Path, inputs: list[Path]) -> None:
    out, target = tmp_path / "out.safetensors", tmp_path / "elsewhere.safetensors"
    out.symlink_to(target)
    line = refused(cli, tmp_path, ["swa", *inputs, "-o", out])
    assert "already exists" in line and "--force" in line and "symbolic link" in line


def test_dangling_symlink_output_with_force_replaces_the_link_not_its_target(cli: Cli, tmp_path: Path,
                                                                             inputs: list[Path]) -> None:
    out, target = tmp_path / "out.safetensors", tmp_path / "elsewhere.safetensors"
    out.symlink_to(target)
    result = cli("swa", *inputs, "-o", out, "--force")
    assert result.exit_code == 0, result.output
    assert not out.is_symlink() and out.is_file() and not target.exists()
    assert set(load_file(out)) == {"weight", "bias"}


def test_dangling_symlink_as_folder_output_is_refused(cli: Cli, tmp_path: Path, inputs: list[Path]) -> None:
    out = tmp_path / "out"
    out.symlink_to(tmp_path / "nowhere")
    line = refused(cli, tmp_path, ["swa", *inputs, "-o", f"{out}/", "--force"])
    assert "symbolic link to nothing" in line


# ---------------------------------------------------------------- long names


@pytest.mark.parametrize("stem", ["a" * 243, "é" * 121, "ab" + "€" * 80])  # 255, 254 and 254 bytes in all
def test_temp_names_fit_name_max(tmp_path: Path, stem: str) -> None:
    name = stem + ".safetensors"
    assert len(os.fsencode(name)) <= NAME_MAX
    fd, temp = temp_beside(tmp_path, name)
    os.close(fd)
    assert len(os.fsencode(temp.name)) <= NAME_MAX and temp.name.endswith(TEMP_SUFFIX)
    assert temp.name.startswith(".") and temp.match(TEMP_GLOB)
    temp.name.encode()  # cut at a character boundary: still valid UTF-8


def test_longest_legal_output_name_is_written(cli: Cli, tmp_path: Path, inputs: list[Path]) -> None:
    out = tmp_path / ("x" * (NAME_MAX - len(".safetensors")) + ".safetensors")
    result = cli("swa", *inputs, "-o", out)
    assert result.exit_code == 0, result.output
    assert set(load_file(out)) == {"weight", "bias"} and partial_files(tmp_path) == []


# ---------------------------------------------------------------- folders and sidecars on failure


def nan_inputs(tmp_path: Path) -> list[Path]:
    """Two checkpoints whose average fails after the output is opened (a NaN is found while reading)."""
    src = tmp_path / "nan"
    src.mkdir()
    bad = state(1)
    bad["weight"][0, 0] = math.nan
    save_file(state(0), src / "a.safetensors")
    save_file(bad, src / "b.safetensors")
    return [src / "a.safetensors", src / "b.safetensors"]


def test_folder_created_by_a_failed_run_is_removed(cli: Cli, tmp_path: Path) -> None:
    srcs = nan_inputs(tmp_path)
    out = tmp_path / "new"
    line = refused(cli, tmp_path, ["swa", *srcs, "-o", f"{out}/"])
    assert "NaN" in line or "nan" in line.lower()
    assert not out.exists()


def test_several_outputs_in_a_new_parent_folder_removed_on_failure(cli: Cli, tmp_path: Path) -> None:
    srcs = nan_inputs(tmp_path)
    out = tmp_path / "sweep"
    refused(cli, tmp_path, ["ema", *srcs, "--decay", "0.5,0.9", "-o", f"{out}/"])
    assert not out.exists()


def test_existing_folder_is_kept_on_failure(cli: Cli, tmp_path: Path) -> None:
    srcs = nan_inputs(tmp_path)
    out = tmp_path / "there"
    out.mkdir()
    refused(cli, tmp_path, ["swa", *srcs, "-o", f"{out}/"])
    assert out.is_dir() and list(out.iterdir()) == []


def hf_inputs(tmp_path: Path) -> list[Path]:
    """Two Hugging Face folders with three sidecar files each."""
    folders = []
    for seed in range(2):
        d = tmp_path / "hf" / f"checkpoint-{seed + 1}"
        d.mkdir(parents=True)
        save_file(state(seed), d / "model.safetensors")
        for name in ("config.json", "generation_config.json", "tokenizer.json"):
            (d / name).write_text(json.dumps({"name": name, "pad": "x" * 4096}))
        folders.append(d)
    return folders


@pytest.mark.parametrize("existing", [False, True])
def test_disk_full_during_sidecar_copies_leaves_no_temp(cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        existing: bool) -> None:
    folders = hf_inputs(tmp_path)
    out = tmp_path / "out"
    if existing:
        out.mkdir()
    real, calls = shutil.copyfileobj, []

    def full_on_second(src: object, dst: object, *args: object) -> None:
        calls.append(src)
        if len(calls) == 2:
            real(src, dst, 100)  # type: ignore[arg-type]  # part of the file is written, then the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(src, dst, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(hf_folder.shutil, "copyfileobj", full_on_second)
    line = refused(cli, tmp_path, ["swa", *folders, "-o", f"{out}/"])
    assert "No space left" in line and len(calls) == 2
    assert (out.is_dir() and list(out.iterdir()) == []) if existing else not out.exists()


# ---------------------------------------------------------------- exclusive commit


def appear_before_commit(monkeypatch: pytest.MonkeyPatch, content: bytes) -> None:
    """Another run's file appears at each output path after this run finished writing, before it commits."""
    real = OpenOutput.commit

    def commit(self: OpenOutput, lead: bool = True, force: bool = False) -> None:
        for w in self.writers:
            w.path.write_bytes(content)
        real(self, lead, force)

    monkeypatch.setattr(OpenOutput, "commit", commit)


def test_output_appearing_before_the_commit_is_not_replaced(cli: Cli, tmp_path: Path, inputs: list[Path],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out.safetensors"
    appear_before_commit(monkeypatch, b"the other run's")
    line = one_error(cli("swa", *inputs, "-o", out))
    assert "now exists" in line and "--force" in line
    assert out.read_bytes() == b"the other run's" and partial_files(tmp_path) == []


def test_folder_output_appearing_before_the_commit_is_not_replaced(cli: Cli, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    folders = hf_inputs(tmp_path)
    out = tmp_path / "out"
    appear_before_commit(monkeypatch, b"the other run's")
    line = one_error(cli("swa", *folders, "-o", f"{out}/"))
    assert "now exists" in line
    assert [p.name for p in out.iterdir()] == ["model.safetensors"]  # no sidecar of this run, no temp
    assert (out / "model.safetensors").read_bytes() == b"the other run's"


def test_with_force_an_output_appearing_before_the_commit_is_replaced(cli: Cli, tmp_path: Path, inputs: list[Path],
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out.safetensors"
    appear_before_commit(monkeypatch, b"the other run's")
    result = cli("swa", *inputs, "-o", out, "--force")
    assert result.exit_code == 0, result.output
    assert set(load_file(out)) == {"weight", "bias"}


@pytest.mark.parametrize("fallback", ["link", "exclusive-create"])
def test_exclusive_commit_fallbacks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fallback: str) -> None:
    """Without renameat2 (not Linux, old kernel or glibc), and without hard links, the rename stays exclusive."""
    from ckptavg.write import placing as outfile

    monkeypatch.setattr(outfile, "_renameat2", None)
    if fallback == "exclusive-create":
        def no_links(*args: object, **kwargs: object) -> None:
            raise OSError(errno.EPERM, "no hard links here")
        monkeypatch.setattr(outfile.os, "link", no_links)
    temp, final = tmp_path / "t1", tmp_path / "final"
    temp.write_bytes(b"first")
    place(temp, final, force=False)
    assert final.read_bytes() == b"first" and not temp.exists()
    temp.write_bytes(b"second")
    with pytest.raises(OutputError, match="now exists"):
        place(temp, final, force=False)
    assert final.read_bytes() == b"first"


RACER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from ckptavg.cli.app import main
    from ckptavg.write.output import OpenOutput

    me, other = Path(sys.argv[1]), Path(sys.argv[2])
    real = OpenOutput.commit

    def commit(self, lead=True, force=False):
        me.touch()  # both runs have finished writing: commit at the same moment
        deadline = time.monotonic() + 60
        while not other.exists() and time.monotonic() < deadline:
            time.sleep(0.005)
        real(self, lead, force)

    OpenOutput.commit = commit
    sys.argv = ["ckptavg", *sys.argv[3:]]
    main()
""")


def test_two_processes_racing_for_one_output(tmp_path: Path, inputs: list[Path]) -> None:
    out = tmp_path / "out.safetensors"
    racer = tmp_path / "racer.py"
    racer.write_text(RACER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    env.pop("CKPTAVG_DEBUG", None)
    procs = [subprocess.Popen([sys.executable, str(racer), str(tmp_path / f"ready{i}"), str(tmp_path / f"ready{1 - i}"),
                               "swa", *map(str, inputs), "-o", str(out), "-q"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for i in range(2)]
    results = [(p.wait(timeout=120), p.stdout.read(), p.stderr.read()) for p in procs]  # type: ignore[union-attr]
    codes = sorted(rc for rc, _, _ in results)
    assert codes == [0, 1], results
    loser = next(err for rc, _, err in results if rc == 1)
    lines = [ln for ln in loser.splitlines() if ln.strip() and not ln.startswith("Warning: ")]
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "now exists" in lines[0], loser
    assert set(load_file(out)) == {"weight", "bias"} and partial_files(tmp_path) == []


# ---------------------------------------------------------------- options that overflow


@pytest.mark.parametrize("size", ["9" * 400, "1" + "0" * 5000 + "GB", "99999999999TB", "0.0000001"])
def test_max_shard_size_out_of_range(cli: Cli, tmp_path: Path, inputs: list[Path], size: str) -> None:
    line = refused(cli, tmp_path, ["swa", *inputs, "-o", f"{tmp_path / 'out'}/", "--max-shard-size", size])
    assert "--max-shard-size" in line and len(line) < 300


def test_max_shard_size_exact() -> None:
    assert hf_folder.parse_size("2.5KiB") == 2560 and hf_folder.parse_size("5GB") == 5 * 10**9
    assert hf_folder.parse_size("0" * 50 + "7") == 7
    with pytest.raises(PlanError):
        hf_folder.parse_size("9" * 30)


def test_linear_normalize_with_an_overflowing_sum(cli: Cli, tmp_path: Path, inputs: list[Path]) -> None:
    out = tmp_path / "out.safetensors"
    line = refused(cli, tmp_path, ["linear", *inputs, "--weights", "1e308,1e308", "--normalize", "-o", out])
    assert "--normalize" in line and "largest float" in line


def test_warmup_over_huge_step_counts_is_refused_quickly() -> None:
    started = time.monotonic()
    with pytest.raises(PlanError, match="evaluates one by one"):
        ema_step_weights([10, 10**13], 0.99999999, warmup=True)
    with pytest.raises(PlanError, match="update_after_step"):
        ema_step_weights([10, 10**13], 0.9, update_after_step=10**13 - 5)
    assert time.monotonic() - started < 5


def test_warmup_that_reaches_its_decay_handles_huge_step_counts() -> None:
    """Past the warmup the decay is constant: 1e13 steps are summed in closed form."""
    w, residual = ema_step_weights([10, 10**6, 10**13], 0.999, warmup=True)
    assert math.isclose(sum(w) + residual, 1.0) and w[-1] == 1.0


def test_json_of_non_finite_numbers_is_strict() -> None:
    value = {"a": math.inf, "b": [math.nan, 1.5, -math.inf], "c": ("x", 2), "d": None}
    text = json.dumps(strict_json(value), allow_nan=False)
    assert json.loads(text) == {"a": None, "b": [None, 1.5, None], "c": ["x", 2], "d": None}


def test_plan_json_is_strict(cli: Cli, inputs: list[Path]) -> None:
    result = cli("plan", "linear", *inputs, "--weights", "1e308,1e308", "--json")
    assert result.exit_code == 0, result.output
    json.loads(result.stdout, parse_constant=lambda c: pytest.fail(f"bare {c} in plan --json"))


@pytest.mark.parametrize("code", [0, 3, None, "bye"])
def test_bn_model_module_calling_sys_exit(cli: Cli, tmp_path: Path, inputs: list[Path], code: object) -> None:
    module = tmp_path / "exits.py"
    module.write_text(f"import sys\nsys.exit({code!r})\n")
    out = tmp_path / "out.safetensors"
    line = refused(cli, tmp_path, ["swa", *inputs, "-o", out, "--bn-model", f"{module}:make", "--bn-data",
                                   f"{module}:data"])
    assert "exits.py" in line and "sys.exit" in line
