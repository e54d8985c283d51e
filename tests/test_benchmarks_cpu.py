"""The benchmark scripts and their harness on a CPU-only machine.

Every benchmark script runs here: it says no GPU speed is measured, runs its interpreter correctness check
(which compares aimkern with its peers' math) and times the peers that run on the CPU at its spec's tiny
shapes through benchmarks/harness.py, writing the same JSON rows a GPU run writes. Guards the scripts
against drifting from the library between GPU sessions. The harness itself is tested in-process: a peer
that raises, one that does not apply and one whose check fails are each skipped with their reason, and
the JSON keeps its shape."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import HAS_CUDA

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import harness  # noqa: E402

from aimkern.ops import AttentionParams, PixelLossParams  # noqa: E402
from aimkern.specs import Problem, get_spec  # noqa: E402
from bench_cases import BENCH  # noqa: E402

SCRIPTS = ["attn_throughput", "patch_embed", "pixel_loss", "cross_entropy", "pretrain_throughput"]

# The row keys of each op benchmark's JSON (the GPU run's, which benchmarks/RESULTS.md is written from),
# and the peers the CPU can time (the torch paths of the op's spec).
ROW_KEYS = {
    "attn_throughput": {"B", "N", "D", "mask", "pass", "aimkern ms", "aimkern TFLOP/s", "x vs best SDPA",
                        "x vs Flex", "SDPA cuDNN ms", "SDPA FA2 ms", "SDPA mem-eff + mask ms", "Flex ms",
                        "aimkern split bwd ms", "% matmul ceiling", "aimkern extra MiB", "Flex extra MiB"},
    "patch_embed": {"peer", "mode", "ms", "TFLOP/s", "GB/s", "peak_extra_MiB", "batch", "img", "patch", "dim",
                    "dtype"},
    "pixel_loss": {"peer", "mode", "ms", "GB/s", "%copy", "peak_extra_MiB", "batch", "img", "patch", "dtype"},
    "cross_entropy": {"T", "E", "V", "method", "ms", "TFLOP/s", "% of matmul ceiling", "extra MiB beyond grads"},
}
CPU_TIMED = {"attn_throughput": "reference ms", "patch_embed": "unfold+nn.Linear+add",
             "pixel_loss": "reference (eager)", "cross_entropy": "eager fp32 logits"}


@pytest.mark.skipif(HAS_CUDA, reason="on a GPU the scripts time the kernels (benchmarks/gpu_check.sh runs them)")
@pytest.mark.parametrize("script", SCRIPTS)
def test_benchmark_script_cpu_path(script, tmp_path):
    env = dict(os.environ, AIMKERN_BENCH_OUT=str(tmp_path), TRITON_INTERPRET="1")
    run = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", f"{script}.py")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, f"{script} failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    assert "no CUDA" in run.stdout
    if script not in ROW_KEYS:
        return
    with open(tmp_path / f"{script}_cpu.json") as f:
        report = json.load(f)
    assert set(report) >= {"env", "rows", "skipped"}
    for row in report["rows"]:
        assert ROW_KEYS[script] <= set(row), f"{script}: row lacks {sorted(ROW_KEYS[script] - set(row))}"
    timed = CPU_TIMED[script]
    if timed.endswith(" ms"):  # a wide table: one column per peer
        assert all(row[timed] > 0 for row in report["rows"])
    else:
        ms = [row["ms"] for row in report["rows"] if row.get("peer", row.get("method")) == timed]
        assert ms and all(t > 0 for t in ms), f"{script}: {timed} was not timed on the CPU"
    # aimkern's Triton path is not timed under the interpreter, and says so.
    reasons = {s["peer"]: s["reason"] for s in report["skipped"]}
    assert reasons["aimkern"] == harness.INTERPRETER_NOT_TIMED
    # The chart needs matplotlib (optional: the README's install does not pull it); without it, no PNG.
    assert (tmp_path / f"{script}_cpu.png").exists() == (importlib.util.find_spec("matplotlib") is not None)


# ------------------------------------------------------------------------------------- the harness itself
SPEC = get_spec("next_patch_pixel_loss")
CASES = [dict(batch=2, img=32, patch=16)]
FAST = (1, 3)  # warm-up / repetition ms: the harness's logic, not the numbers, is under test


def problem_of(case: dict, grad: bool) -> Problem:
    b, s, p = case["batch"], case["img"], case["patch"]
    return Problem("next_patch_pixel_loss", "cpu", "float32", ((b, (s // p) ** 2, 3 * p * p), (b, 3, s, s), (b,)),
                   PixelLossParams(patch_size=p), (grad, False, False), ("float32", "float32", "int64"))


def work(case, problem, tensors, pass_):
    return {"bytes": tensors[0].numel() * 4, "flop": 1e6}


def _boom(*args, **kwargs):
    raise RuntimeError("boom: this peer always fails")


def _no_grad_path(pred, images, prefix_len, params):
    """Computes the loss from a detached pred: the backward cannot reach pred, so fwd+bwd must fail."""
    return SPEC.reference(pred.detach(), images, prefix_len, params)


def _failing_check(fn, args, pass_):
    raise AssertionError("the column would not time what it says")


def _results(peers, passes=harness.PASSES):
    results = harness.measure(SPEC, CASES, problem_of, peers, passes=passes, work=work, timing=FAST)
    return {(r.peer, r.pass_): r for r in results}


def test_harness_times_good_peers_and_skips_bad_ones_with_their_reason():
    reference = harness.candidate_peer(SPEC.candidate("reference"), "reference")
    peers = [
        reference,
        harness.Peer("raises", lambda problem: _boom),
        harness.Peer("build raises", lambda problem: _boom()),
        harness.Peer("unsupported", lambda problem: SPEC.reference, lambda p: "needs a kind of GPU this is not"),
        harness.Peer("no gradient", lambda problem: _no_grad_path),
        harness.Peer("check fails", lambda problem: SPEC.reference, check=_failing_check),
        harness.Peer("fwd only", lambda problem: SPEC.reference, passes=("fwd",)),
        harness.candidate_peer(SPEC.candidate("reference"), "restricted").restricted(lambda p: "restricted here"),
    ]
    got = _results(peers)
    for pass_ in harness.PASSES:
        ok = got[("reference", pass_)]
        assert ok.reason is None and ok.ms > 0 and ok.mib is None  # no peak memory on the CPU
        assert ok.gbps == pytest.approx(ok.work["bytes"] / ok.ms / 1e6)
        assert ok.tflops == pytest.approx(1e6 / ok.ms / 1e9)
        assert got[("raises", pass_)].reason == "first call failed: RuntimeError: boom: this peer always fails"
        assert got[("build raises", pass_)].reason.startswith("build failed: RuntimeError: boom")
        assert got[("unsupported", pass_)].reason == "needs a kind of GPU this is not"
        assert got[("check fails", pass_)].reason.startswith("check failed: AssertionError: the column")
    assert got[("no gradient", "fwd")].reason is None  # the forward is fine ...
    assert got[("no gradient", "fwd+bwd")].reason.startswith("first call failed: RuntimeError")  # ... not its backward
    assert got[("fwd only", "fwd")].ms > 0
    assert got[("fwd only", "fwd+bwd")].reason == "timed in fwd only"
    assert got[("restricted", "fwd")].reason == got[("restricted", "fwd+bwd")].reason == "restricted here"
    for r in got.values():  # a time, or a reason: never both, never neither
        assert (r.ms is None) == (r.reason is not None), r


def test_spec_peers_follow_the_bench_dict_and_the_candidates_support_rules():
    attention = get_spec("attention")
    names = [p.name for p in harness.spec_peers(attention)]
    assert names == list(BENCH["attention"]["peers"])
    everything = [p.name for p in harness.spec_peers(attention, all_candidates=True)]
    assert everything[:len(names)] == names and "reference" in everything and "triton-fused" in everything
    # The public op stands for the only Triton path of a spec that has one: not timed twice.
    assert "triton" not in [p.name for p in harness.spec_peers(SPEC, all_candidates=True)]
    qkv = (1, 2, 16, 8)
    cpu = Problem("attention", "cpu", "bfloat16", (qkv, qkv, qkv, None), AttentionParams(is_causal=True),
                  (True, True, True, False), ("bfloat16",) * 3 + (None,))
    peers = {p.name: p for p in harness.spec_peers(attention, all_candidates=True)}
    sdpa_cudnn = peers["SDPA cuDNN"]
    assert sdpa_cudnn.options == {"deterministic": False}
    assert sdpa_cudnn.unsupported(cpu) == "runs on cuda, not cpu"
    assert peers["aimkern"].unsupported(cpu) == harness.INTERPRETER_NOT_TIMED
    assert peers["aimkern split bwd"].unsupported(cpu) == harness.INTERPRETER_NOT_TIMED
    assert peers["sdpa"].unsupported(cpu) is None and peers["reference"].unsupported(cpu) is None
    assert harness.compiled_peer("c", lambda x: x).unsupported(cpu) == harness.COMPILE_CUDA_ONLY


def test_peer_options_reach_the_support_rule_and_the_call():
    seen = []

    def rule(problem):
        return None if problem.option("norm_pix") is False else "only without norm_pix"

    def spy(pred, images, prefix_len, params):
        seen.append(params.norm_pix)
        return SPEC.reference(pred, images, prefix_len, params)

    got = _results([harness.Peer("raw", lambda problem: spy, rule, options={"norm_pix": False}),
                    harness.Peer("default", lambda problem: spy, rule)], passes=("fwd",))
    assert got[("raw", "fwd")].ms > 0 and seen and set(seen) == {False}
    assert got[("default", "fwd")].reason == "only without norm_pix"


def test_report_keeps_its_shape(tmp_path):
    peers = [harness.candidate_peer(SPEC.candidate("reference"), "reference"), harness.Peer("raises", lambda p: _boom)]
    results = harness.measure(SPEC, CASES, problem_of, peers, work=work, timing=FAST)
    rows = [{"peer": r.peer, "mode": r.pass_, "ms": r.ms, **r.case} for r in results]
    chart = harness.bar_chart([(r["peer"], r["mode"], r["ms"]) for r in rows], ylabel="ms", title="t")
    path = harness.write("unit", rows, ["peer", "mode", "ms"], results, chart=chart, device="cpu",
                         out_dir=str(tmp_path))
    assert path == str(tmp_path / "unit_cpu.json")
    with open(path) as f:
        report = json.load(f)
    assert set(report) == {"env", "rows", "skipped"}
    assert {"torch", "triton", "date"} <= set(report["env"])
    assert [(r["peer"], r["mode"]) for r in report["rows"]] == [(p, m) for m in harness.PASSES
                                                                for p in ("reference", "raises")]
    assert [(s["peer"], s["pass"]) for s in report["skipped"]] == [("raises", m) for m in harness.PASSES]
    for s in report["skipped"]:
        assert s["reason"].startswith("first call failed: RuntimeError: boom") and s["batch"] == 2
    pytest.importorskip("matplotlib")
    assert (tmp_path / "unit_cpu.png").stat().st_size > 0


def test_wide_rows_put_each_peer_in_its_columns():
    peers = [harness.candidate_peer(SPEC.candidate("reference"), "reference"), harness.Peer("raises", lambda p: _boom)]
    results = harness.measure(SPEC, CASES, problem_of, peers, work=work, timing=FAST)
    rows = harness.wide_rows(results, lambda row, by_peer: row.update(ratio=by_peer["reference"].ms))
    assert [r["pass"] for r in rows] == list(harness.PASSES)
    for row in rows:
        assert row["reference ms"] > 0 and row["raises ms"] is None and row["ratio"] == row["reference ms"]
        assert {"batch", "img", "patch", "reference extra MiB", "raises extra MiB"} <= set(row)


def test_a_case_whose_inputs_cannot_be_made_is_reported_not_fatal():
    cases = [dict(batch=2, img=32, patch=16), dict(batch=-1, img=32, patch=16)]  # a negative batch: no tensor
    peers = [harness.candidate_peer(SPEC.candidate("reference"), "reference")]
    results = harness.measure(SPEC, cases, problem_of, peers, passes=("fwd",), timing=FAST)
    assert results[0].ms > 0
    assert results[1].ms is None and results[1].reason.startswith("making the inputs failed: RuntimeError")


def test_wall_clock_is_a_median_of_at_least_three_calls():
    from common import wall_ms

    calls = []
    ms = wall_ms(lambda: calls.append(torch.ones(8).sum()), warmup=0, rep=0)
    assert ms >= 0 and len(calls) >= 4  # one warm-up call, three timed
