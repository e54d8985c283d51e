"""The cost counter (aimkern.ops._counting) counts what the kernels really issue, and the budgets catch waste.

benchmarks/kernel_cost.py builds on these pieces; CI runs it with --check (tests/test_gates.py).
"""
import os
import sys

import pytest
import torch
import triton
import triton.language as tl

import aimkern
from aimkern.ops import launch_policy
from aimkern.ops._counting import count_work
from aimkern.ops._launch import gpu_configs, interpreting

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
from cost_budgets import check_row  # noqa: E402

pytestmark = pytest.mark.skipif(not interpreting(), reason="the counter patches Triton's interpreter (CPU runs)")


def _attention_work(n, d, backward=True, **opts):
    q, k, v = (torch.randn(1, 1, n, d, dtype=torch.float16).requires_grad_(backward) for _ in range(3))
    with gpu_configs(), launch_policy(autotune=False, attention_backward=opts.pop("path", "auto")), \
            count_work() as work:
        o = aimkern.attention(q, k, v, backend="triton", **opts)
        if backward:
            o.backward(torch.randn_like(o))
    return work


def test_full_attention_forward_counts_exactly_the_minimum():
    # N = 128 is a whole number of the sm_90a 64 x 64 tiles: the forward's two dots issue 2 N^2 D exactly.
    work = _attention_work(128, 64)
    fwd = work.of("attn_fwd_kernel")
    assert fwd.macs == 2 * 128 * 128 * 64
    assert fwd.dots == 2 * 2 * 2  # 2 query tiles x 2 key tiles x (QK^T, PV)
    # q, k, v read once per (query tile, key tile) they meet, o and lse written once
    assert fwd.store_bytes == 128 * 64 * 2 + 128 * 4


def test_a_wasteful_variant_shows_its_extra_work(monkeypatch):
    """No tile skipping (every key tile treated as a boundary tile): the counts and the budget both see it."""
    from aimkern.kernels import attention_fwd

    base = _attention_work(256, 64, backward=False, is_causal=True).of("attn_fwd_kernel").macs

    @triton.jit
    def no_skipping(m0, m_end, n, prefix, block_size, BLOCK_M: tl.constexpr, IS_CAUSAL: tl.constexpr):
        return n * 0, n  # "no key is seen by all, every key by some": visit and mask every tile

    monkeypatch.setitem(attention_fwd.attn_fwd_kernel.fn.__globals__, "key_bounds_rows", no_skipping)
    # Forward only: the backward's key_bounds shares the patched helper, and its dQ ordering needs true bounds.
    wasteful = _attention_work(256, 64, backward=False, is_causal=True).of("attn_fwd_kernel").macs
    visible = 256 * 257 // 2
    assert base / (2 * visible * 64) < 1.30 < wasteful / (2 * visible * 64)
    assert wasteful == 2 * 256 * 256 * 64
    row = dict(op="attention", mask="causal", n=256, path="fused", default=True, shape="test",
               fwd_x=wasteful / (2 * visible * 64), bwd_x=1.0, bwd_bytes_x=1.0)
    assert any("forward" in msg for msg in check_row(row))


def test_backward_paths_issue_five_dots_a_tile_and_skip_invisible_tiles():
    full = _attention_work(128, 64, path="split").of("attn_bwd_tiled_kernel", "attn_bwd_preprocess_kernel")
    assert full.macs == 5 * 128 * 128 * 64  # no dQ pass recomputing S and dP
    causal = _attention_work(128, 64, path="split", is_causal=True).of("attn_bwd_tiled_kernel")
    assert causal.macs == 5 * 64 * 64 * 64 * 3  # 3 of the 4 (64 x 64) blocks are visible
    fused = _attention_work(128, 64, path="fused", is_causal=True).of("attn_bwd_fused_kernel")
    # 16-row query tiles x 64-row key tiles: 8 query tiles see tile 0, the last 4 also tile 1
    assert fused.macs == 5 * 16 * 64 * 64 * (8 + 4)


def test_nondeterministic_variant_issues_the_same_work():
    det = _attention_work(200, 64, path="split", is_causal=True)
    nondet = _attention_work(200, 64, path="split", is_causal=True, deterministic=False)
    assert det.of("attn_bwd_tiled_kernel").macs == nondet.of("attn_bwd_tiled_kernel").macs


@pytest.mark.parametrize("grad", [False, True])
def test_cross_entropy_gemm_equivalents(grad):
    t, e, v = 256, 128, 512  # whole numbers of the sm_90a tiles (a 64-wide E would pad the GEMMs to 128)
    x = torch.randn(t, e, dtype=torch.float16, requires_grad=grad)
    w = (torch.randn(v, e) * 0.1).half().requires_grad_(grad)
    tgt = torch.randint(0, v, (t,))
    with gpu_configs(), launch_policy(autotune=False), count_work() as work:
        loss = aimkern.linear_cross_entropy(x, w, tgt, backend="triton")
        if grad:
            loss.backward()
    assert work.macs == (3 if grad else 1) * t * e * v


def test_the_counter_leaves_the_interpreter_as_it_was():
    from triton.runtime import interpreter

    before = interpreter.InterpreterBuilder.create_dot, interpreter.GridExecutor.__call__
    with count_work():
        assert interpreter.InterpreterBuilder.create_dot is not before[0]
    assert (interpreter.InterpreterBuilder.create_dot, interpreter.GridExecutor.__call__) == before


