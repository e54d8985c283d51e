"""Measured dispatch: on the first call for a key, verify every candidate that applies, time the correct
ones, run the fastest; remember the choice in this process and in the decisions file.

A key is the op, the environment (``environment.fingerprint``: device name and capability, torch / Triton /
driver versions), the dtype, the mask kind, grad on or off and the shape band (``OpSpec.band``). Calls
whose key was decided before cost one dict look-up (``choose``): the problem of a call is a hashable
``Problem`` and maps straight to its candidate.

Under ``torch.compile`` the decision is taken while the call is traced (``_decide_traced`` is a constant to
Dynamo): the graph holds the chosen candidate's ops, with no graph break and nothing to recompile later.
A decision depends on shapes, dtypes and options only, never on values, so deciding on synthetic inputs
while tracing chooses exactly what the first eager call would.

Under torchrun, rank 0 decides and broadcasts its choice; every rank runs the same path.
"""
from __future__ import annotations

import threading
import warnings
from typing import Callable, Optional

import torch

from ..ops.spec import Candidate, OpSpec, Problem, SupportRule, describe, get_spec
from . import environment, measure
from .cache import DecisionCache, DispatchWarning

_LOCK = threading.RLock()
_USER: dict = {}  # op -> {name: Candidate} registered by users
_MEMO: dict = {}  # Problem -> Candidate (this process)
_ROWS: dict = {}  # key -> report row (this process's decisions, in order)
_PINNED: dict = {}  # problem key (no environment) -> candidate name, from a run being resumed
_WARNED: set = set()
_CACHES: dict = {}  # folder -> DecisionCache


def register(op: str, name: str, fn: Callable, *, supports: Optional[SupportRule] = None) -> None:
    """Add a candidate for ``op`` ("attention", "patch_embed", "linear_cross_entropy" or
    "next_patch_pixel_loss").

    fn:       the public op's signature without ``backend`` (e.g. for attention ``fn(q, k, v, *, is_causal,
              block_size, prefix_len, scale, deterministic)``, prefix_len None or an int32 (B,) tensor),
              returning what the op returns; autograd differentiates it.
    supports: ``supports(problem) -> bool`` (``aimkern.ops.spec.Problem``: device, dtype, shapes,
              options, requires_grad) says where it applies; None means everywhere, on CUDA and CPU.

    The candidate is verified against the reference and timed like the built-in ones wherever it applies;
    a wrong or failing one is rejected with a warning and never chosen. Registering again under the same
    name replaces it. Decisions already taken for ``op`` in this process are forgotten.
    """
    spec = get_spec(op)
    if not isinstance(name, str) or not name:
        raise ValueError(f"aimkern.dispatch.register: name must be a non-empty string, got {name!r}")
    if any(c.name == name for c in spec.candidates):
        raise ValueError(f"aimkern.dispatch.register: {name!r} is a built-in candidate of {op}; choose another name")
    if not callable(fn):
        raise TypeError(f"aimkern.dispatch.register: fn must be callable, got {type(fn).__name__}")
    if supports is not None and not callable(supports):
        raise TypeError(f"aimkern.dispatch.register: supports must be None or callable, got {type(supports).__name__}")
    with _LOCK:
        _USER.setdefault(op, {})[name] = Candidate(name, fn, kind="user", supports=supports)
        _forget(op)


def unregister(op: str, name: str) -> None:
    """Remove a candidate added with ``register`` (KeyError if there is none of that name)."""
    with _LOCK:
        del _USER[get_spec(op).name][name]
        _forget(op)


def _forget(op: str) -> None:
    for p in [p for p in _MEMO if p.op == op]:
        del _MEMO[p]
    for sig in [sig for sig in _FAST if sig[0] == op]:
        del _FAST[sig]
    for k in [k for k, row in _ROWS.items() if row["op"] == op]:
        del _ROWS[k]


def reset() -> None:
    """Forget this process's decisions, pins and warnings (the decisions file stays), and read
    ``AIMKERN_DISPATCH`` again."""
    environment.refresh()
    with _LOCK:
        _MEMO.clear()
        _FAST.clear()
        _ROWS.clear()
        _PINNED.clear()
        _WARNED.clear()
        _CACHES.clear()


