"""Measured dispatch: on the first call for a key, verify every candidate that applies, time the correct
ones, run the fastest; remember the choice in this process and in the decisions file.

A key is the op, the environment (``environment.fingerprint``: device name and capability, torch / Triton /
driver versions), the dtype, the mask kind, grad on or off and the shape band (``OpSpec.shape_band``). Calls
whose key was decided before cost one dict look-up (``select``): the call's signature (shapes, dtypes,
devices, its frozen params) maps straight to its candidate.

Under ``torch.compile`` the decision is taken while the call is traced (``_decide_traced`` is a constant to
Dynamo): the graph holds the chosen candidate's ops, with no graph break and nothing to recompile later.
A decision depends on shapes, dtypes and params only, never on values, so deciding on synthetic inputs
while tracing chooses exactly what the first eager call would.

Under torchrun, rank 0 decides and broadcasts its choice; every rank runs the same path.

Everything this process remembers (registered candidates, decisions, pins, warnings given, the decisions
files) is one ``DispatchState``; the module's functions act on ``STATE``.
"""
from __future__ import annotations

import ast
import threading
import warnings
from typing import Callable, Optional

import torch

from ..specs import Candidate, OpSpec, Problem, SupportRule, describe, get_spec
from ..ops import _forced_configs
from . import environment, isolation, picks, realshape
from .cache import DecisionCache, DispatchWarning
from .measure import measure_safely
from .trial import public_style


class DispatchState:
    """What this process's dispatch remembers; ``reset()`` forgets it (registered candidates stay)."""

    def __init__(self):
        self.lock = threading.RLock()
        self.user: dict = {}  # op -> {name: Candidate} registered by users
        self.memo: dict = {}  # Problem -> Candidate (this process)
        self.fast: dict = {}  # call signature (plain tuple) -> Candidate: the per-call path, a few microseconds
        self.rows: dict = {}  # key -> report row (this process's decisions, in order)
        self.pinned: dict = {}  # problem key (no environment) -> candidate name, from a run being resumed
        self.pinned_configs: dict = {}  # problem key -> the configs it fixed (installed here), same source
        self.warned: set = set()  # (op, candidate, reason) already reported
        self.caches: dict = {}  # folder -> DecisionCache

    def reset(self) -> None:
        with self.lock:
            for table in (self.memo, self.fast, self.rows, self.pinned, self.pinned_configs, self.warned,
                          self.caches):
                table.clear()
            _forced_configs.clear()  # the configs decisions and pins forced

    def forget(self, op: str) -> None:
        """Forget the decisions of ``op`` (its candidates changed)."""
        with self.lock:
            for table in (self.memo, self.fast):
                for k in [k for k in table if (k.op if isinstance(k, Problem) else k[0]) == op]:
                    del table[k]
            for k in [k for k, row in self.rows.items() if row["op"] == op]:
                del self.rows[k]


STATE = DispatchState()


