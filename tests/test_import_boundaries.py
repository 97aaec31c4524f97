"""Who may import whom (see jobs/__init__.py): read from the source, every import statement counted,
including the ones inside functions (those run too, just later).

    merge_ops  the library: no web, queue or database code, none of the service packages
    jobs       the core the API and the workers share: imports neither of them
    service    the API and the CLI: never the workers (it starts their processes instead)
    workers    Celery worker, reaper, scheduler: never the API
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("merge_ops", "jobs", "service", "workers")
FORBIDDEN = {
    "service": {"workers"},
    "workers": {"service"},
    "jobs": {"service", "workers"},
    "merge_ops": {"fastapi", "starlette", "uvicorn", "celery", "kombu", "redis", "sqlalchemy", "alembic",
                  "psycopg", "service", "workers", "jobs"},
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))
            if "__pycache__" not in p.parts}


def imports(path: Path, name: str) -> set[str]:
    """Every module `path` names in an import (relative ones resolved), and string literals given to
    importlib.import_module / __import__."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)  # `from pkg import submodule`
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and ((isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                   or (isinstance(node.func, ast.Name) and node.func.id == "__import__"))):
            out.add(node.args[0].value)
    return out


def graph() -> dict[str, set[str]]:
    """First-party module -> the first-party modules it imports."""
    mods = modules()
    return {name: {m for m in imports(path, name) if m in mods and m != name} for name, path in mods.items()}


def test_the_walk_sees_every_package_and_function_local_imports():
    mods = modules()
    assert {m.split(".")[0] for m in mods} == set(PACKAGES)
    # a function-local import is counted: the CLI imports the job store's migrations inside commands
    assert "jobs.migrate" in graph()["service.cli_service"]


def test_no_forbidden_imports():
    bad = []
    for name, path in modules().items():
        top = name.split(".")[0]
        for imported in imports(path, name):
            if imported.split(".")[0] in FORBIDDEN[top]:
                bad.append(f"{path.relative_to(ROOT)} imports {imported}")
    assert bad == []


def cycles(g: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(g.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(comp)

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]


def test_cli_modules_form_no_import_cycle():
    g = graph()
    cli = {m for m in g if m.rpartition(".")[2].startswith("cli") or m == "service.api_client"}
    assert {"service.cli", "service.cli_service", "service.cli_schedules", "merge_ops.cli"} <= cli
    assert [c for c in cycles(g) if c & cli] == []


def test_service_core_and_workers_have_no_import_cycle():
    g = graph()
    assert [c for c in cycles(g) if any(m.split(".")[0] != "merge_ops" for m in c)] == []


def test_api_and_worker_parent_import_no_torch():
    code = ("import sys, service.app, service.cli_service, workers.tasks, workers.reaper;"
            "from service.app import create_app; from jobs.settings import Settings;"
            "create_app(Settings(database_url='sqlite://'));"
            "print(sorted(m for m in ('torch', 'transformers', 'merge_ops.runner') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