def test_budget_exceptions_still_fail_on_growth():
    from cost_budgets import EXCEPTIONS

    # the first dense attention exception (the varlen rows have a row shape of their own)
    (name, shape, mask), (allowed, _reason) = next((k, v) for k, v in EXCEPTIONS.items() if k[0].startswith("attention"))
    key = "fwd_x" if "forward" in name else ("bwd_bytes_x" if "bytes" in name else "bwd_x")
    row = dict(op="attention", mask=mask, n=196, path="split", default=True, shape=shape,
               fwd_x=1.0, bwd_x=1.0, bwd_bytes_x=1.0)
    assert not check_row({**row, key: allowed})
    assert check_row({**row, key: allowed + 0.05})


# ------------------------------------------------------------------ the report: phases and every config
def _cost_report(monkeypatch, masks=("causal",)):
    """benchmarks/kernel_cost.py with the masks given and the split backward only (one row per mask)."""
    import kernel_cost

    monkeypatch.setattr(kernel_cost, "MASKS", masks)
    monkeypatch.setattr(kernel_cost, "backward_paths",
                        lambda n, d: [("split", dict(attention_backward="split"), {}, True)])
    return kernel_cost


def test_the_report_counts_each_kernel_in_the_phase_that_runs_it(monkeypatch):
    """N = 196: the last 4 queries run in attn_fwd_tail_kernel, a forward kernel the report once filed under
    the backward (every kernel not named attn_fwd_kernel), passing a forward budget it broke."""
    report = _cost_report(monkeypatch)
    (row,) = report.attention_rows([(1, 196, 64)])
    q, k, v = (torch.randn(1, 1, 196, 64, dtype=torch.float16).requires_grad_() for _ in range(3))
    with gpu_configs(), launch_policy(autotune=False, attention_backward="split"):
        with count_work() as fwd:
            o = aimkern.attention(q, k, v, backend="triton", is_causal=True)
        with count_work() as bwd:
            o.backward(torch.randn_like(o))
    assert set(fwd.kernels) == {"attn_fwd_kernel", "attn_fwd_tail_kernel"}
    assert row["fwd_macs"] == fwd.macs * row["heads"] and row["bwd_macs"] == bwd.macs * row["heads"]
    assert row["fwd_bytes"] == fwd.bytes * row["heads"] and row["bwd_bytes"] == bwd.bytes * row["heads"]


def test_the_report_holds_the_budget_for_every_config_of_a_table(monkeypatch):
    """A table's second config is what the autotuner may pick: the report counts it. With the 128 x 64
    forward tile back in the short table, causal N = 256 issues 1.49x (its diagonal block is 128 x 128)."""
    from aimkern.kernels import attention as kern

    monkeypatch.setitem(kern.FWD_TABLE, (64, False, "short"), [(64, 64, 4, 3), (128, 64, 8, 3)])
    kern._choice.cache_clear()
    try:
        report = _cost_report(monkeypatch)
        (row,) = report.attention_rows([(1, 256, 64)])
    finally:
        monkeypatch.undo()
        kern._choice.cache_clear()
    visible = 256 * 257 // 2
    assert row["fwd_x"] == pytest.approx((2 * 128 * 64 + 4 * 128 * 64) / visible)  # 2 + 4 tiles of 128 x 64
    assert any("forward" in msg for msg in check_row(row))


def test_configs_that_pad_more_rows_are_pruned_by_n():
    """The configs a table hands the autotuner at N: none that pads the launch's rows more than another."""
    from aimkern.kernels import attention as kern

    blocks = lambda choice, key: [c.kwargs[key] for c in choice.configs]  # noqa: E731
    assert blocks(kern.forward(64, False, 196), "BLOCK_M") == [64]
    assert blocks(kern.forward(64, True, 196), "BLOCK_M") == [64]  # fp32: 128 rows would cover 192..255
    assert blocks(kern.forward(64, True, 256), "BLOCK_M") == [128, 64]  # both tile 256 exactly
    assert blocks(kern.backward_tiled(64, False, 320), "BLOCK_N") == [64]  # 128-key tiles: 384 for 320 keys
    assert blocks(kern.backward_tiled(64, False, 1024), "BLOCK_N") == [128, 64]


def test_gpu_configs_picks_each_config_and_repeats_the_last():
    from aimkern.kernels.launch_table import Choice, cfg
    from aimkern.ops import LaunchPolicy
    from aimkern.ops._launch import fixed_config

    a, b = cfg(4, 1, BLOCK=16), cfg(4, 1, BLOCK=32)
    choice = Choice(attention_kernel(), (a, b), cfg(4, 1, BLOCK=8))
    policy = LaunchPolicy(autotune=False)
    assert fixed_config(choice, policy) is choice.interpreter
    picks = []
    for i in range(3):
        with gpu_configs(i):
            picks.append(fixed_config(choice, policy))
    assert picks == [a, b, b]
    with pytest.raises(ValueError, match="index"):
        with gpu_configs(-1):
            pass


def attention_kernel():
    from aimkern.kernels.attention_fwd import attn_fwd_kernel

    return attn_fwd_kernel
