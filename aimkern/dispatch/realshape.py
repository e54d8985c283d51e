"""Values at the real shape: what a candidate computes where it is timed, not only on the small problem.

A kernel can be right on the verification problem and wrong at the real shape: cuDNN's SDPA backward
returns NaN in dQ when N % 128 == 64 with an explicit mask (pytorch/pytorch#196678), a tiled backward can
go wrong only with ragged key tails. So every candidate that is timed is first run once on the timing
inputs and

* its outputs and input gradients must be finite ("NaN in dq at the real shape");
* they must agree with one trusted path on the same inputs under the op's tolerance rule: the float64
  reference where it fits in memory (``reference_fits``), the bound then set by the reference run in the
  candidate's dtype, as in ``measure.verify``; else PyTorch's fastest correct candidate (the dispatcher
  names it), the bound then twice the rule's floor (no float64 truth: two low-precision results meet).

The trusted values are computed once per key (``RealShape`` holds them, with the inputs the timing uses);
``seconds`` is what the check cost, reported in the decision's row.
"""
from __future__ import annotations

import os
import time
from typing import Optional

import torch

from ..specs import Candidate, OpSpec, Problem
from . import measure


def _elements(problem: Problem) -> int:
    total = 0
    for shape in problem.shapes:
        if shape is not None:
            n = 1
            for s in shape:
                n *= s
            total += n
    return total


def reference_bytes(spec: OpSpec, problem: Problem) -> int:
    """About what the float64 reference plus the reference in the call's dtype hold at ``problem``'s shape,
    forward and backward: the spec's own estimate (``spec.reference_bytes``, where the reference builds
    something larger than its inputs, e.g. attention's N x N scores) or 16 copies of the inputs in float64."""
    own = getattr(spec, "reference_bytes", None)
    return int(own(problem)) if own is not None else 16 * 8 * _elements(problem)


def memory_budget(device: str) -> int:
    """Bytes the real-shape check may use: half the free memory of a GPU, a quarter of the free RAM."""
    if device.startswith("cuda"):
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return free // 2
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 4
    except (ValueError, OSError):  # no sysconf figure: assume 1 GiB
        return 1 << 30


def reference_fits(spec: OpSpec, problem: Problem) -> bool:
    """Whether the real-shape check can hold the float64 reference (else it trusts a PyTorch candidate)."""
    return reference_bytes(spec, problem) <= memory_budget(problem.device)


def non_finite(names: tuple, values: tuple) -> Optional[str]:
    """"NaN in dq at the real shape" for the first value with a NaN (or an infinity), else None."""
    out_names, grad_names = names
    labels = [out_names[i] for i in range(len(values[0]))] + grad_names
    for name, v in zip(labels, values[0] + tuple(values[1])):
        if v is None or bool(torch.isfinite(v).all()):
            continue
        return f"{'NaN' if bool(torch.isnan(v).any()) else 'Inf'} in {name} at the real shape"
    return None


class RealShape:
    """The real-shape inputs of one key (made once, from the first candidate's output shapes), the trusted
    path's values on them (computed once) and the seconds the checks took."""

    def __init__(self, spec: OpSpec, problem: Problem):
        self.spec, self.problem = spec, problem
        self.inputs: Optional[tuple] = None  # (tensors, upstream) the checks and the timings use
        self.trusted: dict = {}  # trusted name -> (values, same-dtype reference values or None)
        self.seconds = 0.0

    def inputs_for(self, cand: Candidate) -> tuple:
        if self.inputs is None:
            self.inputs = measure.real_inputs(self.spec, cand, self.problem)
        return self.inputs

    def _values(self, cand: Candidate, dtype: Optional[torch.dtype] = None) -> tuple:
        tensors, upstream = self.inputs
        leaves = measure.fresh_leaves(tensors, self.problem, dtype)
        return measure.run_once(self.spec, cand, leaves, self.problem, upstream)

    def _trusted(self, trusted: Candidate) -> tuple:
        if trusted.name not in self.trusted:
            if trusted.name == "reference":  # the definition in float64, and in the call's dtype for the bound
                self.trusted[trusted.name] = (self._values(trusted, torch.float64), self._values(trusted))
            else:
                self.trusted[trusted.name] = (self._values(trusted), None)
        return self.trusted[trusted.name]

    def check(self, cand: Candidate, trusted: Optional[Candidate]) -> Optional[str]:
        """Why ``cand``'s values at the real shape are not acceptable (non-finite, or not ``trusted``'s
        within the tolerance rule; ``trusted`` None or ``cand`` itself: finiteness only), or None."""
        start = time.perf_counter()
        try:
            self.inputs_for(cand)
            got = self._values(cand)
            reason = non_finite(measure.value_names(self.spec, self.problem, short=True), got)
            if reason is None and trusted is not None and trusted.name != cand.name:
                values, same = self._trusted(trusted)
                reason = measure.disagreement(
                    self.spec, self.problem.dtype, measure.value_names(self.spec, self.problem, short=True),
                    got, same, values, f"at the real shape (against {trusted.name})")
            return reason
        finally:
            self.seconds += time.perf_counter() - start
