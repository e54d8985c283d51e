"""Measured dispatch (aimkern.dispatch), exercised for real among the CPU candidates: real verification
against float64, real timing, a real cache file shared by processes."""
import json
import os
import subprocess
import sys
import textwrap
import time
import warnings

import pytest
import torch

import aimkern
from aimkern import dispatch
from aimkern.dispatch import DispatchWarning, environment
from aimkern.dispatch.cache import DecisionCache


@pytest.fixture
def measured(monkeypatch, tmp_path):
    """Measured dispatch with a fresh cache folder; user candidates removed afterwards."""
    monkeypatch.setenv("AIMKERN_DISPATCH", "measured")
    monkeypatch.setenv("AIMKERN_CACHE_DIR", str(tmp_path))
    dispatch.reset()
    added = []

    def register(op, name, fn, **kw):
        dispatch.register(op, name, fn, **kw)
        added.append((op, name))

    yield register
    for op, name in added:
        dispatch.unregister(op, name)
    monkeypatch.undo()
    dispatch.reset()


def _qkv(n=37, d=16, grad=True):
    return [torch.randn(2, 2, n, d, requires_grad=grad) for _ in range(3)]


def _ref_attention(q, k, v, **kw):
    kw.pop("deterministic")
    return aimkern.reference.attention_reference(q, k, v, **kw)


def _row(op="attention"):
    rows = [r for r in dispatch.report() if r["op"] == op]
    assert len(rows) == 1, rows
    return rows[0]


def test_auto_on_cpu_measures_torch_paths(measured):
    q, k, v = _qkv()
    out = aimkern.attention(q, k, v, is_causal=True, block_size=3, prefix_len=5)
    out.sum().backward()
    row = _row()
    assert set(row) >= {"op", "key", "chosen", "from_cache", "candidates"}
    assert row["from_cache"] is False
    assert row["chosen"] in ("sdpa", "reference")
    for name in ("sdpa", "reference"):
        c = row["candidates"][name]
        assert c["verified"] and c["ms"] > 0 and c["reason"] is None
    # The interpreter is not a candidate on CPU unless asked for; CUDA-only backends say why they are out.
    assert "interpreter" in row["candidates"]["triton-split"]["reason"]
    assert row["candidates"]["sdpa-flash"]["reason"] == "runs on cuda, not cpu"
    ref = aimkern.attention(q, k, v, is_causal=True, block_size=3, prefix_len=5, backend="reference")
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_key_names_the_problem_and_the_environment(measured):
    q, k, v = _qkv(grad=False)
    with torch.no_grad():
        aimkern.attention(q, k, v, is_causal=True, prefix_len=torch.tensor([3, 4]))
    key = _row()["key"]
    assert key.startswith("attention|float32|prefix-causal|nograd|bh<=4|n37|d16|")
    assert f"torch{torch.__version__}" in key and "triton" in key


def test_wrong_candidate_is_rejected_and_never_chosen(measured):
    def wrong(q, k, v, **kw):  # fast, and off by a little: verification must catch it
        return _ref_attention(q, k, v, **kw) * 1.001

    measured("attention", "wrong", wrong)
    with pytest.warns(DispatchWarning, match=r"'wrong' rejected: output 0: max error"):
        aimkern.attention(*_qkv(), is_causal=True)
    row = _row()
    assert row["chosen"] != "wrong"
    assert row["candidates"]["wrong"]["verified"] is False and row["candidates"]["wrong"]["ms"] is None


def test_wrong_gradient_is_rejected(measured):
    class ScaledGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            return 2 * g

    def bad_backward(q, k, v, **kw):
        return _ref_attention(ScaledGrad.apply(q), k, v, **kw)

    measured("attention", "bad-backward", bad_backward)
    with pytest.warns(DispatchWarning, match=r"'bad-backward' rejected: grad of q"):
        aimkern.attention(*_qkv())
    assert _row()["chosen"] != "bad-backward"


