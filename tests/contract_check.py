"""The oracle of the contract tests that look for trouble (tests/test_contract_*.py).

``check_case`` runs one candidate of one op on given inputs, in a given memory layout, under the
interpreter's or the GPU tables' launch configs, and holds its outputs and every input gradient to the op
spec's tolerance rule against the float64 reference:

    err(candidate) <= factor * err(reference in the test dtype) + atol[dtype] * max(1, max |ref|)

(``OpSpec.tolerance``, errors are max abs errors against float64). Where the reference itself overflows in
the test dtype (an inf or NaN the float64 reference does not have), the baseline is the reference run in
float32. Where the float64 reference is NaN or inf (a mean over no token), the candidate must be non-finite
at exactly those places, and finite everywhere else.

Shapes: inputs are the op's tensor arguments in spec order (``OpSpec.tensor_args``), None where absent.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional

import torch

from aimkern.dispatch.measure import max_abs_err
from aimkern.ops import launch_policy
from aimkern.ops._launch import gpu_configs, kernels
from aimkern.specs import Candidate, OpSpec, Problem, outputs

from contract_inputs import lay_out

CONFIGS = ("interp", "gpu")  # the interpreter's own tile configs; the GPU tables' first configs


@contextlib.contextmanager
def tables(config: str):
    """Launches inside run ``config``'s tiles ("interp" or "gpu"), never autotuned."""
    with launch_policy(autotune=False), (gpu_configs() if config == "gpu" else contextlib.nullcontext()):
        yield


def runnable(spec: OpSpec) -> list:
    """(candidate, config) pairs of ``spec`` that run on CPU: every candidate but the reference itself, the
    Triton ones (interpreted) under both configs."""
    out = []
    for c in spec.candidates:
        if c.name == "reference" or c.fn is spec.reference or "cpu" not in c.devices:
            continue
        out += [(c, cfg) for cfg in (CONFIGS if c.interpreted else ("interp",))]
    return out


def params(specs, *extra, aimkern_only: bool = False) -> list:
    """pytest params (spec, cand, config, *extra) with ids "op-candidate-config"."""
    import pytest

    out = []
    for s in specs:
        for c, cfg in runnable(s):
            if aimkern_only and c.kind != "aimkern":
                continue
            out.append(pytest.param(s, c, cfg, *extra, id=f"{s.name}-{c.name}-{cfg}"))
    return out


def for_candidate(cand: Candidate, problem: Problem, config: str = "interp") -> Optional[Problem]:
    """``problem`` as ``cand`` takes it, or None where it does not apply: a candidate for one option value
    only (attention's triton-split-atomic: deterministic=False) gets the problem with that value. Under the
    GPU tables, attention's fused backward applies where the GPU's rule says it fits (the candidate reads
    that rule from a CUDA device's table arch, 90)."""
    if cand.unsupported(problem) is not None:
        if problem.option("deterministic") is None:
            return None
        problem = problem.with_(params=dict(deterministic=not problem.option("deterministic")))
        if cand.unsupported(problem) is not None:
            return None
    if config == "gpu" and cand.name == "triton-fused":
        _, _, n, d = problem.shapes[0]
        if not kernels("attention").fused_backward_fits(d, problem.dtype == "float32", n, 90):
            return None
    return problem


@dataclass(frozen=True)
class Upstream:
    """The incoming gradient of each differentiable output: ``value`` everywhere when given (a 0-d loss
    scaled by a GradScaler: 65536.0), else a fixed standard normal times ``scale``; rounded to the output's
    dtype, as autograd would hand it over."""

    scale: float = 1.0
    value: Optional[float] = None


def _reference(spec: OpSpec) -> Candidate:
    return Candidate("reference", spec.reference, kind="torch")


def _layouts(layout, n: int) -> tuple:
    """One layout per tensor argument plus one for the incoming gradients, from None, a layout name (all of
    them) or such a tuple."""
    return tuple(layout) if isinstance(layout, tuple) else (layout,) * (n + 1)


