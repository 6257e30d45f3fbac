"""The package imports form no cycle, counting imports inside functions too.

A lazy import only postpones a cycle (the two modules still need each other, and the first
call at the wrong moment fails half-initialised), so the walk reads every `import` statement
with `ast`, wherever it is. Imports under `if TYPE_CHECKING:` never run and are skipped.
"""

import ast
import graphlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "ringformer"


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imported_names(tree: ast.AST, module: str, is_package: bool) -> list[str]:
    """Every dotted name an import statement in `tree` asks for (a module or a module.attr)."""
    names: list[str] = []
    pending = [tree]
    while pending:
        node = pending.pop()
        if isinstance(node, ast.If) and _is_type_checking(node):
            pending.extend(node.orelse)
            continue
        if isinstance(node, ast.Import):
            names.extend(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package this module belongs to
                anchor = module.split(".")
                anchor = anchor[:len(anchor) - node.level + (1 if is_package else 0)]
                base = ".".join([*anchor, base] if base else anchor)
            # `from pkg import sub` needs the submodule; `from pkg import attr` needs pkg:
            # the longest-prefix match in import_graph tells the two apart.
            names.extend(f"{base}.{a.name}" for a in node.names)
        pending.extend(ast.iter_child_nodes(node))
    return names


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports (the longest known prefix of each name)."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        deps = set()
        for imported in _imported_names(tree, name, path.name == "__init__.py"):
            parts = imported.split(".")
            target = next((".".join(parts[:i]) for i in range(len(parts), 0, -1)
                           if ".".join(parts[:i]) in modules), None)
            if target is not None and target != name:
                deps.add(target)
        graph[name] = deps
    return graph


def test_the_walk_sees_the_package():
    graph = import_graph()
    assert "ringformer.train.loop" in graph and "ringformer.model" in graph["ringformer.train.loop"]
    # A function-level import counts: the helper reads the whole tree, not the top level only.
    tree = ast.parse("def f():\n    from ringformer import model\n")
    assert "ringformer.model" in _imported_names(tree, "ringformer.x", False)


def test_no_import_cycles():
    try:
        graphlib.TopologicalSorter(import_graph()).prepare()
    except graphlib.CycleError as e:
        # graphlib lists each node before the one it depends on; reversed, "a -> b" reads
        # "a imports b".
        pytest.fail("import cycle: " + " -> ".join(reversed(e.args[1])))