def test_raising_candidate_is_rejected_with_its_reason(measured):
    def broken(q, k, v, **kw):
        raise RuntimeError("no kernel image for this device")

    measured("attention", "broken", broken)
    with pytest.warns(DispatchWarning, match="no kernel image for this device"):
        out = aimkern.attention(*_qkv())
    assert out.shape == (2, 2, 37, 16)
    reason = _row()["candidates"]["broken"]["reason"]
    assert reason == "raised RuntimeError: no kernel image for this device"


def test_slow_correct_candidate_is_verified_but_not_chosen(measured):
    def slow(q, k, v, **kw):
        time.sleep(0.03)
        return _ref_attention(q, k, v, **kw)

    measured("attention", "slow", slow)
    aimkern.attention(*_qkv())
    row = _row()
    assert row["candidates"]["slow"]["verified"] is True
    assert row["candidates"]["slow"]["ms"] >= 30
    assert row["chosen"] != "slow"


def test_supports_rule_keeps_a_candidate_out(measured):
    calls = []

    def only_long(q, k, v, **kw):
        calls.append(q.shape)
        return _ref_attention(q, k, v, **kw)

    measured("attention", "only-long", only_long, supports=lambda p: p.shapes[0][2] >= 1024)
    aimkern.attention(*_qkv())
    assert calls == []
    assert _row()["candidates"]["only-long"]["reason"] == "supports() returned False"


def test_fast_user_candidate_wins(measured):
    """A correct candidate that is much faster than the others is chosen (the reference at a shape where
    it is slow, against a cached answer: the same values, no work). The answer is keyed by the inputs'
    values: one keyed by address returns a stale answer when a freed address is reused, and the check at
    the real shape rejects that."""
    q, k, v = _qkv(n=96, d=32, grad=False)
    answers = {}

    def memo(q, k, v, **kw):
        key = tuple(float(t.double().sum()) for t in (q, k, v))
        if key not in answers:
            answers[key] = _ref_attention(q, k, v, **kw)
        return answers[key]

    measured("attention", "memo", memo)
    with torch.no_grad():
        aimkern.attention(q, k, v)
    assert _row()["chosen"] == "memo"