def _run(spec, cand, tensors, problem, upstream, layout, gen, context):
    """(outputs, gradients, the views passed, the incoming gradients passed) of one call; the inputs and
    the incoming gradients laid out as ``layout`` says (see ``_layouts``); gradients are taken with respect
    to the laid-out views."""
    layouts = _layouts(layout, len(tensors))
    views = [None if t is None else lay_out(t, lay, gen, rg)
             for t, rg, lay in zip(tensors, problem.requires_grad, layouts)]
    with context:
        outs = outputs(cand.fn(*views, problem.params))
        wanted = [v for v, rg in zip(views, problem.requires_grad) if rg]
        if not wanted:
            return tuple(o.detach() for o in outs), (), views, []
        diff = [o for o in outs if o.requires_grad]
        ups = [lay_out(u.to(o.dtype), layouts[-1], gen, False) for o, u in zip(diff, upstream)]
        grads = torch.autograd.grad(diff, wanted, ups, allow_unused=True)
    return tuple(o.detach() for o in outs), tuple(grads), views, ups


def upstream_for(spec, tensors, problem, up: Upstream, gen) -> list:
    """The incoming gradients (one per output), drawn once and shared by every run of a case."""
    ref_problem = problem.with_(requires_grad=tuple(False for _ in tensors))
    with torch.no_grad():
        outs = outputs(spec.reference(*(None if t is None else t.detach() for t in tensors), ref_problem.params))
    ups = []
    for o in outs:
        u = (torch.full(o.shape, up.value, dtype=torch.float64) if up.value is not None
             else torch.randn(o.shape, generator=gen, dtype=torch.float64) * up.scale)
        ups.append(u.to(o.dtype))  # what autograd hands a candidate in the test dtype
    return ups


def _as(tensors, dtype, problem) -> tuple:
    out = []
    for t, rg in zip(tensors, problem.requires_grad):
        if t is None:
            out.append(None)
            continue
        t = t.detach()
        t = t.to(dtype) if dtype is not None and t.is_floating_point() else t
        out.append(t.clone().requires_grad_(rg))
    return tuple(out)


def _describe_bad(g: torch.Tensor) -> str:
    bad = ~torch.isfinite(g)
    if g.dim() >= 2:
        rows = bad.reshape(-1, g.shape[-1]).any(-1)
        return f"{int(bad.sum())} of {g.numel()} values non-finite ({int(rows.sum())} of {rows.numel()} rows)"
    return f"{int(bad.sum())} of {g.numel()} values non-finite"


def compare(spec: OpSpec, dtype: str, names, got, same, ref64) -> Optional[str]:
    """None when every tensor of ``got`` is within the tolerance rule, else what is wrong with the first."""
    for name, g, s, r in zip(names, got, same, ref64):
        if r is None:
            continue
        if g is None:
            return f"{name}: no gradient (the reference has one)"
        if tuple(g.shape) != tuple(r.shape):
            return f"{name}: shape {tuple(g.shape)}, the reference has {tuple(r.shape)}"
        g64, r64, s64 = g.detach().double(), r.detach().double(), s.detach().double()
        fin = torch.isfinite(r64)
        if not bool(fin.all()):  # e.g. the mean over no token: NaN, and nothing else is
            if not torch.equal(torch.isnan(g64), torch.isnan(r64)) or not torch.equal(
                    g64[torch.isinf(r64)], r64[torch.isinf(r64)]):
                return f"{name}: non-finite pattern differs: got {_describe_bad(g64)}, reference {_describe_bad(r64)}"
        if not bool(torch.isfinite(g64[fin]).all()):
            bad = _describe_bad(torch.where(fin, g64, torch.zeros_like(g64)))
            return f"{name}: {bad} where the float64 reference is finite"
        if not fin.any():
            continue
        g64, r64, s64 = g64[fin], r64[fin], s64[fin]
        absmax = float(r64.abs().max())
        err, base = max_abs_err(g64, r64), max_abs_err(s64, r64)
        bound = spec.tolerance.bound(dtype, base, absmax)
        if not err <= bound:
            where = int((g64 - r64).abs().argmax())
            return (f"{name}: max error {err:.3g} > bound {bound:.3g} (the reference in the test dtype errs "
                    f"{base:.3g}; |ref| <= {absmax:.3g}; worst at flat index {where}: got {float(g64[where]):.6g}, "
                    f"float64 {float(r64[where]):.6g})")
    return None


