"""The package's import graph: the command layer sits on top, nothing imports it, no cycle anywhere."""

from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

import fsad_lightning

PACKAGE = Path(fsad_lightning.__file__).resolve().parent
COMMANDS = "fsad_lightning.commands"


def _modules() -> dict[str, tuple[Path, bool]]:
    """Every module of the source tree: dotted name -> (file, is a package's ``__init__``)."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        modules[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return modules


def import_graph() -> dict[str, set[str]]:
    """Module -> the fsad_lightning modules it imports, anywhere in its code (lazy imports included).

    ``from a.b import c`` counts as an import of ``a.b.c`` when that is a module, else of ``a.b``;
    relative imports are resolved. A submodule's implicit import of its parent package is not an edge.
    """
    modules = _modules()

    def known(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for name, (path, is_package) in modules.items():
        package = name if is_package else name.rpartition(".")[0]
        targets: set[str | None] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets |= {known(alias.name) for alias in node.names if alias.name.startswith("fsad_lightning")}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                if base.startswith("fsad_lightning"):
                    for alias in node.names:
                        full = f"{base}.{alias.name}"
                        targets.add(full if full in modules else known(base))
        graph[name] = {t for t in targets if t is not None and t != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (``[a, b, ..., a]``), or ``None``."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return path[path.index(target) :] + [target]
            if target not in state and (cycle := visit(target, path)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node, [])):
            return cycle
    return None


def test_no_module_below_the_command_layer_imports_it():
    offenders = {
        module: sorted(t for t in targets if t == COMMANDS or t.startswith(COMMANDS + "."))
        for module, targets in import_graph().items()
        if not (module == COMMANDS or module.startswith(COMMANDS + "."))
    }
    assert not {m: t for m, t in offenders.items() if t}


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert {"fsad_lightning.commands.dispatch", "fsad_lightning.commands.benchmark"} <= set(graph)
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_finds_the_old_circle():
    # cli -> experiment -> cli and cli -> generate -> cli, as before the command layer existed
    old = {"cli": {"experiment", "generate"}, "experiment": {"cli"}, "generate": {"cli"}}
    assert find_cycle(old) in (["cli", "experiment", "cli"], ["cli", "generate", "cli"])
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_every_module_imports():
    names = [m.name for m in pkgutil.walk_packages([str(PACKAGE)], prefix="fsad_lightning.")]
    assert "fsad_lightning.commands.sweeps" in names
    for name in names:
        importlib.import_module(name)