def _call_the_other_ops(side: int, width: int, tokens: int, vocab: int) -> None:
    """patch_embed (4-px patches of side x side images), linear_cross_entropy and the pixel loss, fwd + bwd."""
    n = (side // 4) ** 2
    img, w = torch.randn(2, 3, side, side, requires_grad=True), torch.randn(width, 3, 4, 4, requires_grad=True)
    aimkern.patch_embed(img, w, torch.randn(width), torch.randn(n, width)).sum().backward()
    x = torch.randn(tokens, width, requires_grad=True)
    aimkern.linear_cross_entropy(x, torch.randn(vocab, width), torch.randint(0, vocab, (tokens,))).backward()
    pred = torch.randn(2, n, 48, requires_grad=True)
    aimkern.next_patch_pixel_loss(pred, torch.randn(2, 3, side, side), patch_size=4).backward()


def test_every_op_decides_on_cpu(measured):
    _call_the_other_ops(side=16, width=32, tokens=6, vocab=50)
    rows = {r["op"]: r for r in dispatch.report()}
    assert set(rows) == {"patch_embed", "linear_cross_entropy", "next_patch_pixel_loss"}
    assert rows["patch_embed"]["chosen"] in ("conv2d", "unfold-linear")
    assert rows["linear_cross_entropy"]["chosen"] in ("chunked", "torch-fused", "reference")
    assert rows["next_patch_pixel_loss"]["chosen"] == "reference"
    for r in rows.values():
        assert r["candidates"][r["chosen"]]["verified"]


def test_fixed_mode_measures_nothing(monkeypatch, tmp_path):
    monkeypatch.setenv("AIMKERN_DISPATCH", "fixed")
    monkeypatch.setenv("AIMKERN_CACHE_DIR", str(tmp_path))
    dispatch.reset()
    try:
        aimkern.attention(*_qkv())
        assert dispatch.report() == []
        assert not (tmp_path / "dispatch.json").exists()
    finally:
        monkeypatch.undo()
        dispatch.reset()


def test_bad_mode_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("AIMKERN_DISPATCH", "fastest")
    dispatch.reset()
    try:
        with pytest.raises(ValueError, match="AIMKERN_DISPATCH must be one of"):
            aimkern.attention(*_qkv())
    finally:
        monkeypatch.undo()
        dispatch.reset()


def test_cached_decision_is_reused_without_timing(measured, tmp_path):
    aimkern.attention(*_qkv())
    first = _row()
    dispatch.reset()  # a new process, as far as this process's memory goes; the file stays
    aimkern.attention(*_qkv())
    again = _row()
    assert again["from_cache"] is True and again["chosen"] == first["chosen"]
    assert again["candidates"][first["chosen"]]["ms"] == first["candidates"][first["chosen"]]["ms"]


_FRESH = textwrap.dedent("""
    import json, sys, torch, aimkern
    from aimkern import dispatch
    calls = []
    def counted(q, k, v, **kw):
        calls.append(1)
        kw.pop("deterministic")
        return aimkern.reference.attention_reference(q, k, v, **kw)
    dispatch.register("attention", "counted", counted)
    torch.manual_seed(0)
    q = torch.randn(2, 2, 37, 16, requires_grad=True)
    aimkern.attention(q, q, q).sum().backward()
    row = dispatch.report()[0]
    print(json.dumps({"from_cache": row["from_cache"], "chosen": row["chosen"], "calls": len(calls)}))
""")


def _fresh_process(tmp_path) -> dict:
    env = dict(os.environ, AIMKERN_DISPATCH="measured", AIMKERN_CACHE_DIR=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", _FRESH], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_cache_hit_in_a_fresh_process(tmp_path):
    first = _fresh_process(tmp_path)
    assert first["from_cache"] is False and first["calls"] > 3  # verified and timed
    second = _fresh_process(tmp_path)
    assert second["from_cache"] is True and second["chosen"] == first["chosen"]
    assert second["calls"] == (1 if first["chosen"] == "counted" else 0)  # no verification, no timing


def test_corrupt_cache_file_is_reported_and_replaced(measured, tmp_path):
    (tmp_path / "dispatch.json").write_text("{not json")
    with pytest.warns(DispatchWarning, match=r"dispatch.json is not valid JSON.*replaced"):
        aimkern.attention(*_qkv())
    data = json.loads((tmp_path / "dispatch.json").read_text())
    assert data["format"] == "aimkern-dispatch" and len(data["entries"]) == 1


def test_foreign_cache_file_is_reported_and_replaced(measured, tmp_path):
    (tmp_path / "dispatch.json").write_text(json.dumps({"some": "other tool's file"}))
    with pytest.warns(DispatchWarning, match="not an aimkern dispatch file"):
        aimkern.attention(*_qkv())
    assert json.loads((tmp_path / "dispatch.json").read_text())["format"] == "aimkern-dispatch"


def test_key_changes_with_the_triton_version(measured, monkeypatch):
    aimkern.attention(*_qkv())
    key = _row()["key"]
    environment.fingerprint.cache_clear()
    monkeypatch.setattr(environment, "_triton_version", lambda: "9.9.9")
    try:
        dispatch.reset()
        aimkern.attention(*_qkv())
        row = _row()
        assert row["key"] != key and "triton9.9.9" in row["key"]
        assert row["from_cache"] is False  # decided again: a new Triton may change the answer
    finally:
        environment.fingerprint.cache_clear()


def test_a_new_candidate_makes_the_key_decide_again(measured):
    aimkern.attention(*_qkv())
    measured("attention", "another", _ref_attention)
    aimkern.attention(*_qkv())
    row = _row()
    assert row["from_cache"] is False and row["candidates"]["another"]["verified"]


_WRITER = textwrap.dedent("""
    import sys
    from aimkern.dispatch.cache import DecisionCache
    folder, who = sys.argv[1], sys.argv[2]
    cache = DecisionCache(folder)
    for i in range(40):
        cache.put(f"{who}-{i}", {"chosen": "reference", "names": ["reference"], "candidates": {}})
""")


def test_two_writers_lose_nothing(tmp_path):
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path), who]) for who in ("a", "b")]
    assert all(p.wait(timeout=120) == 0 for p in procs)
    entries = json.loads((tmp_path / "dispatch.json").read_text())["entries"]
    assert set(entries) == {f"{w}-{i}" for w in "ab" for i in range(40)}
    assert not list(tmp_path.glob("*.tmp"))


