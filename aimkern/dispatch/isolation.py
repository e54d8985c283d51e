"""Deciding in a worker process, so that a bad kernel cannot take the caller down.

An illegal memory access poisons the caller's CUDA context (every later call fails, the fallback too), and
a kernel that never returns hangs the step; catching exceptions helps with neither. So verification and
timing run in one long-lived worker per process (``worker.py``): spawned as a fresh interpreter, never
forked (CUDA cannot be used in a forked child), started on the first key that is not decided yet, reused
for later keys, started again after it died. It gets the problem, never tensors, and makes its own inputs.

A candidate that kills the worker (a signal, an abort, a CUDA error) or runs longer than
``AIMKERN_DISPATCH_TIMEOUT`` seconds (default 300; the worker is then killed) is rejected with its reason,
"crashed (signal N)" or "timed out after S s"; the caller runs only the winner. Cached decisions never start
a worker.

``AIMKERN_DISPATCH_ISOLATE``: 1 always isolates, 0 never (verification and timing in the caller), unset:
on CUDA only (on the CPU every built-in candidate is PyTorch's own, and a worker's start, an interpreter
importing torch, would cost more than the decisions). A user's candidate goes to the worker when the worker
can import it by ``fn.__module__`` + ``fn.__qualname__``; else it is tried in the caller, said in one warning.
"""
from __future__ import annotations

import atexit
import os
import subprocess
import sys
from multiprocessing.connection import Connection
from typing import Callable, Optional

from ..ops import _forced_configs
from ..specs import Candidate, OpSpec, Problem
from .realshape import RealShape
from .trial import resolve, trial

ISOLATE_ENV, TIMEOUT_ENV = "AIMKERN_DISPATCH_ISOLATE", "AIMKERN_DISPATCH_TIMEOUT"
DEFAULT_TIMEOUT_S = 300.0
START_TIMEOUT_S = 600.0  # an interpreter importing torch and aimkern, on a loaded machine
_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class WorkerUnavailable(RuntimeError):
    """The worker could not be started (the decision then runs in the caller, said in one warning)."""


def isolating(problem: Problem) -> bool:
    """Whether ``problem``'s candidates are tried in the worker (``AIMKERN_DISPATCH_ISOLATE``)."""
    value = os.environ.get(ISOLATE_ENV, "").strip()
    if value == "":
        return problem.device_type == "cuda"
    if value not in ("0", "1"):
        raise ValueError(f"{ISOLATE_ENV} must be 0, 1 or unset, got {value!r}")
    return value == "1"


def timeout_s() -> float:
    """``AIMKERN_DISPATCH_TIMEOUT``: seconds one candidate's trial may take in the worker (default 300)."""
    text = os.environ.get(TIMEOUT_ENV, "").strip()
    if not text:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ValueError(f"{TIMEOUT_ENV} must be a positive number of seconds, got {text!r}")
    return value


def not_importable(fn: Callable) -> Optional[str]:
    """None when the worker can import ``fn`` as ``fn.__module__`` + ``fn.__qualname__``, else why not."""
    module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", None)
    if not module or not qualname:
        return "it has no __module__ and __qualname__ to import it by"
    if module == "__main__":
        return f"{qualname} is defined in __main__, which the worker does not run"
    if "<locals>" in qualname or "<lambda>" in qualname:
        return f"{module}.{qualname} is defined inside a function"
    try:
        found = resolve(module, qualname)
    except Exception as e:
        return f"{module}.{qualname} does not import ({type(e).__name__})"
    if found is not fn:
        return f"{module}.{qualname} names another object"
    return None


def _crash(returncode: int) -> str:
    if returncode < 0:
        return f"crashed (signal {-returncode})"
    return f"crashed (exit status {returncode})"


