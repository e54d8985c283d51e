"""Budgets for the work the kernels issue, as multiples of each op's exact minimum (benchmarks/kernel_cost.py).

They are set at what 64-row wgmma tiles allow (a causal diagonal wastes about half of each diagonal tile),
and ``kernel_cost.py --check`` (run by CI) fails when a kernel issues more. A budget that cannot be met is
never loosened here silently: an exception goes into ``EXCEPTIONS`` with the measured ceiling and the
reason, and the same reason is written in benchmarks/RESULTS.md.
"""
from __future__ import annotations

SHORT_N = 256  # N <= this: the ViT band (196, 256 tokens); N >= 1024: long sequences

# (what, rule) pairs; each rule maps a report row to (value, limit) or None when it does not apply.
BUDGETS = {
    "attention forward, full attention, every N": (
        lambda r: (r["fwd_x"], 1.15) if r["op"] == "attention" and r["mask"] == "full" else None),
    "attention forward, causal / block-causal / prefix, N <= 256": (
        lambda r: (r["fwd_x"], 1.30) if r["op"] == "attention" and r["mask"] != "full" and r["n"] <= SHORT_N
        else None),
    "attention forward, causal / block-causal / prefix, N >= 1024": (
        lambda r: (r["fwd_x"], 1.15) if r["op"] == "attention" and r["mask"] != "full" and r["n"] > SHORT_N
        else None),
    # The default (deterministic) backward: the fused one-program-per-head kernel where a head fits on
    # chip, the tiled 5-dot backward elsewhere.
    "attention backward (default path), N <= 256": (
        lambda r: (r["bwd_x"], 1.30) if r["op"] == "attention" and r["n"] <= SHORT_N and r["path"] == "fused"
        else None),
    "attention backward (default path), N >= 1024": (
        lambda r: (r["bwd_x"], 1.15) if r["op"] == "attention" and r["n"] > SHORT_N and r["path"] == "split"
        else None),
    "attention backward, non-deterministic variant, N >= 1024": (
        lambda r: (r["bwd_x"], 1.15) if r["op"] == "attention" and r["n"] > SHORT_N and r["path"] == "split nondet"
        else None),
    "short-N fused backward, global-memory bytes requested": (
        lambda r: (r["bwd_bytes_x"], 1.50) if r["op"] == "attention" and r["path"] == "fused" else None),
    "linear + CE forward + backward, GEMM-equivalents": (
        lambda r: (r["gemm_equiv"], 3.05) if r["op"] == "linear_cross_entropy" and r["path"] == "fwd+bwd"
        else None),
    "linear + CE without grad, GEMM-equivalents": (
        lambda r: (r["gemm_equiv"], 1.05) if r["op"] == "linear_cross_entropy" and r["path"] == "no grad"
        else None),
}

# (budget name, shape, mask) -> (measured ceiling allowed instead, reason). Each entry is also explained in
# benchmarks/RESULTS.md; remove an entry as soon as the kernels meet the budget.
EXCEPTIONS: dict = {}


def check_row(row: dict) -> list:
    """Messages for every budget ``row`` exceeds (empty when it meets them all)."""
    out = []
    for name, rule in BUDGETS.items():
        got = rule(row)
        if got is None:
            continue
        value, limit = got
        exc = EXCEPTIONS.get((name, row.get("shape"), row.get("mask")))
        if exc is not None:
            limit = exc[0]
        if value > limit + 1e-9:
            where = f"{row['op']} {row.get('shape', '')} {row.get('mask', '')} {row.get('path', '')}".strip()
            out.append(f"{name}: {where}: {value:.3f}x > {limit:.2f}x")
    return out