def test_unwritable_cache_still_decides(measured, tmp_path, monkeypatch):
    monkeypatch.setenv("AIMKERN_CACHE_DIR", str(tmp_path / "file-not-folder" / "x"))
    (tmp_path / "file-not-folder").write_text("")
    dispatch.reset()
    with pytest.warns(DispatchWarning, match="not writable"):
        out = aimkern.attention(*_qkv())
    assert out.shape == (2, 2, 37, 16) and _row()["chosen"]


def test_compiled_call_decides_without_graph_break_or_recompile(measured):
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()

    def step(q, k, v):
        return aimkern.attention(q, k, v, is_causal=True, prefix_len=4).square().sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    q, k, v = _qkv()
    compiled(q, k, v).backward()
    compiled(*_qkv()).backward()
    assert counters["stats"]["unique_graphs"] == 1
    row = _row()
    assert row["chosen"] in ("sdpa", "reference") and row["from_cache"] is False
    expected = aimkern.attention(q, k, v, is_causal=True, prefix_len=4, backend="reference").square().sum()
    torch.testing.assert_close(compiled(q, k, v), expected, atol=1e-4, rtol=1e-5)


def test_pinned_choice_is_used_without_timing(measured):
    calls = []

    def counted(q, k, v, **kw):
        calls.append(1)
        return _ref_attention(q, k, v, **kw)

    measured("attention", "counted", counted)
    q, k, v = _qkv()
    aimkern.attention(q, k, v)
    recorded = dispatch.choices()
    key = next(iter(recorded))
    dispatch.reset()
    dispatch.pin({key: "counted"})
    calls.clear()
    aimkern.attention(q, k, v)
    row = _row()
    assert row["chosen"] == "counted" and row["pinned"] is True
    assert len(calls) == 2  # verification + the call itself: no timing


def test_unavailable_pinned_choice_is_reported_in_one_line(measured, capsys):
    q, k, v = _qkv()
    aimkern.attention(q, k, v)
    key = next(iter(dispatch.choices()))
    dispatch.reset()
    dispatch.pin({key: "flash-attention-4"})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        aimkern.attention(q, k, v)
        aimkern.attention(q, k, v)
    lines = [str(w.message) for w in caught if "recorded choice" in str(w.message)]
    assert len(lines) == 1 and "'flash-attention-4'" in lines[0] and "measuring instead" in lines[0]
    assert issubclass(next(w.category for w in caught if "recorded choice" in str(w.message)), DispatchWarning)
    assert "recorded choice" not in capsys.readouterr().out  # a warning, not a print
    assert _row()["chosen"] in ("sdpa", "reference")


