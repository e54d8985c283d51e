"""Compile-gate problems of the varlen attention launchers, in the shape the op specs hand the gate
(benchmarks/kernel_report.py): subset -> (label, thunk) pairs, each thunk calling the launchers on meta
tensors (recorded with ``observe(dry_run=True)``, never run). For the varlen op's spec once it is wired in.

Checked by hand on sm_90a and sm_80 (all subsets): every launch compiles; the 16-bit ones without spills
and, on sm_90a, on wgmma only (the D = 256 tiled backward aside, as its dense twin); every config fits in
shared memory. kernels/attention_varlen.py records where that took another tile than the dense tables'.
"""
from __future__ import annotations

import torch

from ..ops._launch import LaunchPolicy
from ._launch_varlen import VarlenAttentionParams, launch_backward, launch_forward

MASKS = {"full": (False, False), "causal": (True, False), "prefix": (True, True)}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def run_problem(dtype, d: int, is_causal: bool, prefix: bool, deterministic: bool, *, t: int = 2048, h: int = 4,
                s: int = 4, max_seqlen: int = 1024) -> None:
    """Forward + backward launches of one varlen problem on meta tensors."""
    q, k, v, do = (torch.empty(t, h, d, dtype=dtype, device="meta") for _ in range(4))
    cu = torch.empty(s + 1, dtype=torch.int32, device="meta")
    block = torch.empty(s, dtype=torch.int32, device="meta")
    pre = torch.empty(s, dtype=torch.int32, device="meta") if prefix else None
    params = VarlenAttentionParams(is_causal=is_causal, deterministic=deterministic)
    policy = LaunchPolicy(autotune=False)
    o, lse = launch_forward(q, k, v, cu, max_seqlen, block, pre, params, policy)
    launch_backward(do, q, k, v, o, lse, cu, max_seqlen, block, pre, params, policy)


def gate_problems(subset: str):
    """(label, thunk) pairs: every dtype, D = 64, 80, 128, 256, every mask, ordered and unordered dQ;
    ``subset="gpu-run"``: 16-bit at D = 64 and 128."""
    gpu_run = subset == "gpu-run"
    for dname, dtype in DTYPES.items():
        if gpu_run and dname == "fp32":
            continue
        for d in ((64, 128) if gpu_run else (64, 80, 128, 256)):
            for mname, (causal, prefix) in MASKS.items():
                for det in (True, False):
                    def run(dtype=dtype, d=d, causal=causal, prefix=prefix, det=det):
                        run_problem(dtype, d, causal, prefix, det)

                    yield f"attention_varlen {dname} D={d} {mname} {'ordered' if det else 'unordered'}", run
