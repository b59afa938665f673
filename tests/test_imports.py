"""The layers stay apart: no import cycle among hpo's modules, the core imports no web
framework, workers never open the database, and the notebook client and the CLI stay light."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"service": "hpo.service", "workers": "hpo.workers", "api": "hpo.api"}


def _modules() -> dict[str, Path]:
    """Every module of hpo by dotted name (packages by their own name), migrations aside."""
    found = {}
    for folder, package in PACKAGES.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if "migrations" in parts:
                continue  # Alembic loads these by path, never by import
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([package, *parts])] = path
    return found


MODULES = _modules()


def _imported(path: Path) -> Iterator[str]:
    """Every name an import statement of the file names, wherever it stands (lazy imports in
    functions and ``TYPE_CHECKING`` blocks included): ``a.b`` and, for ``from a.b import c``,
    also ``a.b.c``."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module
            yield from (f"{node.module}.{alias.name}" for alias in node.names)


def _graph() -> dict[str, set[str]]:
    """Module -> the hpo modules it imports. Importing a module also runs its parent packages,
    so those count too; a package importing its own submodules (a re-export) does not."""
    graph: dict[str, set[str]] = {}
    for name, path in MODULES.items():
        deps = {m for m in _imported(path) if m in MODULES}
        parent = name.rsplit(".", 1)[0]
        if parent in MODULES:
            deps.add(parent)
        graph[name] = {d for d in deps if d != name and not d.startswith(name + ".")}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    out.append(sorted(component))
    return out


def test_the_cycle_finder_finds_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert _cycles(graph) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_among_hpo_modules() -> None:
    graph = _graph()
    assert "hpo.service.spec" in graph and "hpo.api.cli" in graph
    assert _cycles(graph) == []


def _importers_of(folder: str, banned: tuple[str, ...]) -> dict[str, list[str]]:
    found = {}
    for name, path in MODULES.items():
        if name.startswith(PACKAGES[folder]):
            hits = sorted({m for m in _imported(path) if m.split(".")[0] in banned})
            if hits:
                found[name] = hits
    return found


def test_the_core_imports_no_web_framework() -> None:
    assert _importers_of("service", ("fastapi", "starlette", "uvicorn")) == {}


def test_workers_never_open_the_database() -> None:
    assert _importers_of("workers", ("sqlalchemy", "psycopg", "alembic")) == {}
    hits = {
        name: sorted(m for m in _imported(path) if m.startswith("hpo.service.db"))
        for name, path in MODULES.items()
        if name.startswith("hpo.workers")
    }
    assert {k: v for k, v in hits.items() if v} == {}


@pytest.mark.parametrize("module", ["hpo.api.client", "hpo.api.cli"])
def test_the_client_and_the_cli_stay_light(module: str) -> None:
    heavy = ("torch", "ray", "fastapi", "starlette", "sqlalchemy", "uvicorn", "optuna")
    code = (
        f"import sys, {module}; "
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & {set(heavy)!r}))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert result.stdout.strip() == "[]", result.stdout