def test_register_checks_its_arguments():
    with pytest.raises(ValueError, match="unknown op"):
        dispatch.register("convolution", "x", lambda *a: a)
    with pytest.raises(ValueError, match="built-in candidate"):
        dispatch.register("attention", "reference", lambda *a: a)
    with pytest.raises(TypeError, match="fn must be callable"):
        dispatch.register("attention", "x", 3)
    with pytest.raises(TypeError, match="supports must be None or callable"):
        dispatch.register("attention", "x", lambda *a: a, supports=True)
    with pytest.raises(TypeError, match="recorded must be"):
        dispatch.pin(["attention"])


def test_packed_attention_follows_the_choice(measured):
    qkv = torch.randn(2, 37, 3, 2, 16, requires_grad=True)
    out = aimkern.attention_qkvpacked(qkv, is_causal=True)
    out.sum().backward()
    ref = aimkern.attention_qkvpacked(qkv.detach(), is_causal=True, backend="reference")
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert _row()["chosen"] in ("sdpa", "reference")


def test_cache_file_reads_back(tmp_path):
    cache = DecisionCache(tmp_path)
    cache.put("k", {"chosen": "sdpa", "names": ["sdpa"], "candidates": {}})
    assert DecisionCache(tmp_path).get("k")["chosen"] == "sdpa"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert DecisionCache(tmp_path / "missing").get("k") is None  # no file: nothing to report


_RANKS = textwrap.dedent("""
    import json, os, sys, time
    import torch, torch.distributed as dist
    import aimkern
    from aimkern import dispatch
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    answers = {}
    def only_fast_on_rank0(q, k, v, **kw):
        # Correct everywhere; fast on rank 0 (a memo), slow on rank 1: rank 1 alone would never choose it.
        if rank == 1:
            time.sleep(0.02)
        kw.pop("deterministic")
        key = tuple(float(t.double().sum()) for t in (q, k, v))
        if key not in answers:
            answers[key] = aimkern.reference.attention_reference(q, k, v, **kw)
        return answers[key]
    dispatch.register("attention", "rank0-fast", only_fast_on_rank0)
    torch.manual_seed(0)
    q = torch.randn(2, 2, 96, 32)
    with torch.no_grad():
        aimkern.attention(q, q, q)
    row = dispatch.report()[0]
    with open(os.path.join(sys.argv[1], f"rank{rank}.json"), "w") as f:
        json.dump({"chosen": row["chosen"]}, f)
    dist.destroy_process_group()
""")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_ranks_run_rank0s_choice(tmp_path):
    script = tmp_path / "ranks.py"
    script.write_text(_RANKS)
    env = dict(os.environ, AIMKERN_DISPATCH="measured", AIMKERN_CACHE_DIR=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          "--master-port", str(_free_port()), str(script), str(tmp_path)],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    chosen = [json.loads((tmp_path / f"rank{r}.json").read_text())["chosen"] for r in (0, 1)]
    assert chosen == ["rank0-fast", "rank0-fast"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU tensors run Triton only under the interpreter, which "
                    "tests/conftest.py turns on where there is no GPU")
def test_triton_candidates_verify_under_the_interpreter_when_asked(measured, monkeypatch):
    """AIMKERN_DISPATCH_INTERPRETER=1 makes the Triton paths candidates on CPU: each is verified (fp32,
    against float64) and timed like the others; wherever it applies, it is correct."""
    monkeypatch.setenv("AIMKERN_DISPATCH_INTERPRETER", "1")
    q, k, v = _qkv(n=20, d=16)
    aimkern.attention(q, k, v, is_causal=True, prefix_len=3, deterministic=False).sum().backward()
    _call_the_other_ops(side=8, width=16, tokens=5, vocab=40)
    rows = {r["op"]: r for r in dispatch.report()}
    triton = {op: {n: c for n, c in r["candidates"].items() if r["kinds"][n] == "aimkern"} for op, r in rows.items()}
    assert set(triton["attention"]) == {"triton-fused", "triton-split", "triton-split-atomic"}
    for op, cands in triton.items():
        for name, c in cands.items():
            assert c["verified"] and c["ms"] > 0, (op, name, c["reason"])
