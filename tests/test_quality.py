"""Static checks as tests, so CI enforces them: ruff on everything, mypy strict on src/."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=300
    )


def test_ruff_lint() -> None:
    proc = run("ruff", "check", "src", "tests", "bench", "fuzz")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_ruff_format() -> None:
    proc = run("ruff", "format", "--check", "src", "tests", "bench", "fuzz")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_mypy_strict() -> None:
    proc = run("mypy")
    assert proc.returncode == 0, proc.stdout + proc.stderr


SRC = REPO / "src"
MAX_LINES = 600


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted((SRC / "floatd").rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _run_time_imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The floatd modules ``name`` imports when it is imported: module-level
    imports, not those under ``if TYPE_CHECKING`` or inside functions."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base]) if base else ".".join(anchor)
            # "from pkg import mod" imports the module pkg.mod too.
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def test_no_module_is_over_the_size_limit() -> None:
    big = {
        name: n
        for name, path in _modules().items()
        if (n := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert not big, f"modules over {MAX_LINES} lines: {big}"


def test_no_import_cycle_at_run_time() -> None:
    modules = _modules()
    graph = {name: _run_time_imports(name, path, modules) for name, path in modules.items()}
    # Importing a module imports its packages first; they are edges too.
    for name in modules:
        parent = name.rpartition(".")[0]
        if parent in modules:
            graph[name].add(parent)
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append([*path[path.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    # A package's __init__ importing its own submodules is how a package
    # exports them; what may not happen is a module needing itself back.
    real = [c for c in cycles if not _package_export(c)]
    assert not real, "import cycles: " + "; ".join(" -> ".join(c) for c in real)


def _package_export(cycle: list[str]) -> bool:
    """A cycle made only of a package and modules inside it, entered through
    the package's own __init__ (``floatd.cli`` importing ``floatd.cli.base``)."""
    head = min(cycle, key=len)
    return all(m == head or m.startswith(head + ".") for m in cycle)
