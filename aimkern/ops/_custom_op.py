"""One helper for every custom op of the Triton paths: tensors, then typed scalars generated from dataclasses.

An op's non-tensor arguments are frozen dataclasses (the op's params, e.g. ``AttentionParams``; the launch
choices, ``LaunchPolicy``) and a few named flags (attention's layout, which gradients a backward computes).
``TypedOp`` writes the op's schema from them, one typed argument per field::

    aimkern::attention_fwd(Tensor q, Tensor? k, Tensor? v, Tensor? prefix_len, bool is_causal,
                           int block_size, float? scale, bool deterministic, bool autotune,
                           str attention_backward, str layout) -> (Tensor, Tensor)

(bool -> ``bool``, int -> ``int``, float -> ``float``, Optional[float] -> ``float?``, torch.dtype ->
``ScalarType``, str -> ``str``: a str field is a name, such as a reduction or a backward path;
Optional[Tuple[float, ...]] -> ``float[]?``, handed back as a tuple: patch_embed's per-channel affine), so a graph
dump or an error shows every value by its name and ``torch.library.opcheck`` checks them like any aten
argument. The call side hands over the dataclass instances (``op(q, k, v, prefix, params, policy,
"bhnd")``); the implementation, the fake and the autograd formula get them back as the same frozen
instances.

Dynamo: a compiled function traces ``TypedOp.__call__``. It unpacks each instance by a tuple of field names
computed here once, with ``getattr``: Dynamo folds attribute reads of a dataclass built in the traced code
into constants, so the custom op sees plain constant scalars (no graph break, nothing guarded on the
instance). The instances are rebuilt inside the op (its implementation, fake, ``setup_context`` and backward
run on real or fake tensors, never under Dynamo), cached by their field values.
"""
from __future__ import annotations

import functools
import typing
from dataclasses import fields, is_dataclass
from typing import Callable, Sequence

import torch

_SCALARS = {bool: "bool", int: "int", float: "float", str: "str", torch.dtype: "ScalarType"}


def _schema_type(tp) -> str:
    """The schema type of a field's annotation: a plain scalar, or Optional of one (``float?``)."""
    if tp in _SCALARS:
        return _SCALARS[tp]
    args = typing.get_args(tp)
    if typing.get_origin(tp) is typing.Union and len(args) == 2 and type(None) in args:
        inner = args[0] if args[1] is type(None) else args[1]
        if inner in _SCALARS:
            return _SCALARS[inner] + "?"
        if typing.get_origin(inner) is tuple and typing.get_args(inner) == (float, Ellipsis):
            return "float[]?"
    raise TypeError(f"TypedOp: a custom-op argument must be bool, int, float, str, torch.dtype or Optional of one, "
                    f"or Optional[Tuple[float, ...]], got {tp!r}")


def _arguments(part) -> tuple:
    """((name, schema type), ...) of one part: a frozen dataclass's fields, or one (name, type) pair."""
    if is_dataclass(part):
        if not part.__dataclass_params__.frozen:
            raise TypeError(f"TypedOp: {part.__name__} must be a frozen dataclass")
        hints = typing.get_type_hints(part)
        return tuple((f.name, _schema_type(hints[f.name])) for f in fields(part))
    name, tp = part
    return ((name, _schema_type(tp)),)


@functools.lru_cache(maxsize=4096)
def _rebuild(cls, values: tuple):
    """The frozen ``cls`` instance of ``values`` (cached: equal calls give the same instance)."""
    return cls(*values)


class TypedOp:
    """The custom op ``aimkern::<name>``: ``tensors`` (names; a trailing "?" marks an optional one), then the
    scalar fields of each of ``parts`` (frozen dataclasses, or (name, type) pairs for a lone flag).

    impl(*tensors, *parts) and fake(*tensors, *parts) receive the parts as instances (a pair's value
    as it is); ``returns`` is the schema's result, e.g. "Tensor" or "(Tensor, Tensor)".
    """

    def __init__(self, name: str, tensors: Sequence[str], parts: Sequence, returns: str, impl: Callable,
                 fake: Callable):
        self.name = name
        self.parts = tuple(parts)
        self._n_tensors = len(tensors)
        args = [("Tensor? " if t.endswith("?") else "Tensor ") + t.rstrip("?") for t in tensors]
        # per part: the field names to unpack on the call side (None for a lone flag), and how to rebuild it
        self._unpack = tuple(tuple(n for n, _ in _arguments(p)) if is_dataclass(p) else None for p in self.parts)
        self._n_scalars = 0
        for p in self.parts:
            args += [f"{kind} {n}" for n, kind in _arguments(p)]
            self._n_scalars += len(_arguments(p))
        names = [a.split()[-1] for a in args]
        if len(set(names)) != len(names):
            raise ValueError(f"TypedOp {name}: two arguments share a name in {names}")
        self.schema = "(" + ", ".join(args) + ") -> " + returns

        def run(*flat):
            return impl(*self.split(flat))

        def fake_run(*flat):
            return fake(*self.split(flat))

        self.op = torch.library.custom_op(f"aimkern::{name}", run, mutates_args=(), schema=self.schema)
        self.op.register_fake(fake_run)

    def flat(self, args: tuple) -> tuple:
        """The op's flat arguments from (tensors..., one value per part): each dataclass instance unpacked
        into its fields by the names read at registration (constants to Dynamo, see the module docstring)."""
        out = list(args[: self._n_tensors])
        for names, value in zip(self._unpack, args[self._n_tensors:]):
            if names is None:
                out.append(value)
            else:
                out.extend([getattr(value, n) for n in names])
        return tuple(out)

    def split(self, flat) -> tuple:
        """(tensors..., parts...) of the op's flat arguments: the dataclass instances rebuilt."""
        out = list(flat[: self._n_tensors])
        i = self._n_tensors
        for part, names in zip(self.parts, self._unpack):
            if names is None:
                out.append(flat[i])
                i += 1
            else:
                # a float[] argument comes back as a list: a tuple again, so the instance stays hashable
                values = tuple(tuple(v) if isinstance(v, list) else v for v in flat[i : i + len(names)])
                out.append(_rebuild(part, values))
                i += len(names)
        return tuple(out)

    def __call__(self, *args):
        return self.op(*self.flat(args))

    def register_autograd(self, backward: Callable, setup_context: Callable) -> None:
        """setup_context(ctx, *tensors, *parts, output); backward(ctx, *grads) -> one gradient (or None) per
        tensor argument (the scalars get None here)."""
        nones = (None,) * self._n_scalars

        def setup(ctx, inputs, output):
            setup_context(ctx, *self.split(inputs), output)

        def bwd(ctx, *grads):
            return (*backward(ctx, *grads), *nones)

        self.op.register_autograd(bwd, setup_context=setup)

