"""Checking a candidate against the reference, and timing it.

``verify`` runs a candidate on the op's small verification problem (same dtype, mask kind and code path)
and holds its output and every input gradient to the spec's tolerance rule: the error against a float64
reference may be at most ``factor`` x the error of the reference run in the candidate's dtype, plus atol.

``time_ms`` runs it at the real shape on synthetic data: forward (+ backward when the call is
differentiated), warm-up first (compiles, autotuning), then the median of repeated runs: CUDA events on a
GPU, the wall clock on the CPU.
"""
from __future__ import annotations

import statistics
import time
from typing import Optional

import torch

from ..specs import Candidate, OpSpec, Problem, outputs


def _grad_inputs(tensors: tuple, problem: Problem) -> list:
    return [t for t, rg in zip(tensors, problem.requires_grad) if rg]


def _run(spec: OpSpec, cand: Candidate, tensors: tuple, problem: Problem, upstream: Optional[list]):
    """(outputs, gradients of the inputs that require grad) of one call."""
    with torch.enable_grad() if problem.grad else torch.no_grad():
        outs = outputs(cand.fn(*tensors, problem.params))
        if not problem.grad:
            return outs, ()
        diff = [o for o in outs if o.requires_grad]
        grads = torch.autograd.grad(
            diff, _grad_inputs(tensors, problem), [g.to(o.dtype) for o, g in zip(diff, upstream)],
            allow_unused=True,
        )
    return tuple(o.detach() for o in outs), grads


def max_abs_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """max |x - ref| in float64 (0 for empty tensors): the error measure of every tolerance rule (the
    dispatcher's verification here, tests/tolerances.py for the tests)."""
    return float((x.detach().double() - ref.detach().double()).abs().max()) if x.numel() else 0.0


def fresh_leaves(tensors: tuple, problem: Problem, dtype: Optional[torch.dtype] = None) -> tuple:
    """Fresh leaves of ``tensors`` (floating ones cast to ``dtype`` when given), requiring grad as the problem says."""
    out = []
    for t, rg in zip(tensors, problem.requires_grad):
        if t is None:
            out.append(None)
            continue
        t = t.detach()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        out.append(t.clone().requires_grad_(rg))
    return tuple(out)


def verify(spec: OpSpec, cand: Candidate, problem: Problem) -> Optional[str]:
    """None when ``cand`` is correct on ``problem``'s verification problem, else why it is not."""
    small = spec.small_problem(problem)
    gen = torch.Generator().manual_seed(20261201)
    base = spec.make_inputs(small, gen)
    ref_cand = Candidate("reference", spec.reference, kind="torch")
    upstream = None
    if small.grad:  # one upstream gradient for the three runs, drawn like the inputs
        with torch.no_grad():
            leaves = fresh_leaves(base, small.with_(requires_grad=tuple(False for _ in base)))
            shapes = list(outputs(ref_cand.fn(*leaves, small.params)))
        upstream = [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.device) for o in shapes]
    ref64 = _run(spec, ref_cand, fresh_leaves(base, small, torch.float64), small, upstream)
    same = _run(spec, ref_cand, fresh_leaves(base, small), small, upstream)
    got = _run(spec, cand, fresh_leaves(base, small), small, upstream)
    names = [f"output {i}" for i in range(len(ref64[0]))]
    names += [f"grad of {n}" for n, rg in zip(spec.tensor_args, small.requires_grad) if rg]
    for name, g, s, r in zip(names, got[0] + tuple(got[1]), same[0] + tuple(same[1]), ref64[0] + tuple(ref64[1])):
        if r is None:
            continue
        if g is None:
            return f"{name}: no gradient"
        if tuple(g.shape) != tuple(r.shape):
            return f"{name}: shape {tuple(g.shape)}, the reference has {tuple(r.shape)}"
        if not bool(torch.isfinite(g).all()) and bool(torch.isfinite(r).all()):
            return f"{name}: non-finite values"
        absmax = float(r.abs().max()) if r.numel() else 0.0
        err, bound = max_abs_err(g, r), spec.tolerance.bound(small.dtype, max_abs_err(s, r), absmax)
        if not err <= bound:
            return f"{name}: max error {err:.3g} > bound {bound:.3g} on {_describe(small)}"
    return None


def _describe(problem: Problem) -> str:
    shapes = "x".join(str(s) for s in problem.shapes[0]) if problem.shapes and problem.shapes[0] else "-"
    return f"the verification problem {shapes} {problem.dtype}"


def time_ms(spec: OpSpec, cand: Candidate, problem: Problem, *, warmup: int = 2, reps: int = 10,
            budget_s: float = 0.5) -> float:
    """Median ms of one call (forward, plus backward when the problem is differentiated) at the real shape."""
    gen = torch.Generator().manual_seed(0)
    tensors = spec.make_inputs(problem, gen)
    upstream = None
    if problem.grad:
        with torch.no_grad():
            outs = outputs(cand.fn(*tensors, problem.params))
        upstream = [torch.randn(o.shape, generator=gen).to(device=o.device) for o in outs]
    cuda = problem.device_type == "cuda"

    def once():
        _run(spec, cand, tensors, problem, upstream)

    for _ in range(warmup):
        once()
    times = []
    if cuda:
        torch.cuda.synchronize()
        start_all = time.perf_counter()
        for _ in range(reps):
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            once()
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end))
            if time.perf_counter() - start_all > budget_s and len(times) >= 3:
                break
    else:
        start_all = time.perf_counter()
        for _ in range(reps):
            t0 = time.perf_counter()
            once()
            times.append((time.perf_counter() - t0) * 1e3)
            if time.perf_counter() - start_all > budget_s and len(times) >= 3:
                break
    return statistics.median(times)
