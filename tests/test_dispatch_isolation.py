"""Decisions in a worker process (aimkern/dispatch/isolation.py, worker.py), for real on the CPU with
AIMKERN_DISPATCH_ISOLATE=1: a candidate that aborts, hangs, or is wrong only at the real shape is rejected
with its reason; this process (the caller) survives and runs the fastest correct candidate."""
import os
import signal
import time

import pytest
import torch

import aimkern
import dispatch_bad_candidates as bad
from aimkern import dispatch
from aimkern.dispatch import DispatchWarning, isolation
from aimkern.dispatch.isolation import WORKER
from aimkern.specs import describe, get_spec

N_LONG = 130  # > 100: the "when long" candidates go wrong here


@pytest.fixture
def isolated(monkeypatch, tmp_path):
    """Measured dispatch in the worker, a fresh cache folder; user candidates removed afterwards."""
    monkeypatch.setenv("AIMKERN_DISPATCH", "measured")
    monkeypatch.setenv("AIMKERN_DISPATCH_ISOLATE", "1")
    monkeypatch.setenv("AIMKERN_CACHE_DIR", str(tmp_path))
    dispatch.reset()
    added = []

    def register(name, fn, **kw):
        dispatch.register("attention", name, fn, **kw)
        added.append(name)

    yield register
    for name in added:
        dispatch.unregister("attention", name)
    WORKER.unavailable = None  # a test that made the worker unavailable leaves none behind
    monkeypatch.undo()
    dispatch.reset()


def _qkv(n, grad=True):
    return [torch.randn(1, 2, n, 16, requires_grad=grad) for _ in range(3)]


def _call(n, grad=True):
    q, k, v = _qkv(n, grad)
    out = aimkern.attention(q, k, v, is_causal=True)
    if grad:
        out.sum().backward()
    ref = aimkern.attention(q, k, v, is_causal=True, backend="reference")
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)  # the winner, run here, is right
    return out


def _row(n):
    rows = [r for r in dispatch.report() if r["op"] == "attention" and f"|n{n}|" in r["key"]]
    assert len(rows) == 1, rows
    return rows[0]


def _rejections(record, name):
    return [str(w.message) for w in record if issubclass(w.category, DispatchWarning) and f"{name!r}" in str(w.message)]


def test_the_verification_problem_keeps_n_and_cuts_the_heads():
    """The when-long candidates meet N > 100 in verification already (it keeps N up to 1024); the
    when-many-heads ones only at the real shape (verification runs 2 x 2 heads on the CPU)."""
    q = torch.empty(2, 4, N_LONG, 16)
    problem = describe("attention", (q, q, q, None), aimkern.ops.attention.AttentionParams(True), q.dtype)
    b, h, n, _ = get_spec("attention").small_problem(problem).shapes[0]
    assert n == N_LONG > bad.LONG and b * h <= bad.MANY < 2 * 4


def test_abort_is_rejected_and_the_caller_survives(isolated):
    isolated("aborts", bad.aborts)
    isolated("right", bad.fast_and_right)
    with pytest.warns(DispatchWarning) as record:
        _call(40)
    assert _rejections(record, "aborts") == [
        f"aimkern.dispatch: attention candidate 'aborts' rejected: crashed (signal {int(signal.SIGABRT)})"]
    row = _row(40)
    assert row["candidates"]["aborts"]["ms"] is None and row["chosen"] != "aborts"
    assert row["candidates"]["right"]["verified"] and row["candidates"]["right"]["ms"] > 0  # tried after the crash
    assert row["real_shape_check"]["isolated"] is True


@pytest.mark.slow
def test_hang_times_out(isolated, monkeypatch):
    monkeypatch.setenv("AIMKERN_DISPATCH_TIMEOUT", "20")
    isolated("hangs", bad.hangs)
    start = time.monotonic()
    with pytest.warns(DispatchWarning) as record:
        _call(40, grad=False)
    assert time.monotonic() - start < 120
    assert _rejections(record, "hangs") == ["aimkern.dispatch: attention candidate 'hangs' rejected: timed out after 20 s"]
    assert _row(40)["chosen"] in ("sdpa", "reference")


def _heads_call(n, b=2, h=4):
    q, k, v = [torch.randn(b, h, n, 16, requires_grad=True) for _ in range(3)]
    out = aimkern.attention(q, k, v, is_causal=True)
    out.sum().backward()
    torch.testing.assert_close(out, aimkern.attention(q, k, v, is_causal=True, backend="reference"))


def test_nan_gradient_above_n_100_is_rejected(isolated):
    isolated("nan-dq", bad.nan_dq_when_long)
    with pytest.warns(DispatchWarning) as record:
        _call(N_LONG)
    assert _rejections(record, "nan-dq") == [
        "aimkern.dispatch: attention candidate 'nan-dq' rejected: grad of q: non-finite values"]
    assert _row(N_LONG)["chosen"] != "nan-dq"


