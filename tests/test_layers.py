"""The package's shape as a test: stages import only downwards, and no module imports itself in a circle."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "ckptavg"

# Lower rank: nearer the leaves. A module may import its own stage and any stage of a lower rank.
RANK = {"_version": 0, "errors": 0, "layout": 0, "read": 1, "userfn": 1, "select": 2, "methods": 2, "reduce": 2,
        "write": 2, "bn": 2, "results": 3, "api": 4, "dist": 5, "cli": 6, "__main__": 7, "__init__": 7}
# Stages of one rank that must not meet (ARCHITECTURE.md's layer rule).
FORBIDDEN = {("methods", "reduce"), ("write", "reduce"), ("write", "dist"), ("cli", "reduce"), ("reduce", "methods"),
             ("reduce", "write"), ("methods", "write"), ("select", "methods"), ("select", "reduce"), ("bn", "reduce")}


# Wrong-way imports still to be removed by the interface changes (ARCHITECTURE.md); this set only shrinks.
KNOWN: set[tuple[str, str]] = set()


def _module(path: Path) -> str:
    return ".".join(path.relative_to(PKG).with_suffix("").parts)


def _imports(path: Path) -> set[str]:
    """Every ckptavg module `path` imports (TYPE_CHECKING blocks included: they are imports to a reader too)."""
    mod = _module(path).split(".")
    package = mod if path.name == "__init__.py" else mod[:-1]
    package = [p for p in package if p != "__init__"]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - node.level + 1]
            target = base + (node.module.split(".") if node.module else [])
            for alias in node.names:
                full = ".".join([*target, alias.name])
                found.add(full if (PKG / Path(*full.split("."))).with_suffix(".py").exists()
                          or (PKG / Path(*full.split("."))).is_dir() else ".".join(target))
        elif isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            found |= {n.removeprefix("ckptavg.") for n in names if n.startswith("ckptavg.")}
    return {f for f in found if f}


def _stage(module: str) -> str:
    return module.split(".")[0] if module else "__init__"


MODULES = {(_module(p) if p.name != "__init__.py" else _module(p.parent / "x.py").rpartition(".")[0] or "__init__"): p
           for p in sorted(PKG.rglob("*.py"))}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_run_downwards(module: str) -> None:
    stage = _stage(module)
    if stage == "__init__":
        return  # the public face re-exports from everywhere
    wrong = []
    for target in sorted(_imports(MODULES[module])):
        to = _stage(target)
        if to == stage or (module, target) in KNOWN:
            continue
        if RANK[to] > RANK[stage] or (stage, to) in FORBIDDEN:
            wrong.append(target)
    assert not wrong, f"{module} imports {wrong}, against the layer rule (tests/test_layers.py, README design notes)"


def test_no_import_cycles() -> None:
    graph = {m: {t for t in _imports(p) if t in MODULES and t != m and (m, t) not in KNOWN} for m, p in MODULES.items()}
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> None:
        if node in path:
            raise AssertionError("import cycle: " + " -> ".join([*path[path.index(node):], node]))
        if node in done:
            return
        for nxt in sorted(graph[node]):
            visit(nxt, [*path, node])
        done.add(node)

    for m in sorted(graph):
        if m != "__init__":
            visit(m, [])


def test_modules_stay_small() -> None:
    long = {m: n for m, p in MODULES.items() if (n := len(p.read_text().splitlines())) > 400}
    assert not long, f"modules over 400 lines: {long}"


def test_top_level_is_small() -> None:
    names = [p.name for p in PKG.iterdir() if not p.name.startswith((".", "__pycache__"))]
    assert len(names) <= 16, sorted(names)


def test_rule_catches_a_wrong_way_import(tmp_path: Path) -> None:
    """The checker itself can fail: a reader that imports the API is caught."""
    bad = PKG / "read" / "_layer_probe.py"
    bad.write_text("from ..api import average_checkpoints\n")
    try:
        MODULES["read._layer_probe"] = bad
        with pytest.raises(AssertionError, match="against the layer rule"):
            test_imports_run_downwards("read._layer_probe")
    finally:
        bad.unlink()
        del MODULES["read._layer_probe"]


def test_public_face_is_lazy_and_complete() -> None:
    """`import ckptavg` imports no torch (so `--help` stays fast), and every public name resolves."""
    import subprocess
    import sys

    code = ("import sys, ckptavg; assert 'torch' not in sys.modules, 'import ckptavg imported torch'; "
            "missing = [n for n in ckptavg.__all__ if getattr(ckptavg, n, None) is None]; assert not missing, missing")
    subprocess.run([sys.executable, "-c", code], check=True)