def candidates(op: str) -> list:
    """The built-in and registered candidates of ``op``."""
    spec = get_spec(op)
    return list(spec.candidates) + list(_USER.get(spec.name, {}).values())


def problem_key(spec: OpSpec, problem: Problem) -> str:
    """The key without the environment: what a recorded choice is matched by on another machine."""
    grad = "grad" if problem.grad else "nograd"
    return f"{spec.name}|{problem.dtype}|{spec.mask_kind(problem)}|{grad}|{spec.band(problem)}"


def decision_key(spec: OpSpec, problem: Problem) -> str:
    return f"{problem_key(spec, problem)}|{environment.fingerprint(problem.device)}"


# ------------------------------------------------------------------------------------------ choosing
_FAST: dict = {}  # call signature (plain tuple) -> Candidate: the per-call path, a few microseconds


def select(op: str, tensors: tuple, options: dict, dtype: torch.dtype) -> Candidate:
    """The candidate for a call of ``op`` on ``tensors`` (in the spec's order, None where absent) with
    ``options``: one dict look-up once the call's signature was seen, ``choose`` otherwise."""
    compiling = torch.compiler.is_compiling()
    if not compiling:
        # Cheap to build and to hash: shapes are tuples, dtypes hash by identity, get_device() is an int
        # (-1 on the CPU); torch.device objects would cost more than everything else together.
        grad = torch.is_grad_enabled()
        sig = (op, dtype, grad, *options.values(),
               *[None if t is None else (t.shape, t.dtype, t.get_device(), t.requires_grad) for t in tensors])
        cand = _FAST.get(sig)
        if cand is not None:
            return cand
    cand = choose(get_spec(op), describe(op, tensors, options, dtype))
    if not compiling:
        _FAST[sig] = cand
    return cand


def choose(spec: OpSpec, problem: Problem) -> Candidate:
    """The candidate that runs ``problem`` (deciding it on first use)."""
    if torch.compiler.is_compiling():
        return _by_name(spec, _decide_traced(spec.name, problem.encode()))
    return _memoized(spec, problem)


@torch._dynamo.assume_constant_result
def _decide_traced(op: str, encoded: str) -> str:
    return _memoized(get_spec(op), Problem.decode(encoded)).name


def _memoized(spec: OpSpec, problem: Problem) -> Candidate:
    """This process's decision for ``problem``, taken (once, under the lock) when there is none."""
    cand = _MEMO.get(problem)
    if cand is None:
        with _LOCK:
            cand = _MEMO.get(problem)  # another thread may have decided while this one waited
            if cand is None:
                cand = _decide(spec, problem)
                _MEMO[problem] = cand
    return cand


def _by_name(spec: OpSpec, name: str) -> Candidate:
    for c in candidates(spec.name):
        if c.name == name:
            return c
    raise RuntimeError(f"aimkern.dispatch: {spec.name} has no candidate {name!r} in this process")


def _eligible(problem: Problem) -> Callable[[Candidate], Optional[str]]:
    def why_not(c: Candidate) -> Optional[str]:
        if c.interpreted and problem.device_type == "cpu" and not environment.interpreter_allowed():
            return "Triton's interpreter is a correctness tool, not a fast path (AIMKERN_DISPATCH_INTERPRETER=1 allows it)"
        return c.unsupported(problem)

    return why_not


def _cache() -> DecisionCache:
    folder = environment.cache_dir()
    if folder not in _CACHES:
        _CACHES[folder] = DecisionCache(folder)
    return _CACHES[folder]


def _warn(op: str, name: str, reason: str) -> None:
    if (op, name, reason) not in _WARNED:
        _WARNED.add((op, name, reason))
        warnings.warn(f"aimkern.dispatch: {op} candidate {name!r} rejected: {reason}", DispatchWarning, stacklevel=5)


def _decide(spec: OpSpec, problem: Problem) -> Candidate:
    key = decision_key(spec, problem)
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        row = [_decide_row(spec, problem, key) if dist.get_rank() == 0 else None]
        dist.broadcast_object_list(row, src=0)
        row = row[0]
    else:
        row = _decide_row(spec, problem, key)
    _ROWS[key] = row
    return _by_name(spec, row["chosen"])


