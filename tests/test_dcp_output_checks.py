"""What a folder output may be written over, and when the DCP output's note is given (review findings on the
DCP output): a folder never ends up holding two checkpoints that two readers would read differently (torch's
`dcp.load` reads `.metadata`, Megatron the tracker file, ckptavg's reader `model.safetensors`); a refused run
prints its one `Error:` line and no note; several outputs write DCP only with a folder template.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from test_dcp_output import RUN, quiet_average, recipe_run, torch_view
from test_megatron import ITERS
from typer.testing import Result

from ckptavg import PlanError
from ckptavg.methods.ema import Ema
from ckptavg.methods.windows import sweep
from ckptavg.write.options import WriteOptions

Cli = Callable[..., Result]


def plain_run(root: Path) -> Path:
    """Two safetensors checkpoints: inputs that give no warning of their own."""
    root.mkdir()
    for i in range(2):
        save_file({"w": torch.full((3, 2), float(i)), "b": torch.arange(2.0) * i}, root / f"c{i}-step{i + 1}.safetensors")
    return root


def tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def only_error(result: Result) -> str:
    """The run was refused with one `Error:` line on stderr and nothing else (no note, no warning)."""
    assert result.exit_code == 1, (result.output, result.exception)
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    return lines[0]


# ---------------------------------------------------------------- finding 1: another layout's checkpoint in the folder


def _dcp_folder(cli: Cli, runs: Path, out: Path) -> None:
    assert cli("swa", runs, "--format", "dcp", "-o", f"{out}/").exit_code == 0


def _megatron_run(cli: Cli, runs: Path, out: Path) -> None:
    quiet_average(RUN, f"{out}/")
    assert sorted(p.name for p in out.iterdir()) == ["iter_0000009", "latest_checkpointed_iteration.txt"]


def _provenance_only(cli: Cli, runs: Path, out: Path) -> None:
    _dcp_folder(cli, runs, out)
    for p in out.iterdir():
        if p.name != "ckptavg.json":
            p.unlink()


def _release(cli: Cli, runs: Path, out: Path) -> None:
    (out / "release").mkdir(parents=True)
    (out / "release" / "common.pt").write_bytes(b"x")


@pytest.mark.parametrize(("make", "named"), [
    (_dcp_folder, ".metadata, __0_0.distcp, ckptavg.json"),
    (_megatron_run, "iter_0000009/, latest_checkpointed_iteration.txt"),
    (_provenance_only, "ckptavg.json"),
    (_release, "release/"),
])
@pytest.mark.parametrize("force", [False, True])
def test_a_safetensors_folder_over_another_layout_is_refused(cli: Cli, tmp_path: Path, make: Callable[..., None],
                                                             named: str, force: bool) -> None:
    runs = plain_run(tmp_path / "runs")
    out = tmp_path / "out"
    make(cli, runs, out)
    before = tree(out)
    line = only_error(cli("swa", runs, "-o", f"{out}/", *(["--force"] if force else [])))
    assert f"holds other weight files ({named})" in line and "--force" not in line, line
    assert tree(out) == before  # nothing written beside the old checkpoint


def test_a_dcp_folder_over_a_megatron_run_or_a_safetensors_folder_is_refused(cli: Cli, tmp_path: Path) -> None:
    runs = plain_run(tmp_path / "runs")
    _megatron_run(cli, runs, tmp_path / "mg")
    line = only_error(cli("swa", runs, "--format", "dcp", "-o", f"{tmp_path / 'mg'}/", "--force"))
    assert "iter_0000009/, latest_checkpointed_iteration.txt" in line, line
    assert cli("swa", runs, "-o", f"{tmp_path / 'hf'}/").exit_code == 0
    line = only_error(cli("swa", runs, "--format", "dcp", "-o", f"{tmp_path / 'hf'}/", "--force"))
    assert "model.safetensors" in line, line


def test_a_megatron_run_output_over_a_run_keeps_the_other_iterations(cli: Cli, tmp_path: Path) -> None:
    """A Megatron run output's own layout: other iterations beside it are a run's, as Megatron leaves them."""
    out = tmp_path / "out"
    out.mkdir()
    shutil.copytree(RUN / ITERS[0], out / ITERS[0])
    (out / "latest_checkpointed_iteration.txt").write_text("3")
    result = cli("swa", RUN, "-o", f"{out}/", "--force")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == [ITERS[0], "iter_0000009", "latest_checkpointed_iteration.txt"]
    assert (out / "latest_checkpointed_iteration.txt").read_text() == "9"


# ---------------------------------------------------------------- finding 2: the note, only once the checks pass


@pytest.mark.parametrize("case", ["again", "file", "no-parent", "input"])
def test_a_refused_dcp_output_prints_its_error_alone(cli: Cli, tmp_path: Path, case: str) -> None:
    run = tmp_path / "run"
    recipe_run(run, 2)  # DCP inputs with optimizer state: a written output has a note
    (tmp_path / "afile").write_bytes(b"")
    if case == "again":
        assert cli("swa", run, "-o", f"{tmp_path / 'd1'}/").exit_code == 0
    out = {"again": tmp_path / "d1", "file": tmp_path / "afile", "no-parent": tmp_path / "nope" / "deeper",
           "input": run / "step-1"}[case]
    only_error(cli("swa", run, "--format", "dcp", "-o", f"{out}/"))


def test_the_note_says_what_is_not_written_once_the_output_is_checked(cli: Cli, tmp_path: Path) -> None:
    run = tmp_path / "run"
    recipe_run(run, 2)
    result = cli("swa", run, "-o", f"{tmp_path / 'avg'}/", "--json")
    assert result.exit_code == 0, result.output
    notes = [ln for ln in result.stderr.splitlines() if "DCP output" in ln]
    assert len(notes) == 1 and notes[0].startswith("Warning: ") and "(optim) is not written" in notes[0], result.stderr
    assert notes[0][len("Warning: "):] in json.loads(result.stdout)["warnings"]  # --json holds it too


def test_a_dcp_output_of_weights_has_no_note_and_the_summary_says_dcp(cli: Cli, tmp_path: Path) -> None:
    """Safetensors inputs hold no optimizer or RNG state: nothing is left out, so nothing to warn of."""
    runs = plain_run(tmp_path / "runs")
    result = cli("swa", runs, "--format", "dcp", "-o", f"{tmp_path / 'avg'}/")
    assert result.exit_code == 0 and result.stderr == "", result.output
    assert "1 DCP data file" in result.stdout, result.stdout


# ---------------------------------------------------------------- finding 3: several outputs as DCP folders


@pytest.mark.parametrize(("output", "suggested"), [
    ("ema-{decay}", "'ema-{decay}/'"), ("avg.safetensors", "'avg-{decay}/'"),
])
def test_a_sweep_to_dcp_asks_for_a_folder_template(cli: Cli, tmp_path: Path, output: str, suggested: str) -> None:
    runs = plain_run(tmp_path / "runs")
    result = cli("ema", runs, "--decay", "0.5,0.9", "--format", "dcp", "-o", f"{tmp_path}/{output}")
    line = only_error(result)
    assert "2 outputs" in line and "--output a folder template" in line and suggested in line.replace(f"{tmp_path}/", ""), line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]


@pytest.mark.parametrize(("output", "rows"), [("dx7/{decay}/", ("0.5", "0.9")), ("dx7/", ("decay=0.5", "decay=0.9"))])
def test_a_folder_template_or_a_folder_writes_one_dcp_folder_per_row(cli: Cli, tmp_path: Path, output: str,
                                                                      rows: tuple[str, ...]) -> None:
    runs = plain_run(tmp_path / "runs")
    result = cli("ema", runs, "--decay", "0.5,0.9", "--format", "dcp", "-o", f"{tmp_path}/{output}")
    assert result.exit_code == 0, result.output
    for row in rows:
        folder = tmp_path / "dx7" / row
        assert sorted(p.name for p in folder.iterdir()) == [".metadata", "__0_0.distcp", "ckptavg.json"]
        assert set(torch_view(folder, tmp_path)) == {"w", "b"}


def test_library_sweep_refusal_names_the_parameters(tmp_path: Path) -> None:
    runs = plain_run(tmp_path / "runs")
    with pytest.raises(PlanError) as info:
        quiet_average(runs, f"{tmp_path / 'dx7'}/{{decay}}", sweep(Ema(decay=0.5), "decay", [0.5, 0.9]),
                      write=WriteOptions(format="dcp"))
    assert set(info.value.params) == {"output", "format"} and "{decay}" in str(info.value)


def test_a_sweep_of_megatron_iterations_writes_a_run_folder_per_row(cli: Cli, tmp_path: Path) -> None:
    """DCP inputs give DCP outputs: each row of a sweep into a folder is a Megatron run Megatron's --load finds."""
    run = Path(__file__).resolve().parent.parent / "fixtures" / "real" / "megatron" / "checkpoints"
    result = cli("ema", run, "--decay", "0.5,0.9", "-o", f"{tmp_path / 'sweep'}/", "-q")
    assert result.exit_code == 0, result.output
    for row in ("decay=0.5", "decay=0.9"):
        assert (tmp_path / "sweep" / row / "latest_checkpointed_iteration.txt").read_text().strip() == "9"
        assert (tmp_path / "sweep" / row / "iter_0000009" / ".metadata").is_file()


def test_a_dcp_folder_over_a_megatron_iteration_does_not_inherit_its_common_state(cli: Cli, tmp_path: Path) -> None:
    """Our DCP folder written into an old Megatron iteration (even with --force) would sit beside that run's
    common.pt and metadata.json, and read as that run's iteration: refused, naming them."""
    run = Path(__file__).resolve().parent.parent / "fixtures" / "real" / "megatron" / "checkpoints"
    assert cli("swa", run, "-o", f"{tmp_path / 'meg'}/", "-q").exit_code == 0
    iteration = tmp_path / "meg" / "iter_0000009"
    before = sorted(p.name for p in iteration.iterdir())
    runs = plain_run(tmp_path / "runs")
    line = only_error(cli("swa", runs, "--format", "dcp", "-o", f"{iteration}/", "-f"))
    assert "holds other weight files" in line and "common.pt" in line and "metadata.json" in line, line
    assert sorted(p.name for p in iteration.iterdir()) == before
