"""One ``str`` argument carries a frozen dataclass across the custom-op boundary.

``torch.library.custom_op`` takes plain types only (tensors, bools, ints, floats, strs). An op's
non-tensor arguments (its params dataclass, and the launch choices its forward made) travel as the
encoded dataclass instead of a positional list whose order lives in a comment: the custom op's forward
decodes it, ``setup_context`` keeps it, and the backward op is handed the very same string, so it runs
with exactly what the forward decided::

    call = AttentionCall(params=AttentionParams(...), policy=LaunchPolicy(...), layout="bhnd")
    o, lse = torch.ops.aimkern.attention_fwd(q, k, v, prefix_len, encode(call))
    ...
    call = decode(text)   # in the op: AttentionCall(...) again, equal to the one encoded

The text is the dataclass's constructor call with keyword arguments, e.g.
``LaunchPolicy(autotune=True, attention_backward='split')``: readable in a graph dump or an error, and
decoded without ``eval``: only dataclasses registered with ``@crosses_boundary`` are built, and every
value is a literal (bool, int, float, str, None, a tuple of them) or another registered dataclass.

``encode`` is traced by Dynamo when a compiled function calls an op, so it uses only what Dynamo folds on
constants (attribute reads, ``repr`` of a literal, string joins); ``decode`` runs inside custom ops and
autograd formulas, never under Dynamo, and is cached (equal strings give the same frozen object).
"""
from __future__ import annotations

import ast
import functools
import math
from dataclasses import fields, is_dataclass
from typing import Any

_CLASSES: dict = {}  # class name -> a frozen dataclass that may cross the boundary


def crosses_boundary(cls):
    """Class decorator: let the frozen dataclass ``cls`` be encoded / decoded (by its class name)."""
    params = getattr(cls, "__dataclass_params__", None)
    if params is None or not params.frozen:
        raise TypeError(f"crosses_boundary: {cls.__name__} must be a frozen dataclass")
    other = _CLASSES.get(cls.__name__)
    same = other is None or (other.__module__, other.__qualname__) == (cls.__module__, cls.__qualname__)
    if not same:  # (the same class defined again, e.g. a reloaded module, replaces the old one)
        raise ValueError(f"crosses_boundary: two classes named {cls.__name__!r}")
    _CLASSES[cls.__name__] = cls
    # The field names, read once here: Dynamo then only reads a tuple of strings when it traces encode().
    cls._boundary_fields = tuple(f.name for f in fields(cls))
    return cls


def _value(v: Any) -> str:
    if isinstance(v, float) and not math.isfinite(v):
        return f"float({repr(str(v))})"  # 'inf' / 'nan' are not literals
    if isinstance(v, tuple):
        return "(" + "".join([_value(x) + ", " for x in v]) + ")"
    if v is None or isinstance(v, (bool, int, float, str)):
        return repr(v)
    if type(v).__name__ in _CLASSES:
        return encode(v)
    raise TypeError(f"encode: a {type(v).__name__} cannot cross the custom-op boundary (plain values only)")


def encode(obj: Any) -> str:
    """The text of ``obj``, a ``@crosses_boundary`` dataclass: its constructor call, keyword arguments."""
    cls = type(obj)
    if _CLASSES.get(cls.__name__) is not cls:
        raise TypeError(f"encode: {cls.__name__} is not registered with @crosses_boundary")
    parts = [name + "=" + _value(getattr(obj, name)) for name in cls._boundary_fields]
    return cls.__name__ + "(" + ", ".join(parts) + ")"


def _build(node: ast.AST) -> Any:
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
        name = node.func.id
        if name == "float" and len(node.args) == 1 and not node.keywords:
            return float(ast.literal_eval(node.args[0]))
        cls = _CLASSES.get(name)
        if cls is None:
            raise ValueError(f"decode: {name!r} is not a dataclass registered with @crosses_boundary")
        if node.args:
            raise ValueError(f"decode: {name}(...) takes keyword arguments only")
        return cls(**{kw.arg: _build(kw.value) for kw in node.keywords})
    if isinstance(node, ast.Tuple):
        return tuple(_build(x) for x in node.elts)
    return ast.literal_eval(node)


@functools.lru_cache(maxsize=4096)
def decode(text: str) -> Any:
    """The dataclass ``encode`` turned into ``text`` (cached: decoding a step's calls costs a dict look-up)."""
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError as e:
        raise ValueError(f"decode: not an encoded dataclass: {text!r}") from e
    out = _build(tree.body)
    if not is_dataclass(out):
        raise ValueError(f"decode: not an encoded dataclass: {text!r}")
    return out
