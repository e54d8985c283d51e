"""What the library knows about an op at run time: its ``OpSpec``, the ``Problem`` of a call, its candidates.

An ``OpSpec`` says, for one public op (``attention``, ``patch_embed``, ``linear_cross_entropy``,
``next_patch_pixel_loss``):

* how a call is checked and normalized (``check``: the canonical tensors and the op's frozen params
  dataclass, or a ValueError / TypeError naming the argument), and which paths run it: the reference that
  defines correct, the Triton entry, the candidates measured dispatch chooses among;
* how a call is described without its data (``Problem``: device, dtype, shapes, the params, which inputs
  need a gradient), and how to make synthetic inputs for such a description (``make_inputs``);
* the tolerance rule a candidate is held to (``err(candidate) <= factor * err(reference in the same
  dtype) + atol``, errors against float64), the small verification problem of a real problem and the
  dispatch key's parts that are not the dtype (``mask_kind``, ``shape_band``).

Every path, candidate or not, is called the same way: ``fn(*tensors, params)``, the tensors in the spec's
order (None where absent). Test data (contract examples, opcheck samples) lives in tests/op_cases.py, the
compile gate's problems in benchmarks/kernel_problems.py, the benchmarks' shapes and peers in
benchmarks/bench_cases.py: none of it is needed to run an op.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, fields, replace
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
    params:    the op's frozen params dataclass (``AttentionParams``, ...): the call's options.
    requires_grad: one bool per tensor argument: whether autograd will want its gradient.
    dtypes:    one dtype name per tensor argument (None where absent): integer arguments (targets,
               prefix_len) and mixed floating dtypes are part of the problem too.
    """

    op: str
    device: str
    dtype: str
    shapes: tuple
    params: Any
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
        """The params' field ``name`` (``default`` when the params have no such field)."""
        return getattr(self.params, name, default)

    def with_(self, **changes) -> "Problem":
        """A copy with fields changed (``params`` may be a dict of the params' fields to change)."""
        if isinstance(changes.get("params"), dict):
            changes["params"] = replace(self.params, **changes["params"])
        return replace(self, **changes)


def describe(op: str, tensors: Iterable[Optional[torch.Tensor]], params: Any, dtype: torch.dtype) -> Problem:
    """The ``Problem`` of a call: ``tensors`` in the op's order (None where absent), its params."""
    tensors = tuple(tensors)
    ref = next(t for t in tensors if t is not None)
    grad_on = torch.is_grad_enabled()
    return Problem(
        op=op,
        device=str(ref.device),
        dtype=dtype_name(dtype),
        shapes=tuple(None if t is None else tuple(t.shape) for t in tensors),
        params=params,
        requires_grad=tuple(bool(t is not None and grad_on and t.requires_grad) for t in tensors),
        dtypes=tuple(None if t is None else dtype_name(t.dtype) for t in tensors),
    )


# -------------------------------------------------------------------------------------------- candidates
SupportRule = Callable[[Problem], Union[bool, str, None]]


