"""The op layers import one way: functional -> dispatch -> specs -> ops (-> checks, backends, reference).

Read with ``ast`` (nothing is imported), so an import inside a function counts as much as one at the top:
* no module under aimkern/ops/ imports aimkern.dispatch, aimkern.specs or aimkern.functional, at module
  level or inside a function;
* the specs never import dispatch or functional, dispatch never imports functional;
* the module-level imports of ops, specs, dispatch, functional, checks and backends have no circle
  (importing ``aimkern.ops.attention`` runs ``aimkern/ops/__init__.py`` first: that edge counts too).
"""
from __future__ import annotations

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "aimkern")
LAYERS = ("aimkern.ops", "aimkern.specs", "aimkern.dispatch", "aimkern.functional", "aimkern.checks",
          "aimkern.backends")
ABOVE_OPS = ("aimkern.dispatch", "aimkern.specs", "aimkern.functional")


def _modules() -> dict:
    """{module name: (path, is_package)} of every module of the package."""
    out = {}
    for folder, _, files in os.walk(PKG):
        if "__pycache__" in folder or os.path.islink(folder):
            continue
        for name in files:
            if not name.endswith(".py"):
                continue
            rel = os.path.relpath(os.path.join(folder, name), ROOT)[:-3].split(os.sep)
            is_pkg = rel[-1] == "__init__"
            out[".".join(rel[:-1] if is_pkg else rel)] = (os.path.join(folder, name), is_pkg)
    return out


MODULES = _modules()


def _imports(module: str, top_level_only: bool) -> list:
    """[(imported module, lineno, enclosing function or None)]: every module an import statement of
    ``module`` names, a ``from X import y`` naming X and, where y is a submodule, X.y too."""
    path, is_pkg = MODULES[module]
    tree = ast.parse(open(path).read())
    package = module if is_pkg else module.rpartition(".")[0]
    found = []

    def visit(node, func):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                if not top_level_only:
                    visit(child, getattr(child, "name", "<lambda>"))
                continue
            if isinstance(child, ast.Import):
                found.extend((a.name, child.lineno, func) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = package.split(".")
                if child.level:
                    base = base[: len(base) - child.level + 1]
                    target = ".".join(base + ([child.module] if child.module else []))
                else:
                    target = child.module
                found.append((target, child.lineno, func))
                found.extend((f"{target}.{a.name}", child.lineno, func) for a in child.names
                             if f"{target}.{a.name}" in MODULES)
            visit(child, func)

    visit(tree, None)
    return found


def _within(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def test_nothing_under_ops_imports_the_layers_above():
    bad = []
    for module in MODULES:
        if not _within(module, ("aimkern.ops",)):
            continue
        bad += [f"{module}:{line} ({func or 'module level'}) imports {target}"
                for target, line, func in _imports(module, top_level_only=False) if _within(target, ABOVE_OPS)]
    assert not bad, "aimkern.ops must not import dispatch / specs / functional:\n" + "\n".join(bad)


def test_specs_and_dispatch_import_downwards_only():
    rules = {"aimkern.specs": ("aimkern.dispatch", "aimkern.functional"), "aimkern.dispatch": ("aimkern.functional",),
             "aimkern.checks": ("aimkern.ops", "aimkern.specs", "aimkern.dispatch", "aimkern.functional")}
    bad = []
    for module in MODULES:
        for layer, forbidden in rules.items():
            if _within(module, (layer,)):
                bad += [f"{module}:{line} imports {t}" for t, line, _ in _imports(module, top_level_only=False)
                        if _within(t, forbidden)]
    assert not bad, "\n".join(bad)


def _graph() -> dict:
    """Module-level import edges among the op layers, with the parent packages of each imported module
    (importing a submodule runs them first), leaving out a module's own packages (they are mid-import
    already when it runs)."""
    edges = {}
    for module in MODULES:
        if not _within(module, LAYERS):
            continue
        targets = set()
        for target, _, _ in _imports(module, top_level_only=True):
            parts = target.split(".")
            for i in range(1, len(parts) + 1):
                name = ".".join(parts[:i])
                own_package = module.startswith(name + ".")  # already importing when a submodule runs
                if name in MODULES and name != module and not own_package and _within(name, LAYERS):
                    targets.add(name)
        edges[module] = targets
    return edges


def _cycle(edges: dict):
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(edges):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_no_module_level_import_circle_among_the_op_layers():
    edges = _graph()
    assert {"aimkern.ops.attention", "aimkern.specs.attention", "aimkern.dispatch.core", "aimkern.functional"} <= set(edges)
    assert "aimkern.ops" in edges["aimkern.specs.attention"] or "aimkern.ops.attention" in edges["aimkern.specs.attention"]
    assert _cycle(edges) is None, " -> ".join(_cycle(edges))


def test_the_cycle_finder_finds_a_cycle():
    """The check above can fail: a circle of three is found."""
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_ops_modules_are_modules_and_the_public_ops_live_in_functional():
    import importlib

    import aimkern
    import aimkern.functional as F

    for name in ("attention", "cross_entropy", "patch_embed", "pixel_loss"):
        assert type(importlib.import_module(f"aimkern.ops.{name}")).__name__ == "module"
        assert type(getattr(importlib.import_module("aimkern.ops"), name)).__name__ == "module"
    for name in ("attention", "attention_qkvpacked", "patch_embed", "linear_cross_entropy", "next_patch_pixel_loss"):
        assert getattr(aimkern, name) is getattr(F, name)
    for name in ("attention", "patch_embed"):  # the modules, no longer functions of the same name
        assert type(getattr(aimkern.ops, name)).__name__ == "module"


@pytest.mark.parametrize("name", ["attention_qkvpacked", "linear_cross_entropy", "next_patch_pixel_loss"])
def test_the_moved_public_ops_keep_a_deprecated_alias_in_ops(name):
    """README of the last release called aimkern.ops.attention_qkvpacked etc.: they still resolve, to the
    public op itself, with a DeprecationWarning that names the new place; other names stay AttributeErrors."""
    import aimkern
    import aimkern.ops

    with pytest.warns(DeprecationWarning, match=f"use aimkern.{name}"):
        alias = getattr(aimkern.ops, name)
    assert alias is getattr(aimkern, name)
    with pytest.raises(AttributeError, match="no attribute 'no_such_op'"):
        aimkern.ops.no_such_op


def test_the_packed_varlen_op_is_reachable_from_ops_without_a_warning():
    import warnings

    import aimkern
    import aimkern.ops

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert aimkern.ops.attention_varlen_qkvpacked is aimkern.attention_varlen_qkvpacked
