"""One declarative spec per public op: what measured dispatch, the contract tests, the compile gate and the
benchmarks all read.

An ``OpSpec`` says, for one op (``attention``, ``patch_embed``, ``linear_cross_entropy``,
``next_patch_pixel_loss``):

* how a call is described without its data (``Problem``: device, dtype, shapes, plain options, which
  inputs need a gradient), and how to make synthetic inputs for such a description (``make_inputs``);
* the reference that defines correct, and the tolerance rule a candidate is held to
  (``err(candidate) <= factor * err(reference in the same dtype) + atol``, errors against float64);
* the candidates: forward + backward pairs with the public op's signature (autograd differentiates them),
  each saying where it applies;
* the small verification problem of a real problem (same dtype, mask kind and code path, a fraction of
  the size) and the key's parts that are not shapes (the mask kind, the shape band);
* the compile gate's problems and the benchmarks' shapes (filled by the op's spec module).

The registry (``SPECS``) is filled by ``aimkern.ops.specs`` on first use.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional, Union

import torch

# ---------------------------------------------------------------------------------------------- problems
_DTYPES = {
    "float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64,
}
Shape = Optional[tuple]  # a tensor argument's shape, or None when the argument is absent


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


@dataclass(frozen=True)
class Problem:
    """One call of an op, described without its data.

    op:        the op's name, e.g. "attention".
    device:    "cpu" or "cuda:0", ... (the inputs' device).
    dtype:     the floating inputs' dtype name, e.g. "bfloat16".
    shapes:    one entry per tensor argument of the op, in the op's order (None where absent), e.g. for
               attention (q, k, v, prefix_len): ((B, H, N, D), (B, H, N, D), (B, H, N, D), (B,) or None).
    options:   the public keyword arguments that are not tensors, as sorted (name, value) pairs
               (plain bools / ints / floats / strings / None).
    requires_grad: one bool per tensor argument: whether autograd will want its gradient.
    dtypes:    one dtype name per tensor argument (None where absent): integer arguments (targets,
               prefix_len) and mixed floating dtypes are part of the problem too.
    """

    op: str
    device: str
    dtype: str
    shapes: tuple
    options: tuple
    requires_grad: tuple
    dtypes: tuple = ()

    def dtype_of(self, index: int) -> torch.dtype:
        """The dtype of tensor argument ``index`` (the problem's dtype when not recorded)."""
        name = self.dtypes[index] if index < len(self.dtypes) and self.dtypes[index] else self.dtype
        return _DTYPES.get(name) or getattr(torch, name)

    @property
    def grad(self) -> bool:
        """Whether the call will be differentiated (grad mode on and some input requires grad)."""
        return any(self.requires_grad)

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    @property
    def device_type(self) -> str:
        return self.device.split(":")[0]

    def option(self, name: str, default: Any = None) -> Any:
        for k, v in self.options:
            if k == name:
                return v
        return default

    def kwargs(self) -> dict:
        return dict(self.options)

    def with_(self, **changes) -> "Problem":
        """A copy with fields changed (``options`` may be a dict)."""
        if isinstance(changes.get("options"), dict):
            changes["options"] = tuple(sorted(changes["options"].items()))
        d = dict(op=self.op, device=self.device, dtype=self.dtype, shapes=self.shapes, options=self.options,
                 requires_grad=self.requires_grad, dtypes=self.dtypes)
        d.update(changes)
        return Problem(**d)

    def encode(self) -> str:
        """A string that ``Problem.decode`` turns back into this problem (the compile path passes problems
        as constants)."""
        return repr((self.op, self.device, self.dtype, self.shapes, self.options, self.requires_grad, self.dtypes))

    @staticmethod
    def decode(text: str) -> "Problem":
        import ast

        op, device, dtype, shapes, options, requires_grad, dtypes = ast.literal_eval(text)
        return Problem(op, device, dtype, tuple(shapes), tuple(options), tuple(requires_grad), tuple(dtypes))


def describe(op: str, tensors: Iterable[Optional[torch.Tensor]], options: dict, dtype: torch.dtype) -> Problem:
    """The ``Problem`` of a call: ``tensors`` in the op's order (None where absent), its plain options."""
    tensors = tuple(tensors)
    ref = next(t for t in tensors if t is not None)
    grad_on = torch.is_grad_enabled()
    return Problem(
        op=op,
        device=str(ref.device),
        dtype=dtype_name(dtype),
        shapes=tuple(None if t is None else tuple(t.shape) for t in tensors),
        options=tuple(sorted(options.items())),
        requires_grad=tuple(bool(t is not None and grad_on and t.requires_grad) for t in tensors),
        dtypes=tuple(None if t is None else dtype_name(t.dtype) for t in tensors),
    )


# -------------------------------------------------------------------------------------------- candidates
SupportRule = Callable[[Problem], Union[bool, str, None]]


@dataclass(frozen=True, eq=False)
class Candidate:
    """One way to run an op: a forward whose backward autograd takes (a custom op's, or torch's own).

    name:     unique within the op, e.g. "triton-split", "sdpa-flash", "reference".
    fn:       the public op's signature without ``backend``: ``fn(*tensors, **options)``.
    kind:     "aimkern" (a Triton path), "torch" (PyTorch's own, the reference included) or "user".
    supports: problem -> True / None (applies), False or a string (does not; the string says why).
    devices:  the device types it runs on.
    interpreted: a Triton path that, on CPU tensors, would run under Triton's interpreter (a correctness
              tool, not a fast path: measured dispatch on CPU leaves it out unless asked).
    extra:    op-specific variants, e.g. attention's "packed": the same path on a (B, N, 3, H, D) qkv.
    """

    name: str
    fn: Callable[..., Any]
    kind: str = "user"
    supports: Optional[SupportRule] = None
    devices: tuple = ("cuda", "cpu")
    interpreted: bool = False
    extra: dict = field(default_factory=dict)

    def unsupported(self, problem: Problem) -> Optional[str]:
        """None when the candidate applies to ``problem``, else the reason it does not."""
        if problem.device_type not in self.devices:
            return f"runs on {'/'.join(self.devices)}, not {problem.device_type}"
        if self.supports is None:
            return None
        try:
            ok = self.supports(problem)
        except Exception as e:  # a user's rule that raises must not break the op
            return f"supports() raised {type(e).__name__}: {e}"
        if ok is True or ok is None:
            return None
        return ok if isinstance(ok, str) else "supports() returned False"


# -------------------------------------------------------------------------------------------------- specs
@dataclass(frozen=True)
class Tolerance:
    """``err(candidate) <= factor * err(reference in the same dtype) + atol[dtype] * max(1, max |ref|)``:
    max abs errors against float64. The floor scales with the values once they exceed 1 (a summed loss of
    hundreds may differ in its last bits without being wrong)."""

    factor: float = 2.0
    atol: dict = field(default_factory=lambda: {"float32": 1e-5, "float16": 1e-3, "bfloat16": 1e-2})

    def bound(self, dtype: str, same_dtype_err: float, ref_absmax: float = 1.0) -> float:
        return self.factor * same_dtype_err + self.atol.get(dtype, 1e-5) * max(1.0, ref_absmax)


@dataclass
class OpSpec:
    """Everything generic code needs to know about one op (see the module docstring).

    name:            the public op's name.
    tensor_args:     the names of its tensor arguments, in order (optional ones may be None in a call).
    grad_args:       those of them that can receive a gradient.
    reference:       the plain-PyTorch definition, ``reference(*tensors, **options)``.
    candidates:      built-in candidates; users add more with ``aimkern.dispatch.register``.
    make_inputs:     (problem, generator) -> the tensors, synthetic, on the problem's device.
    small_problem:   problem -> the verification problem (same dtype, mask kind and code path, small).
    mask_kind:       problem -> a short string for the key ("full", "causal", "block", "prefix", "-").
    band:            problem -> the key's shape band (shapes in the same band share one decision).
    call_layout:     (tensors, options) -> (args, kwargs) of the public signature (default: the tensors
                     positionally, the options as keywords), for ops whose optional tensors are keywords.
    tolerance:       the rule a candidate's output and gradients are held to.
    verify_outputs:  output -> the tensors compared to the reference (default: the output itself).
    gate_problems:   subset -> (label, thunk) pairs for the compile gate (benchmarks/kernel_problems.py):
                     each thunk calls the op module's public launchers (``launch_*``) on meta tensors;
                     subset "all" reaches every config-table entry, "gpu-run" what benchmarks/gpu_check.sh
                     meets. The gate records the launches with ``observe(dry_run=True)``.
    family:          the kernel family's name: aimkern/kernels/<family>.py, the compile gate's --family.
    custom_ops:      () -> (label, op, args) samples, at least one per ``torch.ops.aimkern`` custom op the
                     Triton path registers, for ``torch.library.opcheck`` (tests/test_op_contracts.py); the
                     args are small CPU tensors, run under Triton's interpreter.
    examples:        dtype name -> small awkward CPU problems (ragged tiles, every option class, with and
                     without gradients) that the contract tests hold every candidate to the reference on.
    empty_batch:     dtype name -> the problem of an empty batch, or None where an empty call is refused.
    bench:           the benchmark's shapes and peers (benchmarks/harness.py), free-form per op.
    """

    name: str
    tensor_args: tuple
    grad_args: tuple
    reference: Callable[..., Any]
    candidates: list
    make_inputs: Callable[..., tuple]
    small_problem: Callable[[Problem], Problem]
    mask_kind: Callable[[Problem], str]
    band: Callable[[Problem], str]
    call_layout: Optional[Callable[[tuple, dict], tuple]] = None
    tolerance: Tolerance = field(default_factory=Tolerance)
    verify_outputs: Optional[Callable[[Any], tuple]] = None
    gate_problems: Optional[Callable[[str], Iterable]] = None
    family: Optional[str] = None
    custom_ops: Optional[Callable[[], Iterable]] = None
    examples: Optional[Callable[[str], list]] = None
    empty_batch: Optional[Callable[[str], Optional[Problem]]] = None
    bench: Optional[dict] = None

    def candidate(self, name: str) -> Candidate:
        for c in self.candidates:
            if c.name == name:
                return c
        raise KeyError(f"{self.name}: no candidate named {name!r}; have {[c.name for c in self.candidates]}")

    def split_call(self, tensors: tuple, options: dict) -> tuple:
        """(args, kwargs) that call a candidate (the public op's signature) on ``tensors`` and ``options``."""
        if self.call_layout is not None:
            return self.call_layout(tuple(tensors), dict(options))
        return tuple(tensors), dict(options)

    def outputs(self, out) -> tuple:
        if self.verify_outputs is not None:
            return tuple(self.verify_outputs(out))
        return out if isinstance(out, tuple) else (out,)


SPECS: dict = {}


def add_spec(spec: OpSpec) -> OpSpec:
    if spec.name in SPECS:
        raise ValueError(f"an OpSpec named {spec.name!r} is already registered")
    SPECS[spec.name] = spec
    return spec


def get_spec(op: str) -> OpSpec:
    """The registered spec of ``op`` (importing the built-in specs on first use)."""
    from . import specs  # noqa: F401  (registers the built-in specs)

    if op not in SPECS:
        raise ValueError(f"unknown op {op!r}; the ops with specs are {sorted(SPECS)}")
    return SPECS[op]


def all_specs() -> list:
    from . import specs  # noqa: F401

    return list(SPECS.values())
