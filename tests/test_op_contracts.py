"""Contract tests generated from the op specs (aimkern.specs.all_specs()): one set of checks for every op
and every aimkern (Triton) candidate of it, under Triton's interpreter on CPU (compiled on CUDA).

* reference parity: ``aimkern.dispatch.measure.verify`` on each of the spec's awkward small problems
  (tests/op_cases.py ``EXAMPLES``), fp32 and fp16: output and every input gradient within the spec's tolerance rule
  (``err <= factor * err(reference in the same dtype) + atol``, errors against float64);
* the empty batch (``EMPTY_BATCH``) under the same rule;
* gradients through strides: the stride-0 upstream gradient of ``.sum()``, and inputs in a layout no
  kernel may assume (``op_cases.strided``: memory order reversed, neighbours two apart);
* ``torch.compile(fullgraph=True)`` forward and backward (aot_eager on CPU) equal to eager;
* ``torch.library.opcheck`` of every ``aimkern::`` custom op (``CUSTOM_OPS`` samples), and every
  registered ``aimkern::`` op has a sample.

The contracts that look for trouble are generated from the same specs, one file per axis, with shared
inputs (tests/contract_inputs.py) and oracle (tests/contract_check.py): every tensor argument in every
memory layout (tests/test_contract_layouts.py), hostile values and option types
(tests/test_contract_values.py), every autograd mode (tests/test_contract_autograd.py), and sizes that
cross the launch tables' boundaries (tests/test_contract_sizes.py), each under the interpreter's tiles and
the GPU tables'.

Op-specific behaviour (mask tiles never read, the packed qkv gradient, host syncs, GPU shapes) stays in
tests/test_<op>_triton.py and friends.
"""
from __future__ import annotations

import pytest
import torch

from aimkern.dispatch.measure import fresh_leaves, max_abs_err, verify
from aimkern.specs import all_specs, outputs
from conftest import HAS_CUDA
from op_cases import CUSTOM_OPS, EMPTY_BATCH, EXAMPLES, strided

SPECS = all_specs()
CANDIDATES = [pytest.param(s, c, id=f"{s.name}-{c.name}") for s in SPECS for c in s.candidates if c.kind == "aimkern"]
DEVICE = "cuda" if HAS_CUDA else "cpu"


@pytest.fixture(autouse=True)
def _one_config_per_family(no_autotune):
    """On CUDA: no autotuning (one compile per family)."""


def _on_device(problem):
    return problem.with_(device=DEVICE)


def _applicable(cand, problems) -> list:
    """The problems ``cand`` says it supports; never none (a contract that checks nothing cannot fail)."""
    chosen = [p for p in problems if cand.unsupported(p) is None]
    assert chosen, f"{cand.name} supports none of {[p.shapes[0] for p in problems]}: " + "; ".join(
        str(cand.unsupported(p)) for p in problems)
    return chosen


def test_every_op_has_triton_candidates_and_contract_data():
    assert {s.name for s in SPECS} == {"attention", "patch_embed", "linear_cross_entropy", "next_patch_pixel_loss",
                                       "attention_varlen", "next_patch_pixel_loss_varlen"}
    for s in SPECS:
        assert any(c.kind == "aimkern" for c in s.candidates), s.name
        assert s.name in EXAMPLES and s.name in EMPTY_BATCH and s.name in CUSTOM_OPS, s.name


# ------------------------------------------------------------------------------------ reference parity
@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("spec,cand", CANDIDATES)
def test_reference_parity(spec, cand, dtype):
    for problem in _applicable(cand, [_on_device(p) for p in EXAMPLES[spec.name](dtype)]):
        assert verify(spec, cand, problem) is None, (problem, verify(spec, cand, problem))


@pytest.mark.parametrize("spec,cand", CANDIDATES)
def test_empty_batch(spec, cand):
    problem = EMPTY_BATCH[spec.name]("float32")
    if problem is None:
        pytest.skip(f"{spec.name} refuses an empty batch")
    problem = _on_device(problem)
    if cand.unsupported(problem) is not None:
        pytest.skip(f"{cand.name}: {cand.unsupported(problem)}")
    assert verify(spec, cand, problem) is None