def _decide_row(spec: OpSpec, problem: Problem, key: str) -> dict:
    cands = candidates(spec.name)
    why_not = _eligible(problem)
    results = {c.name: {"ms": None, "verified": False, "reason": why_not(c)} for c in cands}
    usable = [c for c in cands if results[c.name]["reason"] is None]
    names = sorted(c.name for c in usable)
    base = {"op": spec.name, "key": key, "problem_key": problem_key(spec, problem),
            "problem": _problem_row(spec, problem), "kinds": {c.name: c.kind for c in cands}}

    pinned = _PINNED.get(problem_key(spec, problem))
    if pinned is not None:
        cand = next((c for c in usable if c.name == pinned), None)
        reason = results[pinned]["reason"] if pinned in results else "no such candidate here"
        if cand is not None:
            reason = measure_safely(lambda: measure.verify(spec, cand, problem))
        if reason is None:
            results[pinned].update(verified=True, reason=None)
            return dict(base, chosen=pinned, from_cache=False, pinned=True, candidates=results)
        print(f"aimkern.dispatch: the recorded choice {pinned!r} for {problem_key(spec, problem)} is not available "
              f"here ({reason}); measuring instead", flush=True)

    entry = _cache().get(key)
    if entry is not None and entry.get("names") == names and entry["chosen"] in names:
        cached = entry.get("candidates", {})
        for n, r in cached.items():
            if n in results and isinstance(r, dict):
                results[n] = {"ms": r.get("ms"), "verified": bool(r.get("verified")), "reason": r.get("reason")}
        return dict(base, chosen=entry["chosen"], from_cache=True, pinned=False, candidates=results)

    for c in usable:
        reason = measure_safely(lambda c=c: measure.verify(spec, c, problem))
        if reason is None:
            results[c.name]["verified"] = True
            reason = measure_safely(lambda c=c: _store(results[c.name], measure.time_ms(spec, c, problem)))
        if reason is not None:
            results[c.name]["reason"] = reason
            _warn(spec.name, c.name, reason)
    timed = [c for c in usable if results[c.name]["ms"] is not None]
    if not timed:
        raise RuntimeError(
            f"aimkern.dispatch: no candidate of {spec.name} ran correctly on {problem_key(spec, problem)}: "
            + "; ".join(f"{n}: {r['reason']}" for n, r in results.items())
        )
    chosen = min(timed, key=lambda c: results[c.name]["ms"]).name
    _cache().put(key, {"chosen": chosen, "names": names, "candidates": results})
    return dict(base, chosen=chosen, from_cache=False, pinned=False, candidates=results)


def _store(result: dict, ms: float) -> None:
    result["ms"] = float(ms)


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


def _problem_row(spec: OpSpec, problem: Problem) -> dict:
    return {
        "device": problem.device, "dtype": problem.dtype, "mask": spec.mask_kind(problem), "grad": problem.grad,
        "shapes": {n: list(s) for n, s in zip(spec.tensor_args, problem.shapes) if s is not None},
    }


# ------------------------------------------------------------------------------------------ seeing, pinning
def report() -> list:
    """One row per key decided in this process: ``{"op", "key", "chosen", "from_cache", "candidates":
    {name: {"ms", "verified", "reason"}}}`` plus ``"problem"`` (device, dtype, mask, grad, shapes),
    ``"problem_key"`` (the key without the environment), ``"kinds"`` (each candidate's kind: "aimkern",
    "torch" or "user") and ``"pinned"``."""
    with _LOCK:
        return [dict(row, candidates={n: dict(r) for n, r in row["candidates"].items()}) for row in _ROWS.values()]


def choices() -> dict:
    """{problem key: chosen candidate} of this process's decisions: what a training run records."""
    with _LOCK:
        return {row["problem_key"]: row["chosen"] for row in _ROWS.values()}


def pin(recorded: dict) -> None:
    """Make the decisions of ``recorded`` ({problem key: candidate name}, from ``choices()`` of an earlier
    run) win over measuring: a pinned candidate is verified, then used without timing. One that is not
    available here is reported in one line and the key is measured instead."""
    if not isinstance(recorded, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in recorded.items()):
        raise TypeError("aimkern.dispatch.pin: recorded must be a {problem key: candidate name} dict of strings")
    with _LOCK:
        _PINNED.update(recorded)
        _MEMO.clear()
        _FAST.clear()
