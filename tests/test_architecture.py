"""The layout's rules, checked on the source: imports run one way (flows → stages → maths/runtime → schemas),
no import circles between modules, no ``sys.modules`` reach-ins, and no module over ~400 lines."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("flows", "stages", "maths", "runtime", "schemas")
# what each layer may import from the project (besides itself)
ALLOWED = {
    "flows": {"stages", "maths", "runtime", "schemas"},
    "stages": {"maths", "runtime", "schemas"},
    "maths": {"schemas"},
    "runtime": {"schemas"},
    "schemas": set(),
}
MAX_LINES = 420
# modules that run inside the sandbox as plain text (never imported by the parent)
NOT_IMPORTED = {"runtime.sandbox.inside"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for f in sorted((REPO / pkg).rglob("*.py")):
            out[module_name(f)] = f
    return out


def project_imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Project modules that ``name`` imports (at any level of the file, lazily or not), resolved to the most
    specific known module; ``from pkg import sub`` counts as importing ``pkg.sub`` when that is a module."""
    tree = ast.parse(path.read_text(), str(path))
    found: set[str] = set()

    def add(target: str) -> None:
        while target and target not in known:
            target = target.rpartition(".")[0]
        if target and target != name:
            found.add(target)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in PACKAGES:
                    add(alias.name)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] not in PACKAGES:
                continue
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                add(full if full in known else node.module)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: project_imports(name, path, known) for name, path in mods.items()}


def test_imports_run_one_way(graph):
    bad = []
    for name, deps in graph.items():
        layer = name.split(".")[0]
        for dep in deps:
            other = dep.split(".")[0]
            if other != layer and other not in ALLOWED[layer]:
                bad.append(f"{name} imports {dep}")
    assert not bad, "layering broken:\n" + "\n".join(sorted(bad))


def _is_ancestor(pkg: str, mod: str) -> bool:
    return mod.startswith(pkg + ".")


def test_no_import_circles(graph):
    """Tarjan's strongly connected components over module imports; a package importing its own submodule
    (an ``__init__`` re-export) is not a circle."""
    edges = {
        m: {d for d in deps if not _is_ancestor(d, m) and not _is_ancestor(m, d)} for m, deps in graph.items()
    }
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    circles: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                circles.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    assert not circles, f"import circles: {circles}"


def test_no_sys_modules_reach_ins():
    offenders = [
        name
        for name, path in modules().items()
        if name not in NOT_IMPORTED and "sys.modules" in path.read_text()
    ]
    assert not offenders, f"modules reaching into sys.modules: {offenders}"


def test_modules_stay_small():
    big = {name: n for name, p in modules().items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not big, f"modules over {MAX_LINES} lines: {big}"


def test_stages_holds_only_pipeline_steps():
    """stages/ is the pipeline's steps: each top-level entry is a stage module or package in the stage table."""
    from stages import STAGES

    entries = {
        p.stem for p in (REPO / "stages").iterdir() if p.suffix == ".py" or (p / "__init__.py").exists()
    }
    entries.discard("__init__")
    assert entries == {spec.module.split(".")[1] for spec in STAGES.values()}
