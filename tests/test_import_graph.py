"""The shape of trlib's imports (issue 9): no module imports itself back through others, even
lazily inside a function, and the layers point one way (plotting knows nothing of experiments;
the data-parallel communicator knows nothing of the runner)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "trlib"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(source: str, name: str, is_package: bool, modules) -> set:
    """The modules of ``modules`` that the module ``name`` (with ``source``) imports anywhere
    in its code: at module level or lazily inside a function."""
    package = name if is_package else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            # `from pkg import sub` imports the submodule; `from mod import name` the module
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # `from x import function`: the module x
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def graph():
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: imports(path.read_text(), name, path.name == "__init__.py", files) for name, path in files.items()}


def cycles(edges):
    """Every strongly connected component of more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def reaches(edges, start, target):
    seen, todo = set(), [start]
    while todo:
        v = todo.pop()
        if v == target:
            return True
        if v not in seen:
            seen.add(v)
            todo.extend(edges.get(v, ()))
    return False


def test_the_checker_sees_lazy_and_relative_imports_and_cycles():
    modules = {"pkg", "pkg.a", "pkg.b", "pkg.sub", "pkg.sub.c"}
    lazy = "import os\n\ndef f():\n    from .b import helper\n    return helper\n"
    assert imports(lazy, "pkg.a", False, modules) == {"pkg.b"}
    assert imports("from .. import a\nfrom ..b import x\n", "pkg.sub.c", False, modules) == {"pkg.a", "pkg.b"}
    assert imports("from . import c\n", "pkg.sub", True, modules) == {"pkg.sub.c"}
    assert imports("import pkg.sub.c as c\n", "pkg.a", False, modules) == {"pkg.sub.c"}
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    assert reaches({"a": {"b"}, "b": {"c"}}, "a", "c") and not reaches({"a": {"b"}, "b": {"c"}}, "c", "a")


def test_no_import_cycle_in_trlib():
    edges = graph()
    assert "trlib.experiments.runner" in edges and edges["trlib.experiments.runner"]
    assert cycles(edges) == []


def test_layers_point_one_way():
    edges = graph()
    assert not reaches(edges, "trlib.plotting", "trlib.experiments")
    assert not any(reaches(edges, "trlib.plotting", m) for m in edges if m.startswith("trlib.experiments"))
    assert not reaches(edges, "trlib.experiments.distributed", "trlib.experiments.runner")
    assert "trlib.experiments.distributed" in edges["trlib.experiments.runner"]  # the runner uses the communicator
