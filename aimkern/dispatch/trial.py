"""One candidate's trial, the same in the caller's process and in the dispatch worker.

    verify on the small problem (measure.verify) -> check its values at the real shape (realshape) -> time it

and, for a Triton path, which kernels and configs the first two launched (``coverage``) and which config
each autotuned kernel ran at the real shape (``"configs"``, ``ops._forced_configs`` picks: what a
deterministic decision fixes for every later launch).

Every failure becomes the reason the candidate is rejected (``measure.measure_safely``). The result is a
plain dict, ``{"ms", "verified", "reason"}``, that crosses a pipe as it is.
"""
from __future__ import annotations

import importlib
from typing import Callable, Optional

from ..ops import _forced_configs
from ..specs import Candidate, OpSpec, Problem
from . import measure
from .coverage import recording, summarize
from .realshape import RealShape


def public_style(spec: OpSpec, fn: Callable) -> Callable:
    """A candidate ``(*tensors, params)`` that calls a user's ``fn`` with the public op's arguments."""

    def run(*args):
        call_args, kwargs = spec.public_call(args[:-1], args[-1])
        return fn(*call_args, **kwargs)

    return run


def resolve(module: str, qualname: str):
    """The object ``module.qualname`` names, imported (AttributeError / ImportError when there is none)."""
    obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def trial(spec: OpSpec, cand: Candidate, problem: Problem, real: RealShape, trusted: Optional[Candidate],
          verify_only: bool = False) -> dict:
    """Verify ``cand``; unless ``verify_only``, check its values at the real shape against ``trusted`` and
    time it there. ``{"ms": float or None, "verified": bool, "reason": None or why it was rejected}``, plus
    ``"kernels": {"verification": [...], "real": [...]}`` (``coverage.summarize``) where it launched any and
    ``"configs"``: the picks of its autotuned (or forced) launches at the real shape, where there were any."""
    result = {"ms": None, "verified": False, "reason": None}
    with recording() as small:
        reason = measure.measure_safely(lambda: measure.verify(spec, cand, problem))
    launches = {"verification": summarize(small)}
    if reason is None:
        result["verified"] = True
        if not verify_only:
            with _forced_configs.recording() as picks:  # the configs the autotuner (or a forced one) ran
                with recording() as large:
                    reason = measure.measure_safely(lambda: real.check(cand, trusted))
                launches["real"] = summarize(large)
                if reason is None:
                    reason = measure.measure_safely(lambda: _time(result, spec, cand, problem, real))
            if picks:
                result["configs"] = picks
    result["reason"] = reason
    if any(launches.values()):  # a Triton path: what verification ran beside what the real call runs
        result["kernels"] = launches
    return result


def _time(result: dict, spec: OpSpec, cand: Candidate, problem: Problem, real: RealShape) -> None:
    result["ms"] = float(measure.time_ms(spec, cand, problem, inputs=real.inputs_for(cand)))
