"""The package's shape: no import cycle among aimkern's modules, and no long function in aimkern/train/.

The import graph is read from the source, so a cycle fails here even when the import order of today
happens to work. Two graphs: the module-level imports (``import`` / ``from ... import`` at the top, also under
module-level ``if`` / ``try``) of the whole package must have no cycle; and with the imports inside functions
counted too, no cycle may pass through the data, training or distributed modules: a lazy import that only
dodges a cycle (as ``aimkern.train.data`` and ``aimkern.data.stream`` once did) is still one.
"""
import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "aimkern")
MAX_FUNCTION_LINES = 60  # aimkern/train/: a longer function is a loop that wants its own pieces


def modules() -> dict:
    """Dotted module name -> source path, for every module under aimkern/ (kernels/ holds only @triton.jit)."""
    found = {}
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                rel = os.path.relpath(os.path.join(folder, name), ROOT)[:-3].replace(os.sep, ".")
                found[rel[: -len(".__init__")] if rel.endswith(".__init__") else rel] = os.path.join(folder, name)
    return found


def _module_level(tree: ast.Module):
    """The module's statements, descending into module-level if / try blocks but not into functions or classes."""
    todo = list(tree.body)
    while todo:
        node = todo.pop(0)
        yield node
        if isinstance(node, (ast.If, ast.Try)):
            todo.extend(node.body + node.orelse + getattr(node, "finalbody", []))
            todo.extend(stmt for handler in getattr(node, "handlers", []) for stmt in handler.body)


LAYERED = ("aimkern.data", "aimkern.train", "aimkern.distributed")  # no cycle through these, lazy imports included


def imports_of(name: str, path: str, known: dict, lazy: bool = False) -> set:
    """The aimkern modules ``name`` imports at module level (``lazy``: anywhere, inside functions too)."""
    is_package = path.endswith("__init__.py")
    with open(path) as f:
        tree = ast.parse(f.read())
    out = set()
    for node in (ast.walk(tree) if lazy else _module_level(tree)):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            for alias in node.names:  # "from pkg import sub" imports the submodule pkg.sub
                out.add(f"{target}.{alias.name}" if f"{target}.{alias.name}" in known else target)
    return {m for m in out if m in known and m != name}


def find_cycle(graph: dict):
    """One import cycle of ``graph`` as a list of modules, or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def import_graph(lazy: bool = False) -> dict:
    known = modules()
    return {name: imports_of(name, path, known, lazy) for name, path in known.items()}


def cycle_through(graph: dict, start: str):
    """A path start -> ... -> start in ``graph``, or None."""
    parent, todo = {}, [start]
    while todo:
        node = todo.pop()
        for nxt in sorted(graph[node]):
            if nxt == start:
                path = [node]
                while path[-1] != start:
                    path.append(parent[path[-1]])
                return [start] + path[::-1][1:] + [start]
            if nxt not in parent:
                parent[nxt] = node
                todo.append(nxt)
    return None


def test_the_walker_sees_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert cycle_through({"a": {"b"}, "b": {"c", "a"}, "c": set()}, "a") == ["a", "b", "a"]
    assert cycle_through({"a": {"b"}, "b": {"c"}, "c": {"b"}}, "a") is None
    graph = import_graph()
    assert "aimkern.data.sampling" in graph["aimkern.data.shard_stream"]  # relative imports resolve
    assert "aimkern.distributed" in graph["aimkern.train.step"]
    assert "aimkern.data.shards" in graph["aimkern.data"]  # a package's own submodules


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_cycle_through_data_train_or_distributed_even_lazily():
    graph = import_graph(lazy=True)
    for name in sorted(graph):
        if name.startswith(LAYERED):
            cycle = cycle_through(graph, name)
            assert cycle is None, "import cycle (imports inside functions counted): " + " -> ".join(cycle)


def test_data_does_not_import_train():
    graph = import_graph(lazy=True)
    offenders = {m: sorted(t for t in ts if t.startswith("aimkern.train"))
                 for m, ts in graph.items() if m.startswith("aimkern.data")}
    assert not any(offenders.values()), offenders


def _long_functions(path: str):
    with open(path) as f:
        tree = ast.parse(f.read())
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1
            if length > MAX_FUNCTION_LINES:
                yield f"{os.path.relpath(path, ROOT)}:{node.lineno} {node.name} ({length} lines)"


@pytest.mark.parametrize("name", sorted(f for f in os.listdir(os.path.join(PACKAGE, "train")) if f.endswith(".py")))
def test_train_functions_are_short(name):
    assert not list(_long_functions(os.path.join(PACKAGE, "train", name)))
