"""Which kernels and table configs a candidate's call launches: what verification ran beside what the real
call runs.

A verification problem is only worth its name when it runs the real call's code: the same kernels (the
forward's query tail, the backward's key tail, the fused or tiled backward), the same table entries (the
sequence band, the configs that pad the real tiles least, the autotuned tables of large GEMMs), the same
specializations (mask flags, head dim). The launch layer's ``observe`` sees every launch; ``summarize``
turns them into one line per distinct (kernel, configs it may run, constexprs), and the dispatcher's
report lists, per aimkern candidate, the lines of its verification beside those of its real-shape run
(``trial.trial``). tests/test_dispatch_coverage.py holds every spec to equal lists at the benchmark shapes.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from ..ops._launch import observe
from ..specs import Candidate, OpSpec, Problem, outputs
from . import measure


def _config(c) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(c.kwargs.items())) + f",warps={c.num_warps},stages={c.num_stages}"


def summarize(launches: list) -> list:
    """Sorted distinct lines "kernel [config | config ...] {constexpr=value, ...}" of ``launches``: every
    config the launch may run (the table the autotuner picks from, or the one fixed config)."""
    lines = set()
    for launch in launches:
        configs = " | ".join(_config(c) for c in launch.choice.configs)
        flags = ", ".join(f"{k}={v}" for k, v in sorted(launch.constexprs.items()))
        lines.add(f"{launch.name} [{configs}] {{{flags}}}")
    return sorted(lines)


@contextlib.contextmanager
def recording() -> Iterator[list]:
    """The launches made inside the block (run as usual), for ``summarize``."""
    with observe() as seen:
        yield seen


def launched(spec: OpSpec, cand: Candidate, problem: Problem) -> list:
    """``summarize`` of one call of ``cand`` on ``problem`` (forward, and backward where differentiated)
    with nothing launched (``observe(dry_run=True)``: the outputs are left unwritten): cheap at any shape."""
    tensors = measure.fresh_leaves(spec.make_inputs(problem, torch.Generator().manual_seed(0)), problem)
    with observe(dry_run=True) as seen:
        outs = measure.run_once(spec, cand, tensors, problem,
                                None if not problem.grad else _ones_like_outputs(spec, cand, tensors, problem))
    del outs
    return summarize(seen)


def _ones_like_outputs(spec: OpSpec, cand: Candidate, tensors: tuple, problem: Problem) -> list:
    with torch.no_grad(), observe(dry_run=True):
        outs = outputs(cand.fn(*tensors, problem.params))
    return [torch.ones(o.shape, device=o.device) for o in outs]