# ------------------------------------------------------------------------------------ strides, compile
def _grad_problem(spec, cand):
    """The first fp32 example with a gradient that ``cand`` supports."""
    return _applicable(cand, [_on_device(p) for p in EXAMPLES[spec.name]("float32") if p.grad])[0]


def _outputs_and_grads(spec, cand, tensors, problem, upstream: str, fn=None):
    """(outputs, gradients of the inputs that require grad): upstream "ones" is the stride-0 gradient of
    ``.sum()``, "random" a fixed normal one."""
    run = fn or (lambda *ts: outputs(cand.fn(*ts, problem.params)))
    outs = run(*tensors)
    gen = torch.Generator().manual_seed(1)
    loss = 0
    for o in outs:
        if not o.requires_grad:
            continue
        if upstream == "ones":
            loss = loss + o.sum()
        else:
            loss = loss + (o * torch.randn(o.shape, generator=gen).to(o.device, o.dtype)).sum()
    wanted = [t for t, rg in zip(tensors, problem.requires_grad) if rg]
    return tuple(o.detach() for o in outs), torch.autograd.grad(loss, wanted)


def _within_tolerance(spec, problem, got, ref64, same):
    for name, g, r, s in zip(range(len(got)), got, ref64, same):
        err = max_abs_err(g, r)
        bound = spec.tolerance.bound(problem.dtype, max_abs_err(s, r))
        assert err <= bound, f"{spec.name} value {name}: error {err:.3g} > bound {bound:.3g}"


@pytest.mark.parametrize("layout", ["stride0-grad", "strided-inputs"])
@pytest.mark.parametrize("spec,cand", CANDIDATES)
def test_gradients_through_strides(spec, cand, layout):
    problem = _grad_problem(spec, cand)
    base = spec.make_inputs(problem, torch.Generator().manual_seed(0))
    upstream = "ones" if layout == "stride0-grad" else "random"
    tensors = fresh_leaves(base, problem)
    if layout == "strided-inputs":
        tensors = tuple(strided(t) for t in tensors)
        assert any(t is not None and t.dim() > 0 and not t.is_contiguous() for t in tensors)
    got = _outputs_and_grads(spec, cand, tensors, problem, upstream)
    def ref_fn(*ts):
        return outputs(spec.reference(*ts, problem.params))

    ref64 = _outputs_and_grads(spec, cand, fresh_leaves(base, problem, torch.float64), problem, upstream, fn=ref_fn)
    same = _outputs_and_grads(spec, cand, fresh_leaves(base, problem), problem, upstream, fn=ref_fn)
    _within_tolerance(spec, problem, got[0] + tuple(got[1]), ref64[0] + tuple(ref64[1]), same[0] + tuple(same[1]))


@pytest.mark.parametrize("spec,cand", CANDIDATES)
def test_torch_compile_fullgraph_forward_and_backward(spec, cand):
    problem = _grad_problem(spec, cand)
    base = spec.make_inputs(problem, torch.Generator().manual_seed(0))
    params = problem.params

    def f(*ts):
        return outputs(cand.fn(*ts, params))

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="inductor" if HAS_CUDA else "aot_eager")
    got = _outputs_and_grads(spec, cand, fresh_leaves(base, problem), problem, "random", fn=compiled)
    want = _outputs_and_grads(spec, cand, fresh_leaves(base, problem), problem, "random", fn=f)
    for a, b in zip(got[0] + tuple(got[1]), want[0] + tuple(want[1])):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------- opcheck
def _samples():
    return [pytest.param(op, args, id=label) for s in SPECS for label, op, args in CUSTOM_OPS[s.name]()]


@pytest.mark.parametrize("op,args", _samples())
def test_opcheck(op, args):
    args = tuple(a.to(DEVICE) if isinstance(a, torch.Tensor) else a for a in args)
    torch.library.opcheck(op, args)


def test_every_aimkern_custom_op_has_an_opcheck_sample():
    registered = {n for n in torch._C._dispatch_get_all_op_names() if n.startswith("aimkern::")}
    sampled = {str(op).replace(".", "::", 1) for s in SPECS for _, op, _ in CUSTOM_OPS[s.name]()}  # "aimkern.x"
    assert registered, "no aimkern:: custom op is registered: the check would see nothing"
    assert registered <= sampled, f"custom ops without an opcheck sample: {sorted(registered - sampled)}"