class Worker:
    """The parent's handle on its dispatch worker: started when first needed, again after it died."""

    def __init__(self):
        self.proc: Optional[subprocess.Popen] = None
        self.owner = 0  # the pid that started it: a forked child of the caller starts its own
        self.send_conn: Optional[Connection] = None
        self.recv_conn: Optional[Connection] = None
        self.starts = 0
        self.unavailable: Optional[str] = None  # why it could not serve (then this process decides itself)

    @property
    def pid(self) -> Optional[int]:
        return self.proc.pid if self.alive() else None

    def alive(self) -> bool:
        return self.proc is not None and self.owner == os.getpid() and self.proc.poll() is None

    def start(self) -> None:
        self.stop()
        child_in, to_child = os.pipe()
        from_child, child_out = os.pipe()
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            p for p in (_PACKAGE_ROOT, os.environ.get("PYTHONPATH", "")) if p))
        code = "from aimkern.dispatch.worker import main; main()"
        try:
            self.proc = subprocess.Popen([sys.executable, "-c", code, str(child_in), str(child_out)],
                                         pass_fds=(child_in, child_out), env=env, stdin=subprocess.DEVNULL)
        except OSError as e:
            os.close(to_child)
            os.close(from_child)
            raise WorkerUnavailable(f"it could not be started: {e}") from None
        finally:
            os.close(child_in)
            os.close(child_out)
        self.owner, self.starts = os.getpid(), self.starts + 1
        self.send_conn = Connection(to_child, readable=False)
        self.recv_conn = Connection(from_child, writable=False)
        if not self.recv_conn.poll(START_TIMEOUT_S):
            self.stop()
            raise WorkerUnavailable(f"it did not start within {START_TIMEOUT_S:g} s")
        try:
            self.recv_conn.recv()  # ("ready", pid)
        except (EOFError, OSError):
            code = self.proc.wait()
            self.stop()
            raise WorkerUnavailable(f"it failed to start: {_crash(code)}") from None

    def stop(self) -> None:
        """Kill the worker (if any) and close the pipes."""
        if self.proc is not None and self.owner == os.getpid() and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for conn in (self.send_conn, self.recv_conn):
            if conn is not None:
                conn.close()
        self.proc = self.send_conn = self.recv_conn = None

    def ask(self, message: tuple, timeout: float) -> dict:
        """The worker's answer to a trial ``message``; a dead or silent worker gives the reason instead."""
        for attempt in (0, 1):
            if not self.alive():
                self.start()
            try:
                self.send_conn.send(message)
                break
            except (BrokenPipeError, OSError):  # it died since the last answer: once more, on a fresh one
                self.stop()
                if attempt:
                    raise
        if not self.recv_conn.poll(timeout):
            self.stop()
            return {"ms": None, "verified": False, "reason": f"timed out after {timeout:g} s", "check_s": 0.0}
        try:
            kind, answer = self.recv_conn.recv()
            if kind == "unavailable":
                self.stop()
                raise WorkerUnavailable(answer)
            return answer
        except (EOFError, OSError):
            try:
                reason = _crash(self.proc.wait(timeout=60))
            except subprocess.TimeoutExpired:  # it closed its end but lives on: end it
                reason = "crashed (closed its pipe)"
            self.stop()
            return {"ms": None, "verified": False, "reason": reason, "check_s": 0.0}

    def release(self) -> None:
        """Tell the worker a decision is over (it frees the key's real-shape tensors)."""
        if self.alive():
            try:
                self.send_conn.send(("release",))
            except (BrokenPipeError, OSError):
                self.stop()


WORKER = Worker()
atexit.register(WORKER.stop)  # no worker outlives its caller (it would also exit on the closed pipe)


class Trials:
    """The trials of one decision: in the worker where isolating, else (and for a user's candidate the
    worker cannot import) in this process. ``check_s``: what the real-shape checks cost."""

    def __init__(self, spec: OpSpec, problem: Problem, warn: Callable[[tuple, str], None]):
        self.spec, self.problem, self.warn = spec, problem, warn
        self.isolate = isolating(problem) and WORKER.unavailable is None
        self.timeout = timeout_s() if self.isolate else None
        self.local = RealShape(spec, problem)
        self.remote_check_s = self._last_seen = 0.0
        self.used_worker = False

    @property
    def check_s(self) -> float:
        return self.local.seconds + self.remote_check_s

    def _ref(self, cand: Candidate) -> Optional[tuple]:
        """How the worker finds ``cand``, or None when it cannot (then it is tried here, said once)."""
        if cand.extra.get("definition"):
            return ("definition",)
        if cand.kind != "user":
            return ("builtin", cand.name)
        fn = cand.extra.get("public")
        why = "it was not registered with aimkern.dispatch.register" if fn is None else not_importable(fn)
        if why is None:
            return ("user", cand.name, fn.__module__, fn.__qualname__)
        self.warn(("in-process", self.spec.name, cand.name),
                  f"{self.spec.name} candidate {cand.name!r} is verified in this process, not in the worker: {why}")
        return None

    def run(self, cand: Candidate, trusted: Optional[Candidate], verify_only: bool = False) -> dict:
        """``{"ms", "verified", "reason"}`` of ``cand`` (``trial.trial``), wherever it is tried."""
        ref = self._ref(cand) if self.isolate else None
        trusted_ref = None
        if ref is not None and trusted is not None:
            trusted_ref = self._ref(trusted)
            if trusted_ref is None:
                ref = None  # the trusted values must come from the same inputs: both here
        if ref is None:
            return trial(self.spec, cand, self.problem, self.local, trusted, verify_only)
        self.used_worker = True
        try:
            result = WORKER.ask(("trial", list(sys.path), self.spec.name, self.problem, ref, trusted_ref,
                                 verify_only, _forced_configs.forced()), self.timeout)
        except (WorkerUnavailable, OSError) as e:  # no worker at all: decide here rather than not at all
            self.isolate = False
            WORKER.unavailable = str(e)
            self.warn(("no-worker", str(e)), f"the dispatch worker is unavailable ({e}); deciding in this process")
            return trial(self.spec, cand, self.problem, self.local, trusted, verify_only)
        # the worker's figure adds up over the key (from 0 again after a restart)
        seen = float(result.pop("check_s", 0.0) or 0.0)
        self.remote_check_s += seen - self._last_seen if seen >= self._last_seen else seen
        self._last_seen = seen
        return result

    def close(self) -> None:
        """The decision is over: free the real-shape tensors, here and in the worker (``check_s`` stays)."""
        if self.used_worker:
            WORKER.release()
        self.local.inputs = None
        self.local.trusted.clear()