def register(op: str, name: str, fn: Callable, *, supports: Optional[SupportRule] = None) -> None:
    """Add a candidate for ``op`` ("attention", "patch_embed", "linear_cross_entropy" or
    "next_patch_pixel_loss").

    fn:       the public op's signature without ``backend`` (e.g. for attention ``fn(q, k, v, *, is_causal,
              block_size, prefix_len, scale, deterministic)``, prefix_len None or an int32 (B,) tensor),
              returning what the op returns; autograd differentiates it. (Built-in candidates take
              ``(*tensors, params)``; a wrapper here calls ``fn`` with the public op's arguments instead,
              ``OpSpec.public_call``.)
    supports: ``supports(problem) -> bool`` (``aimkern.specs.Problem``: device, dtype, shapes, params,
              requires_grad; ``problem.option(name)`` reads a param) says where it applies; None means
              everywhere, on CUDA and CPU.

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
    with STATE.lock:
        STATE.user.setdefault(op, {})[name] = Candidate(name, public_style(spec, fn), kind="user", supports=supports,
                                                        extra={"public": fn})
        STATE.forget(op)


def unregister(op: str, name: str) -> None:
    """Remove a candidate added with ``register`` (KeyError if there is none of that name)."""
    with STATE.lock:
        del STATE.user[get_spec(op).name][name]
        STATE.forget(op)


def reset() -> None:
    """Forget this process's decisions, pins, the configs they forced (``aimkern.ops._forced_configs``) and
    warnings (the decisions file stays; registered candidates stay), and read ``AIMKERN_DISPATCH`` again."""
    environment.refresh()
    STATE.reset()


def candidates(op: str) -> list:
    """The built-in and registered candidates of ``op``."""
    spec = get_spec(op)
    return list(spec.candidates) + list(STATE.user.get(spec.name, {}).values())


def problem_key(spec: OpSpec, problem: Problem) -> str:
    """The key without the environment: what a recorded choice is matched by on another machine."""
    grad = "grad" if problem.grad else "nograd"
    return f"{spec.name}|{problem.dtype}|{spec.mask_kind(problem)}|{grad}|{spec.shape_band(problem)}"


def decision_key(spec: OpSpec, problem: Problem) -> str:
    return f"{problem_key(spec, problem)}|{environment.fingerprint(problem.device)}"


# ------------------------------------------------------------------------------------------ choosing
def select(spec: OpSpec, tensors: tuple, params) -> Candidate:
    """The candidate for a call of ``spec``'s op on ``tensors`` (in the spec's order, None where absent) with
    ``params``: one dict look-up once the call's signature was seen, ``choose`` otherwise."""
    compiling = torch.compiler.is_compiling()
    dtype = spec.compute_dtype(tensors) if spec.compute_dtype is not None else tensors[0].dtype
    if not compiling:
        # Cheap to build and to hash: shapes are tuples, dtypes hash by identity, get_device() is an int
        # (-1 on the CPU); torch.device objects would cost more than the rest. The params enter as their field
        # values (a frozen dataclass's __dict__ holds just those, in field order): the dataclass's own
        # __hash__ and __eq__ build a tuple on every call, 2 us of the 3 us this look-up otherwise costs.
        sig = (spec.name, dtype, torch.is_grad_enabled(), *params.__dict__.values(),
               *[None if t is None else (t.shape, t.dtype, t.get_device(), t.requires_grad) for t in tensors])
        cand = STATE.fast.get(sig)
        if cand is not None:
            return cand
    cand = choose(spec, describe(spec.name, tensors, params, dtype))
    if not compiling:
        STATE.fast[sig] = cand
    return cand


def choose(spec: OpSpec, problem: Problem) -> Candidate:
    """The candidate that runs ``problem`` (deciding it on first use)."""
    if torch.compiler.is_compiling():
        return _by_name(spec, _decide_traced(spec.name, _problem_text(spec, problem)))
    return _memoized(spec, problem)


# Dynamo takes a function's result as a constant only for constant arguments it can hash and compare: the
# problem crosses as the text of a tuple of plain values (the params as their field values, in field order;
# spec.param_names is read once, so Dynamo folds the attribute reads and the repr).
def _problem_text(spec: OpSpec, problem: Problem) -> str:
    values = tuple([getattr(problem.params, n) for n in spec.param_names])
    return repr((problem.op, problem.device, problem.dtype, problem.shapes, values, problem.requires_grad,
                 problem.dtypes))


def _problem_of_text(spec: OpSpec, text: str) -> Problem:
    op, device, dtype, shapes, values, requires_grad, dtypes = ast.literal_eval(text)
    return Problem(op, device, dtype, tuple(shapes), spec.params_type(*values), tuple(requires_grad), tuple(dtypes))


@torch._dynamo.assume_constant_result
def _decide_traced(op: str, text: str) -> str:
    spec = get_spec(op)
    return _memoized(spec, _problem_of_text(spec, text)).name


def _memoized(spec: OpSpec, problem: Problem) -> Candidate:
    """This process's decision for ``problem``, taken (once, under the lock) when there is none."""
    cand = STATE.memo.get(problem)
    if cand is None:
        with STATE.lock:
            cand = STATE.memo.get(problem)  # another thread may have decided while this one waited
            if cand is None:
                cand = _decide(spec, problem)
                STATE.memo[problem] = cand
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
    if folder not in STATE.caches:
        STATE.caches[folder] = DecisionCache(folder)
    return STATE.caches[folder]


