"""The package's modules import each other top-down: no import cycle, not even through a function-level import.

A cycle hidden in a function body still couples two layers (each needs the other to be importable) and
turns into an ImportError as soon as one of the imports moves to the top of its module.
"""

from __future__ import annotations

import ast
from pathlib import Path

import aapo_trl

PACKAGE_ROOT = Path(aapo_trl.__file__).parent


def package_modules(root: Path = PACKAGE_ROOT) -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, is a package's __init__)."""
    modules = {}
    for path in root.rglob("*.py"):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        modules[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return modules


def imported_modules(name: str, path: Path, is_package: bool, modules) -> set[str]:
    """The package's modules that ``name`` imports anywhere in its file (module level or inside functions)."""
    package = name if is_package else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                parents = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(parents + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # `from . import x` imports the module x; `from .x import name` imports x
            candidates = [f"{target}.{a.name}" if f"{target}.{a.name}" in modules else target for a in node.names]
        elif isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        else:
            continue
        found.update(candidate for candidate in candidates if candidate in modules and candidate != name)
    return found


def import_graph(root: Path = PACKAGE_ROOT) -> dict[str, set[str]]:
    modules = package_modules(root)
    return {name: imported_modules(name, path, is_package, modules) for name, (path, is_package) in modules.items()}


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in sorted(graph[node]):
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(components)


def test_the_cycle_finder_sees_function_level_and_relative_imports(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "low.py").write_text("def f():\n    from .sub.high import g\n")
    (package / "sub" / "high.py").write_text("from ..low import f\n")
    (package / "alone.py").write_text("from . import low\n")
    graph = import_graph(package)
    assert graph["pkg.alone"] == {"pkg.low"}
    assert import_cycles(graph) == [["pkg.low", "pkg.sub.high"]]


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    cycles = import_cycles(graph)
    edges = [f"{a} -> {b}" for component in cycles for a in component for b in sorted(graph[a]) if b in component]
    assert cycles == [], "modules that import each other (directly or through others):\n" + "\n".join(edges)