def _overflows(same, ref64) -> bool:
    return any(s is not None and r is not None and bool((~torch.isfinite(s) & torch.isfinite(r)).any())
               for s, r in zip(same, ref64))


def check_case(spec: OpSpec, cand: Candidate, problem: Problem, tensors: tuple, *, layout=None,
               upstream: Upstream = Upstream(), config: str = "interp", run=None,
               compute_dtype: Optional[torch.dtype] = None) -> Optional[str]:
    """None when ``cand`` computes ``tensors`` right (see the module docstring), else what went wrong.

    tensors:  the op's tensor arguments (spec order), contiguous, in the problem's dtypes.
    layout:   None or one of ``contract_inputs.LAYOUTS``: every tensor argument and incoming gradient is
              handed over in that layout (the references get the same values, contiguous); or a tuple of
              them, one per tensor argument and a last one for the incoming gradients.
    run:      optional context manager factory wrapping the candidate's call (default: ``tables(config)``).
    compute_dtype: the dtype the candidate computes in when it is not the inputs' (autocast): the
              baseline reference runs in it and its tolerance applies.
    """
    gen = torch.Generator().manual_seed(7)
    ups = upstream_for(spec, tensors, problem, upstream, gen) if problem.grad else []
    context = run() if run is not None else tables(config)
    got_out, got_grad, views, passed = _run(spec, cand, tensors, problem, ups, layout,
                                            torch.Generator().manual_seed(11), context)
    # The references see the values the candidate saw (an expanded view repeats one slice), contiguous, and
    # the incoming gradients as the candidate got them (rounded to its outputs' dtypes).
    values = tuple(None if v is None else v.detach().contiguous() for v in views)
    seen = [u.detach().contiguous() for u in passed]
    ref = _reference(spec)
    plain = contextlib.nullcontext
    ref64 = _run(spec, ref, _as(values, torch.float64, problem), problem, [u.double() for u in seen], None, gen,
                 plain())[:2]
    same = _run(spec, ref, _as(values, compute_dtype, problem), problem, seen, None, gen, plain())[:2]
    if _overflows(same[0] + same[1], ref64[0] + ref64[1]):  # the reference overflows in the test dtype
        same = _run(spec, ref, _as(values, torch.float32, problem), problem, [u.float() for u in seen], None,
                    gen, plain())[:2]
    names = [f"output {i}" for i in range(len(ref64[0]))]
    names += [f"grad of {n}" for n, rg in zip(spec.tensor_args, problem.requires_grad) if rg]
    for name, g, r in zip(names, got_out + tuple(got_grad), ref64[0] + tuple(ref64[1])):
        # A value the test dtype cannot hold is a generator's mistake, not the candidate's.
        if g is not None and r is not None and bool((r.abs() > torch.finfo(g.dtype).max)[torch.isfinite(r)].any()):
            raise AssertionError(f"test generator: {name} of the float64 reference exceeds {g.dtype}'s range")
    dtype = problem.dtype if compute_dtype is None else str(compute_dtype).replace("torch.", "")
    return compare(spec, dtype, names, got_out + tuple(got_grad), same[0] + tuple(same[1]),
                   ref64[0] + tuple(ref64[1]))


def public_op(spec: OpSpec, cand: Candidate):
    """(context factory, fn) that run ``cand`` through the public op (``aimkern.<op>(..., backend="triton")``,
    with its input checks and autocast): attention's candidates pin their backward with a launch policy."""
    import aimkern

    op = getattr(aimkern, spec.name)
    # (the atomic candidate's problems say deterministic=False themselves: see for_candidate)
    path = {"triton-fused": "fused", "triton-split": "split", "triton-split-atomic": "split"}.get(cand.name)

    def fn(*args):  # the candidates' signature: (*tensors, params)
        call_args, kwargs = spec.public_call(args[:-1], args[-1])
        return op(*call_args, **kwargs, backend="triton")

    def context(config: str = "interp"):
        stack = contextlib.ExitStack()
        stack.enter_context(tables(config))
        if path is not None:
            stack.enter_context(launch_policy(attention_backward=path))
        return stack

    return context, fn