def _warn(what: tuple, message: str) -> None:
    """One DispatchWarning per ``what`` in this process (a step calls each op many times)."""
    if what not in STATE.warned:
        STATE.warned.add(what)
        warnings.warn(f"aimkern.dispatch: {message}", DispatchWarning, stacklevel=6)


def _decide(spec: OpSpec, problem: Problem) -> Candidate:
    key = decision_key(spec, problem)
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        row = [_decide_row(spec, problem, key) if dist.get_rank() == 0 else None]
        dist.broadcast_object_list(row, src=0)
        row = row[0]
    else:
        row = _decide_row(spec, problem, key)
    if row.get("configs"):  # every rank, and every later launch here, runs the configs the decision fixed
        origin = "a resumed run's recorded choices" if row["pinned"] else f"aimkern.dispatch's decision for {key}"
        row = dict(row, configs=picks.install(row["configs"], origin))
    STATE.rows[key] = row
    return _by_name(spec, row["chosen"])


def _decide_row(spec: OpSpec, problem: Problem, key: str) -> dict:
    cands = candidates(spec.name)
    why_not = _eligible(problem)
    results = {c.name: {"ms": None, "verified": False, "reason": why_not(c)} for c in cands}
    usable = [c for c in cands if results[c.name]["reason"] is None]
    names = sorted(c.name for c in usable)
    base = {"op": spec.name, "key": key, "problem_key": problem_key(spec, problem),
            "problem": _problem_row(spec, problem), "kinds": {c.name: c.kind for c in cands}}

    trials = isolation.Trials(spec, problem, _warn)
    try:
        pinned = STATE.pinned.get(problem_key(spec, problem))
        if pinned is not None:
            row = _pinned_row(spec, problem, pinned, usable, results, base, trials)
            if row is not None:
                return row
        entry = _cache().get(key)
        configs = picks.usable(entry.get("configs")) if entry is not None else None
        if entry is not None and entry.get("names") == names and entry["chosen"] in names and configs is not None:
            cached = entry.get("candidates", {})  # a cached decision: no trial, no worker
            for n, r in cached.items():
                if n in results and isinstance(r, dict):
                    results[n] = {"ms": r.get("ms"), "verified": bool(r.get("verified")), "reason": r.get("reason")}
                    if isinstance(r.get("kernels"), dict):
                        results[n]["kernels"] = r["kernels"]
            return dict(base, chosen=entry["chosen"], from_cache=True, pinned=False, candidates=results,
                        configs=configs if picks.wanted(problem) else [])
        trusted = _measure_all(spec, problem, usable, results, trials)
    finally:
        trials.close()
    timed = [c for c in usable if results[c.name]["ms"] is not None]
    if not timed:
        raise RuntimeError(
            f"aimkern.dispatch: no candidate of {spec.name} ran correctly on {problem_key(spec, problem)}: "
            + "; ".join(f"{n}: {r['reason']}" for n, r in results.items())
        )
    chosen = min(timed, key=lambda c: results[c.name]["ms"]).name
    check = {"trusted": trusted, "seconds": round(trials.check_s, 4), "isolated": trials.isolate}
    configs = results[chosen].get("configs", []) if picks.wanted(problem) else []
    _cache().put(key, {"chosen": chosen, "names": names, "candidates": results, "real_shape_check": check,
                       "configs": configs})
    return dict(base, chosen=chosen, from_cache=False, pinned=False, candidates=results, real_shape_check=check,
                configs=configs)


def _pinned_row(spec, problem, pinned, usable, results, base, trials) -> Optional[dict]:
    """The row of a recorded choice (verified, not timed), or None (said once) when it is not available."""
    cand = next((c for c in usable if c.name == pinned), None)
    reason = results[pinned]["reason"] if pinned in results else "no such candidate here"
    if cand is not None:
        reason = trials.run(cand, None, verify_only=True)["reason"]
    if reason is None:
        results[pinned].update(verified=True, reason=None)
        configs = STATE.pinned_configs.get(problem_key(spec, problem), []) if picks.wanted(problem) else []
        return dict(base, chosen=pinned, from_cache=False, pinned=True, candidates=results, configs=configs)
    _warn(("pinned", problem_key(spec, problem)), f"the recorded choice {pinned!r} for "
          f"{problem_key(spec, problem)} is not available here ({reason}); measuring instead")
    return None


