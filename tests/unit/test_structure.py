"""The import graph of the production code (the `shard` package and services/, which is
installed as shard.services), read from
the sources with `ast`: imports at module level and inside functions both count, since a
function-level import is still a dependency, only a later one."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Package name -> its folder: services/ is installed (and linked) as shard.services.
PRODUCTION = {"shard": "shard", "shard.services": "services"}
# What tests provide or need; production code never imports any of it.
TEST_ONLY = {"tests", "pytest", "hypothesis"} | {
    path.stem if path.suffix == ".py" else path.name
    for path in (ROOT / "tests").iterdir() if path.suffix == ".py" or (path / "__init__.py").is_file()}


def modules(root: Path, packages=PRODUCTION) -> dict[str, Path]:
    """Dotted name -> source file of every module under `packages` (a package is its __init__)."""
    found = {}
    for package, folder in packages.items():
        for path in sorted((root / folder).rglob("*.py")):
            parts = (*package.split("."), *path.relative_to(root / folder).with_suffix("").parts)
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imported_names(name: str, path: Path) -> set[str]:
    """Every module name `name` imports, wherever in the file; `from a import b` gives both
    a and a.b (b may be a module or a name in a)."""
    is_package = path.name == "__init__.py"
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".")[: len(name.split(".")) - node.level + (1 if is_package else 0)]
                base = ".".join(anchor + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def import_graph(found: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the modules of `found` it imports (a name that is not a module of `found`
    stands for the closest enclosing one that is: `from shard.wire.tls import NodeTLS`)."""
    graph = {}
    for name, path in found.items():
        edges = set()
        for imported in imported_names(name, path):
            while imported and imported not in found:
                imported = imported.rpartition(".")[0]
            if imported and imported != name:
                edges.add(imported)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One shortest cycle per strongly connected component of more than one module."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def visit(node):  # Tarjan; the graph is a few dozen modules, recursion is fine
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [_shortest_cycle(graph, component) for component in components]


def _shortest_cycle(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    best = None
    for start in sorted(component):
        paths, seen = [[start]], {start}
        while paths:
            path = paths.pop(0)
            for nxt in sorted(graph[path[-1]] & component):
                if nxt == start:
                    if best is None or len(path) + 1 < len(best):
                        best = path + [start]
                    paths = []
                    break
                if nxt not in seen:
                    seen.add(nxt)
                    paths.append(path + [nxt])
    return best


def test_production_code_has_no_import_cycles():
    found = cycles(import_graph(modules(ROOT)))
    assert found == [], "import cycles: " + "; ".join(" -> ".join(cycle) for cycle in found)


def test_production_code_never_imports_test_helpers():
    offending = sorted(
        f"{name} imports {imported}"
        for name, path in modules(ROOT).items()
        for imported in imported_names(name, path)
        if imported.split(".")[0] in TEST_ONLY)
    assert offending == []


def test_the_checks_see_cycles_and_test_imports(tmp_path):
    """The analysis itself, on a made-up tree: a cycle through a function-level and a
    relative import is found, and a test-helper import is seen."""
    (tmp_path / "shard" / "sub").mkdir(parents=True)
    (tmp_path / "services").mkdir()
    (tmp_path / "shard" / "__init__.py").write_text("")
    (tmp_path / "shard" / "sub" / "__init__.py").write_text("")
    (tmp_path / "shard" / "a.py").write_text("from shard.sub.b import thing\n")
    (tmp_path / "shard" / "sub" / "b.py").write_text("def thing():\n    from ..c import other\n")
    (tmp_path / "shard" / "c.py").write_text("import shard.a\nfrom support.swarm import inprocess_swarm\n")
    (tmp_path / "services" / "__init__.py").write_text("from shard import c\n")
    found = modules(tmp_path)
    assert cycles(import_graph(found)) == [["shard.a", "shard.sub.b", "shard.c", "shard.a"]]
    assert "support.swarm" in imported_names("shard.c", found["shard.c"])
    assert "support" in TEST_ONLY


def test_test_files_have_unique_names():
    """pytest imports test files by their base name (rootdir mode, no packages): two
    test_x.py in different folders stop the whole collection."""
    names = sorted(path.name for path in (ROOT / "tests").rglob("test_*.py"))
    assert [name for name in set(names) if names.count(name) > 1] == []
