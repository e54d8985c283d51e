"""The dispatch worker: the child process that verifies and times candidates for ``isolation.Worker``.

Started by the parent (``isolation.Worker.start``) as a fresh interpreter, never forked (CUDA cannot be used
in a forked child)::

    python -c "from aimkern.dispatch.worker import main; main()" READ_FD WRITE_FD

It reads messages from READ_FD and answers on WRITE_FD (``multiprocessing.connection`` framing, pickled):

    ("trial", sys_path, op, problem, candidate, trusted, verify_only, forced)
        -> ("result", {"ms", "verified", "reason", "check_s"[, "kernels", "configs"]})
    (``forced``: the caller's forced configs, ``ops._forced_configs.forced()``: the worker launches what the
    caller will)
    (a worker that cannot open a CUDA context answers ("unavailable", why) and exits: the caller decides itself)
    ("release",)  drop the key's real-shape inputs and trusted values (a decision is over)
    ("exit",)     or the parent's end closing: return

``candidate`` / ``trusted``: ("builtin", name), ("definition",) (the spec's reference), or ("user", name, module, qualname) for a function the
worker imports (``trial.resolve``). The worker makes its own inputs from the problem, as the specs do: no
tensor crosses. A candidate that leaves the CUDA context broken (an illegal address: every later call
fails) is reported as crashed, and the worker exits so the next candidate gets a fresh one.
"""
from __future__ import annotations

import os
import sys
from multiprocessing.connection import Connection

import torch

from ..ops import _forced_configs
from ..specs import Candidate, OpSpec, get_spec
from .realshape import RealShape
from .trial import public_style, resolve, trial


def _candidate(spec: OpSpec, ref: tuple) -> Candidate:
    if ref[0] == "definition":  # the reference as the trusted path, a candidate or not
        return Candidate("reference", spec.reference, kind="torch")
    if ref[0] == "builtin":
        return spec.candidate(ref[1])
    _, name, module, qualname = ref
    return Candidate(name, public_style(spec, resolve(module, qualname)), kind="user")


def _cuda_failure(problem, reason) -> str:
    """"CUDA error: ..." when the candidate left this process's CUDA context unusable, else ""."""
    if problem.device_type != "cuda":
        return ""
    try:
        torch.cuda.synchronize()
    except Exception as e:  # a sticky error: this context is lost, so is this worker
        return str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
    if reason and "CUDA error" in reason:
        return reason.split(": ", 1)[-1]
    return ""


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    inbox = Connection(int(argv[0]), writable=False)
    outbox = Connection(int(argv[1]), readable=False)
    real = None
    outbox.send(("ready", os.getpid()))
    while True:
        try:
            msg = inbox.recv()
        except (EOFError, OSError):  # the parent is gone
            return
        if msg[0] == "exit":
            return
        if msg[0] == "release":
            real = None
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                torch.cuda.empty_cache()
            continue
        _, path, op, problem, cand_ref, trusted_ref, verify_only, forced = msg
        if sys.path != path:
            sys.path[:] = path
        _forced_configs.clear()
        _forced_configs.install(forced, origin="the dispatch caller's forced configs")
        spec = get_spec(op)
        if problem.device_type == "cuda" and not torch.cuda.is_initialized():
            try:  # a GPU in exclusive-process mode has no context for a second process: say so, not "crashed"
                torch.empty(0, device=problem.device)
            except Exception as e:
                outbox.send(("unavailable", f"no CUDA context on {problem.device}: {str(e).strip()[:200]}"))
                return
        if real is None or real.problem != problem:
            real = RealShape(spec, problem)
        try:
            cand = _candidate(spec, cand_ref)
            trusted = None if trusted_ref is None else _candidate(spec, trusted_ref)
        except Exception as e:  # a user's module that does not import here
            outbox.send(("result", {"ms": None, "verified": False, "check_s": 0.0,
                                    "reason": f"the worker cannot import it ({type(e).__name__}: {e})"}))
            continue
        result = trial(spec, cand, problem, real, trusted, verify_only)
        result["check_s"] = real.seconds
        broken = _cuda_failure(problem, result["reason"])
        if broken:
            result.update(ms=None, reason=f"crashed (CUDA error: {broken})")
        outbox.send(("result", result))
        if broken:
            os._exit(3)