def test_finite_but_wrong_above_n_100_is_rejected(isolated):
    isolated("wrong-long", bad.wrong_when_long)
    with pytest.warns(DispatchWarning) as record:
        _call(N_LONG)
    [message] = _rejections(record, "wrong-long")
    assert f"rejected: output 0: max error" in message and f"on the verification problem 1x2x{N_LONG}x16" in message


def test_nan_gradient_at_the_real_shape_only_is_rejected(isolated):
    isolated("nan-dq-heads", bad.nan_dq_when_many_heads)
    with pytest.warns(DispatchWarning) as record:
        _heads_call(40)
    assert _rejections(record, "nan-dq-heads") == [
        "aimkern.dispatch: attention candidate 'nan-dq-heads' rejected: NaN in dq at the real shape"]
    c = _row(40)["candidates"]["nan-dq-heads"]
    assert c["verified"] and c["ms"] is None  # right on the verification problem, rejected at the real shape


def test_finite_but_wrong_at_the_real_shape_only_is_rejected(isolated):
    isolated("wrong-heads", bad.wrong_when_many_heads)
    with pytest.warns(DispatchWarning) as record:
        _heads_call(40)
    [message] = _rejections(record, "wrong-heads")
    assert "rejected: output 0: max error" in message and "at the real shape (against reference)" in message
    row = _row(40)
    assert row["chosen"] != "wrong-heads" and row["real_shape_check"]["trusted"] == "float64 reference"
    assert row["candidates"]["wrong-heads"]["verified"] and row["real_shape_check"]["seconds"] > 0


def test_a_cached_decision_starts_no_worker(isolated):
    isolated("right", bad.fast_and_right)
    _call(24)
    assert WORKER.alive()
    WORKER.stop()
    starts = WORKER.starts
    dispatch.reset()  # a new process, as far as dispatch knows: only the decisions file remains
    _call(24)
    assert _row(24)["from_cache"] is True
    assert WORKER.starts == starts and not WORKER.alive()


def test_a_killed_worker_is_restarted(isolated):
    _call(24, grad=False)
    pid, starts = WORKER.pid, WORKER.starts
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    WORKER.proc.wait()
    _call(25, grad=False)  # another key: a fresh worker decides it
    assert WORKER.starts == starts + 1 and WORKER.pid not in (None, pid)
    assert all(r["verified"] for n, r in _row(25)["candidates"].items() if n in ("sdpa", "reference"))


def test_a_candidate_the_worker_cannot_import_is_tried_here_with_one_warning(isolated):
    def local(q, k, v, **kw):
        return bad.fast_and_right(q, k, v, **kw)

    isolated("local", local)
    with pytest.warns(DispatchWarning) as record:
        _call(24)
        _call(26)
    [message] = _rejections(record, "local")
    assert "verified in this process, not in the worker" in message and "defined inside a function" in message
    assert _row(26)["candidates"]["local"]["verified"]


def test_isolation_settings(monkeypatch):
    cpu = describe("attention", _qkv(8, grad=False) + [None], aimkern.ops.attention.AttentionParams(), torch.float32)
    monkeypatch.delenv("AIMKERN_DISPATCH_ISOLATE", raising=False)
    assert isolation.isolating(cpu) is False  # unset: CUDA only
    assert isolation.isolating(cpu.with_(device="cuda:0")) is True
    monkeypatch.setenv("AIMKERN_DISPATCH_ISOLATE", "0")
    assert isolation.isolating(cpu.with_(device="cuda:0")) is False
    monkeypatch.setenv("AIMKERN_DISPATCH_ISOLATE", "yes")
    with pytest.raises(ValueError, match="AIMKERN_DISPATCH_ISOLATE must be 0, 1 or unset"):
        isolation.isolating(cpu)
    monkeypatch.delenv("AIMKERN_DISPATCH_TIMEOUT", raising=False)
    assert isolation.timeout_s() == 300
    monkeypatch.setenv("AIMKERN_DISPATCH_TIMEOUT", "-3")
    with pytest.raises(ValueError, match="AIMKERN_DISPATCH_TIMEOUT must be a positive number"):
        isolation.timeout_s()
    assert isolation.not_importable(bad.aborts) is None
    assert "inside a function" in isolation.not_importable(lambda: None)


def test_a_worker_that_cannot_start_leaves_the_decision_to_this_process(isolated, monkeypatch):
    WORKER.stop()
    monkeypatch.setattr("sys.executable", "/bin/false")  # the worker's interpreter exits at once
    with pytest.warns(DispatchWarning, match=r"the dispatch worker is unavailable \(it failed to start: "
                      r"crashed \(exit status 1\)\); deciding in this process"):
        _call(24, grad=False)
    row = _row(24)
    assert row["real_shape_check"]["isolated"] is False and row["candidates"]["sdpa"]["verified"]
    assert not WORKER.alive()
    starts = WORKER.starts
    _call(25, grad=False)  # later keys do not try again
    assert WORKER.starts == starts and _row(25)["real_shape_check"]["isolated"] is False
