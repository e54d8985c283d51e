"""Checking a candidate against the reference, and timing it.

``verify`` runs a candidate on the op's small verification problem (same dtype, mask kind and code path)
and holds its output and every input gradient to the spec's tolerance rule: the error against a float64
reference may be at most ``factor`` x the error of the reference run in the candidate's dtype, plus atol.
It runs each autotuned kernel at every config its autotuner may pick (one kernel at a time), inside the
spec's ``verification_context`` (the launch geometry the real shape takes, where a small problem would not).

``time_ms`` runs it at the real shape on synthetic data: forward (+ backward when the call is
differentiated), warm-up first (compiles, autotuning), then the median of repeated runs: CUDA events on a
GPU, the wall clock on the CPU.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, Optional

import torch

from ..ops import _forced_configs
from ..specs import Candidate, OpSpec, Problem, outputs


def _grad_inputs(tensors: tuple, problem: Problem) -> list:
    return [t for t, rg in zip(tensors, problem.requires_grad) if rg]


def run_once(spec: OpSpec, cand: Candidate, tensors: tuple, problem: Problem, upstream: Optional[list]):
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


def measure_safely(fn: Callable[[], Optional[str]]) -> Optional[str]:
    """Run a verification or timing; an exception (compile error, unsupported input, out of memory) becomes
    the reason the candidate is rejected."""
    try:
        return fn()
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return "out of memory"
    except Exception as e:  # any failure of a candidate rejects it; it must never reach the caller's step
        text = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return f"raised {type(e).__name__}" + (f": {text[:300]}" if text else "")


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
    ref64 = run_once(spec, ref_cand, fresh_leaves(base, small, torch.float64), small, upstream)
    same = run_once(spec, ref_cand, fresh_leaves(base, small), small, upstream)
    names = value_names(spec, small)
    with spec.verification_context(problem):  # e.g. the launch geometry the real shape takes (flat grid)
        with _forced_configs.recording() as ran, _forced_configs.pickable() as pickable:
            got = run_once(spec, cand, fresh_leaves(base, small), small, upstream)
        why = disagreement(spec, small.dtype, names, got, same, ref64, f"on {_describe(small)}")
        # Every other config the autotuner may pick, one kernel at a time: the real shape's pick is made
        # later, from noisy timings, and may be any of them (the verification shape's own pick says nothing).
        for pick in ([] if why else other_configs(pickable, ran)):
            with _forced_configs.forcing([pick], origin="dispatch's verification of every autotuned config"):
                got = run_once(spec, cand, fresh_leaves(base, small), small, upstream)
            why = disagreement(spec, small.dtype, names, got, same, ref64,
                               f"on {_describe(small)} with {pick['kernel']} at {_config_text(pick['config'])}")
    return why


def other_configs(pickable: dict, ran: list) -> list:
    """The picks ``{"kernel", "key", "config"}`` of every config of ``pickable``'s launches (kernel, key ->
    config records) but the one each ran (``ran``: ``_forced_configs.recording()``'s picks)."""
    done = {(p["kernel"], tuple(p["key"])): p["config"] for p in ran}
    return [{"kernel": kernel, "key": list(key), "config": config}
            for (kernel, key), configs in sorted(pickable.items(), key=lambda item: repr(item[0]))
            for config in configs if config != done.get((kernel, key))]


def _config_text(config: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in config["kwargs"].items()) + \
        f",warps={config['num_warps']},stages={config['num_stages']}"


def value_names(spec: OpSpec, problem: Problem, short: bool = False) -> tuple:
    """(output names, gradient names) of a call's values in ``run_once``'s order: "output 0", ... and
    "grad of q", ... ("dq", ... when ``short``)."""
    grads = [f"d{n}" if short else f"grad of {n}" for n, rg in zip(spec.tensor_args, problem.requires_grad) if rg]
    return [f"output {i}" for i in range(8)], grads


def disagreement(spec: OpSpec, dtype: str, names: tuple, got: tuple, same: Optional[tuple], ref: tuple,
                 where: str) -> Optional[str]:
    """Why ``got`` (outputs, gradients) is not ``ref``'s within the spec's tolerance rule, or None.

    ``same``: the reference run in the candidate's dtype (its error sets the bound), or None when there is
    none (the bound is then the rule's floor, atol, doubled: two low-precision results are compared)."""
    out_names, grad_names = names
    labels = [out_names[i] if i < len(out_names) else f"output {i}" for i in range(len(ref[0]))] + grad_names
    same_vals = (same[0] + tuple(same[1])) if same is not None else (None,) * len(labels)
    for name, g, s, r in zip(labels, got[0] + tuple(got[1]), same_vals, ref[0] + tuple(ref[1])):
        if r is None:
            continue
        if g is None:
            return f"{name}: no gradient"
        if tuple(g.shape) != tuple(r.shape):
            return f"{name}: shape {tuple(g.shape)}, the reference has {tuple(r.shape)}"
        if not bool(torch.isfinite(g).all()) and bool(torch.isfinite(r).all()):
            return f"{name}: non-finite values"
        absmax = float(r.abs().max()) if r.numel() else 0.0
        if s is not None:
            bound = spec.tolerance.bound(dtype, max_abs_err(s, r), absmax)
        else:
            bound = 2 * spec.tolerance.bound(dtype, 0.0, absmax)
        err = max_abs_err(g, r)
        if not err <= bound:
            return f"{name}: max error {err:.3g} > bound {bound:.3g} {where}"
    return None


def real_inputs(spec: OpSpec, cand: Candidate, problem: Problem) -> tuple:
    """(tensors, upstream gradients or None) at the real shape: synthetic, seeded; the upstream gradients
    have the shapes of ``cand``'s outputs."""
    gen = torch.Generator().manual_seed(0)
    tensors = spec.make_inputs(problem, gen)
    upstream = None
    if problem.grad:
        with torch.no_grad():
            outs = outputs(cand.fn(*tensors, problem.params))
        upstream = [torch.randn(o.shape, generator=gen).to(device=o.device) for o in outs]
    return tensors, upstream


def _describe(problem: Problem) -> str:
    shapes = "x".join(str(s) for s in problem.shapes[0]) if problem.shapes and problem.shapes[0] else "-"
    return f"the verification problem {shapes} {problem.dtype}"


def time_ms(spec: OpSpec, cand: Candidate, problem: Problem, *, warmup: int = 2, reps: int = 10,
            budget_s: float = 0.5, inputs: Optional[tuple] = None) -> float:
    """Median ms of one call (forward, plus backward when the problem is differentiated) at the real shape.
    ``inputs``: (tensors, upstream gradients) to time on (``realshape.RealShape``'s, the ones its values were
    checked on); made here, seeded, when None."""
    if inputs is None:
        inputs = real_inputs(spec, cand, problem)
    tensors, upstream = inputs
    cuda = problem.device_type == "cuda"

    def once():
        run_once(spec, cand, tensors, problem, upstream)

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