def _measure_all(spec: OpSpec, problem: Problem, usable: list, results: dict, trials) -> str:
    """Try every usable candidate (``trial.trial``: verify, check at the real shape, time), filling
    ``results``; the name of the path the real-shape values were checked against.

    The trusted path is the float64 reference where it fits in memory; else PyTorch's fastest correct
    candidate: PyTorch's candidates are then tried first (their values checked for finiteness only)."""
    fits = measure_safely(lambda: None if realshape.reference_fits(spec, problem) else "too large")
    if fits is None:
        trusted = Candidate("reference", spec.reference, kind="torch", extra={"definition": True})
        first = [(c, trusted) for c in usable]
    else:
        first = [(c, None) for c in usable if c.kind == "torch"]
    for c, against in first:
        _record(spec, c, trials.run(c, against), results)
    if fits is None:
        return "float64 reference"
    torch_timed = [c for c in usable if c.kind == "torch" and results[c.name]["ms"] is not None]
    trusted = min(torch_timed, key=lambda c: results[c.name]["ms"]) if torch_timed else None
    for c in [c for c in usable if c.kind != "torch"]:
        _record(spec, c, trials.run(c, trusted), results)
    return trusted.name if trusted is not None else "none (finiteness only)"


def _record(spec: OpSpec, cand: Candidate, result: dict, results: dict) -> None:
    results[cand.name].update(ms=result["ms"], verified=result["verified"], reason=result["reason"])
    for extra in ("kernels", "configs"):
        if extra in result:
            results[cand.name][extra] = result[extra]
    if result["reason"] is not None:
        _warn((spec.name, cand.name, result["reason"]), f"{spec.name} candidate {cand.name!r} rejected: {result['reason']}")


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
    "torch" or "user") and ``"pinned"``. A decision measured in this process also has ``"real_shape_check"``
    (``{"trusted", "seconds", "isolated"}``: what the values at the real shape were checked against, what the
    check cost) and, per Triton candidate, ``"kernels": {"verification": [...], "real": [...]}``: the kernels,
    table configs and specializations its verification ran beside those its real-shape run launched, and
    ``"configs"``: the config each autotuned kernel ran at the real shape. ``"configs"`` of the row: the
    configs the decision fixed for every later launch (deterministic problems; ``picks``)."""
    with STATE.lock:
        return [dict(row, candidates={n: dict(r) for n, r in row["candidates"].items()}) for row in STATE.rows.values()]


def choices() -> dict:
    """{problem key: chosen candidate} of this process's decisions: what a training run records. Where a
    decision fixed autotuned configs the value is ``{"chosen", "configs", "environment", "device"}``
    (``picks.recorded``)."""
    with STATE.lock:
        return {row["problem_key"]: picks.recorded(row) for row in STATE.rows.values()}


def chosen_name(value) -> str:
    """The candidate name of a recorded choice (``choices()``'s value, either form)."""
    return value if isinstance(value, str) else value["chosen"]


def pin(recorded: dict) -> None:
    """Make the decisions of ``recorded`` (``choices()`` of an earlier run: {problem key: candidate name or
    {"chosen", "configs", ...}}) win over measuring: a pinned candidate is verified, then used without
    timing, and its recorded configs are forced now, before any launch (where this machine's environment is
    the recorded one; else said once, and those kernels autotune). A candidate that is not available here is
    reported in one DispatchWarning and the key is measured instead."""
    if not isinstance(recorded, dict) or not all(isinstance(k, str) for k in recorded):
        raise TypeError("aimkern.dispatch.pin: recorded must be a {problem key: recorded choice} dict")
    parsed = {k: picks.parse(k, v) for k, v in recorded.items()}
    with STATE.lock:
        for key, (name, configs, env, device) in parsed.items():
            STATE.pinned[key] = name
            STATE.pinned_configs.pop(key, None)
            if not configs:
                continue
            if picks.environment_here(env, device) is None:
                _warn(("pinned-configs", key), f"the configs recorded for {key} were picked on {env}; this "
                      "machine differs, so its kernels autotune again (their sums may differ from the recorded run's)")
                continue
            STATE.pinned_configs[key] = picks.install(configs, "a resumed run's recorded choices", replace=True)
        STATE.memo.clear()
        STATE.fast.clear()