@dataclass(frozen=True, eq=False)
class Candidate:
    """One way to run an op: a forward whose backward autograd takes (a custom op's, or torch's own).

    name:     unique within the op, e.g. "triton-split", "sdpa-flash", "reference".
    fn:       ``fn(*tensors, params)``: the spec's tensors in order (None where absent), the op's params.
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
    """What the library needs to run, check and dispatch one op (see the module docstring).

    name:        the public op's name.
    tensor_args: the names of its tensor arguments, in order (optional ones may be None in a call).
    positional:  how many of them the public op takes positionally (the rest are keywords).
    params_type: the op's frozen params dataclass; its fields are the public op's other keyword arguments.
    check:       (tensors, params, backend, op) -> (tensors, params): validate a call for ``backend``
                 ("triton" or "reference": the dtypes each computes in) and normalize it (e.g. prefix_len
                 to None or an int32 (B,) tensor); ``op`` names the caller in the messages.
    reference:   the plain-PyTorch definition, ``reference(*tensors, params)``.
    triton:      the Triton entry (``aimkern.ops.<op>``), ``triton(*tensors, params)``.
    candidates:  built-in candidates; users add more with ``aimkern.dispatch.register``.
    make_inputs: (problem, generator) -> the tensors, synthetic, on the problem's device.
    small_problem: problem -> the verification problem (same dtype, mask kind and code path, small).
    mask_kind:   problem -> a short string for the dispatch key ("full", "causal", "block", "prefix", ...).
    shape_band:  problem -> the dispatch key's shape band (shapes in the same band share one decision).
    tolerance:   the rule a candidate's output and gradients are held to.
    autocast:    the indices of the tensors that follow autocast's cast (the GEMM-like ops' floating inputs).
    needs_reference: tensors -> True for calls that only the reference serves (the fixed rule then runs
                 it even on CUDA), or None.
    reference_bytes: problem -> about the bytes the float64 reference (forward and backward) holds at that
                 shape, where it builds more than copies of its inputs (attention's N x N scores); None:
                 the dispatcher's estimate from the inputs. Decides whether the real-shape check can use it.
    verification_launch: problem -> a context manager the verification problem's candidate runs in, so that
                 it takes the launch geometry the real ``problem`` takes where a small problem would not
                 (attention's flat grid above 65,535 heads); None: nothing to force.
    compute_dtype: tensors -> the call's floating dtype (``Problem.dtype``) where the first tensor may not
                 have it (patch_embed's uint8 images: the weight's); None: the first tensor's dtype.
    """

    name: str
    tensor_args: tuple
    positional: int
    params_type: type
    check: Callable[..., tuple]
    reference: Callable[..., Any]
    triton: Callable[..., Any]
    candidates: list
    make_inputs: Callable[..., tuple]
    small_problem: Callable[[Problem], Problem]
    mask_kind: Callable[[Problem], str]
    shape_band: Callable[[Problem], str]
    tolerance: Tolerance = field(default_factory=Tolerance)
    autocast: tuple = ()
    needs_reference: Optional[Callable[[tuple], bool]] = None
    reference_bytes: Optional[Callable[[Problem], int]] = None
    verification_launch: Optional[Callable[[Problem], Any]] = None
    compute_dtype: Optional[Callable[[tuple], torch.dtype]] = None
    param_names: tuple = field(init=False)  # the params' field names, read once (a constant to Dynamo)

    def __post_init__(self):
        self.param_names = tuple(f.name for f in fields(self.params_type))

    def verification_context(self, problem: Problem):
        """The context the verification of ``problem`` runs its candidate in (``verification_launch``)."""
        return self.verification_launch(problem) if self.verification_launch else contextlib.nullcontext()

    def candidate(self, name: str) -> Candidate:
        for c in self.candidates:
            if c.name == name:
                return c
        raise KeyError(f"{self.name}: no candidate named {name!r}; have {[c.name for c in self.candidates]}")

    def public_call(self, tensors: tuple, params) -> tuple:
        """(args, kwargs) of the public op's signature for ``tensors`` and ``params`` (without ``backend``):
        what a user's candidate registered with ``aimkern.dispatch.register`` is called with."""
        kwargs = {name: getattr(params, name) for name in self.param_names}
        kwargs.update(zip(self.tensor_args[self.positional:], tensors[self.positional:]))
        return tuple(tensors[: self.positional]), kwargs


def outputs(out) -> tuple:
    """An op's output as a tuple of tensors (the verification and the benchmarks compare each)."""
    return out if isinstance(out, tuple) else (out,)


# ---------------------------------------------------------------------------------------------- registry
SPECS: dict = {}


def add_spec(spec: OpSpec) -> OpSpec:
    if spec.name in SPECS:
        raise ValueError(f"an OpSpec named {spec.name!r} is already registered")
    SPECS[spec.name] = spec
    return spec
