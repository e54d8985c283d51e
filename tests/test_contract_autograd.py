"""Contract: every autograd mode of every op and candidate that runs on CPU, fp32 and fp16 inputs, under the
interpreter's tiles and the GPU tables'.

* create_graph: a double backward (a gradient penalty) either works, and then matches the float64
  reference's second derivative, or raises; it never returns first derivatives that silently stopped
  tracking the graph where the reference's do;
* autocast to fp16 and to bf16 through the public op (``backend="triton"``, fp32 inputs): right within the
  autocast dtype's tolerance against the float64 reference on the inputs autocast hands the kernels, or,
  under Triton's interpreter, refused with a TypeError where its bf16 ``tl.dot`` would be wrong.

The inputs are ``contract_inputs.small_cases``.
"""
from __future__ import annotations

import pytest
import torch

from aimkern.ops._launch import interpreting
from aimkern.specs import Candidate, all_specs, outputs
from contract_check import check_case, compare, for_candidate, params, public_op, tables
from contract_inputs import small_cases

SPECS = all_specs()
REFUSED = (RuntimeError, NotImplementedError)  # how torch says "no derivative formula"


# ---------------------------------------------------------------------------------------- create_graph
def _leaves(tensors, problem, dtype=None):
    return tuple(None if t is None else (t.detach().to(dtype) if dtype is not None and t.is_floating_point()
                                         else t.detach()).clone().requires_grad_(rg and t.is_floating_point())
                 for t, rg in zip(tensors, problem.requires_grad))


def _first_and_second(spec, cand, problem, tensors, dtype, context):
    """(first derivatives (create_graph=True), second derivatives of a random penalty on them) or the
    exception that refused either; ``dtype`` casts the floating inputs (the references run in float64)."""
    leaves = _leaves(tensors, problem, dtype)
    wanted = [t for t, rg in zip(leaves, problem.requires_grad) if rg]
    gen = torch.Generator().manual_seed(2)
    with context:
        outs = [o for o in outputs(cand.fn(*leaves, problem.params)) if o.requires_grad]
        loss = sum((o.double() * torch.randn(o.shape, generator=gen, dtype=torch.float64)).sum() for o in outs)
        try:
            first = torch.autograd.grad(loss, wanted, create_graph=True)
        except REFUSED as e:
            return e, None
        if not any(g.requires_grad for g in first):
            return first, None
        penalty = sum((g.double() * torch.randn(g.shape, generator=gen, dtype=torch.float64)).sum()
                      for g in first if g.requires_grad)
        try:
            second = torch.autograd.grad(penalty, wanted, allow_unused=True)
        except REFUSED as e:
            return first, e
    return first, second


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("spec,cand,config", params(SPECS))
def test_double_backward_works_or_raises(spec, cand, config, dtype):
    ran = 0
    for label, problem, tensors in small_cases(spec.name, dtype):
        problem = for_candidate(cand, problem, config)
        if problem is None:
            continue
        ran += 1
        first, second = _first_and_second(spec, cand, problem, tensors, None, tables(config))
        if isinstance(first, BaseException) or isinstance(second, BaseException):
            continue  # refused: allowed
        ref = Candidate("reference", spec.reference, kind="torch")
        ref_first, ref_second = _first_and_second(spec, ref, problem, tensors, torch.float64,
                                                  torch.enable_grad())
        names = [n for n, rg in zip(spec.tensor_args, problem.requires_grad) if rg]
        dropped = [n for n, g, r in zip(names, first, ref_first) if r.requires_grad and not g.requires_grad]
        assert not dropped, (f"{spec.name} {label}: create_graph=True returned first derivatives of {dropped} "
                             "that do not require grad (the reference's do): a double backward through them "
                             "silently drops this op's second-order terms; raise instead, or support it")
        if second is None:
            continue  # no first derivative depends on the inputs (as in the reference): nothing to compare
        _, same_second = _first_and_second(spec, ref, problem, tensors, None, torch.enable_grad())
        msg = compare(spec, dtype, [f"second derivative wrt {n}" for n in names], second, same_second, ref_second)
        assert msg is None, f"{spec.name} {label}: {msg}"
    if not ran:
        pytest.skip(f"{cand.name} supports none of the small cases")


# --------------------------------------------------------------------------------------------- autocast
def _casts_under_autocast(spec) -> bool:
    """Whether the public op applies autocast's rule to its inputs (``OpSpec.autocast``, applied by
    ``aimkern.functional.run``): the GEMM-like ops do; the others compute in their inputs' dtype under
    autocast too."""
    return bool(spec.autocast)


@pytest.mark.parametrize("autocast", ["float16", "bfloat16"])
@pytest.mark.parametrize("spec,cand,config", params(SPECS, aimkern_only=True))
def test_autocast(spec, cand, config, autocast):
    adt = getattr(torch, autocast)
    casts = _casts_under_autocast(spec)
    context, fn = public_op(spec, cand)

    def run():
        stack = context(config)
        stack.enter_context(torch.autocast("cpu", dtype=adt))
        return stack

    public = Candidate(cand.name, fn, kind=cand.kind)
    for label, problem, tensors in small_cases(spec.name, "float32"):
        problem = for_candidate(cand, problem, config)
        if problem is None:
            continue
        # The values autocast hands the kernels, kept in fp32: the float64 reference then sees exactly them.
        seen = tuple(t.to(adt).float() if casts and t is not None and t.is_floating_point() else t for t in tensors)
        try:
            msg = check_case(spec, public, problem, seen, run=run, compute_dtype=adt if casts else None)
        except TypeError as e:
            if autocast == "bfloat16" and interpreting() and "bfloat16" in str(e):
                continue  # refused where the interpreter's bf16 dot is wrong: allowed
            raise AssertionError(f"{spec.name} {label} under autocast({autocast}) raised {e!r}") from e
        assert msg is None, f"{spec.name} {label} under autocast({autocast}): {msg}"
