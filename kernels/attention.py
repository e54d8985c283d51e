"""Launch configurations of the attention kernels (kernels/attention_fwd.py, kernels/attention_bwd.py).

``forward(...)``, ``backward_fused(...)`` etc. return ``(kernel, meta)``: the kernel to launch and the
constexpr block sizes to pass. On CUDA the kernel is an autotuner over a few configs picked for the call's
family (padded head dim, input dtype, sequence band) and ``meta`` is empty; under Triton's interpreter,
where an autotuner with more than one config cannot run, it is the plain kernel and one fixed config.

Hopper (H100 / H200) choices, not yet timed (no GPU run so far), picked from `ptxas -v` register and spill
counts of sm_90a builds: 16-bit inputs use 64-128-row query tiles (wgmma works on 64-row slabs), 32-128 key
columns, 3 pipeline stages; D = 128 shrinks the tiles to stay in registers; D = 256 and fp32 smaller still.
D = 80 / 96 pad to 128 inside the kernel with masked loads: the D = 128 dot width, but no extra memory
traffic.
"""
from __future__ import annotations

import functools
import os

import torch
import triton

from .attention_bwd import (
    attn_bwd_dkdv_kernel,
    attn_bwd_dq_kernel,
    attn_bwd_fused_kernel,
    attn_bwd_preprocess_kernel,
)
from .attention_fwd import attn_fwd_kernel

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

# Autotuning on CUDA (off: the first config of each family, one compile instead of two; the GPU tests use
# that to fit their time budget, and AIMKERN_ATTN_AUTOTUNE=0 does it from the environment).
AUTOTUNE = os.environ.get("AIMKERN_ATTN_AUTOTUNE", "1") != "0"

# The fused one-program-per-head backward holds K, V (16-bit) and dK, dV (fp32) of a whole head on chip:
# allowed up to this many padded elements of one (N, D) tile (256 x 64 on Hopper). Module-level so a
# benchmark or test can move the switch point (tests force both paths under the interpreter).
FUSED_BWD_MAX_ELEMS = 1 << 14
FUSED_BWD_MAX_ELEMS_FP32 = 1 << 12  # 64 x 64 in fp32: 216 registers, no spill

# Interpreter tiles (one fixed config per call): 16 up to N = 64, so tests at N = 37 cross several tile
# boundaries and all three tile classes; 64 beyond, since the interpreter's cost grows with the tile count.
INTERPRET_SMALL_TILE, INTERPRET_LARGE_TILE, INTERPRET_SMALL_N = 16, 64, 64
PREPROCESS_BLOCK_M = 16 if INTERPRET else 64


def _interpret_tile(n: int) -> int:
    return INTERPRET_SMALL_TILE if n <= INTERPRET_SMALL_N else INTERPRET_LARGE_TILE


def block_d(head_dim: int) -> int:
    """Head dim padded to a power of two (>= 16, the smallest tl.dot width)."""
    return max(16, triton.next_power_of_2(head_dim))


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs: 3xTF32 dots, fp32-level accuracy on the tensor cores (plain tf32 would miss torch's fp32
    error by 100x; "ieee" FMA dots spill tens of KB of registers on sm_90). 16-bit inputs ignore it."""
    return "tf32x3" if dtype == torch.float32 else "tf32"


def _band(n: int) -> str:
    return "short" if n <= 256 else "long"


# Config tables: (BLOCK_M, BLOCK_N, num_warps, num_stages), two per family at most (each is a compile the
# first time a family is met). Every entry was compiled for sm_90a and read with `ptxas -v` (no GPU needed):
# 16-bit entries spill nothing or under 40 bytes. fp32 (3xTF32 dots) at D >= 128 spills whatever the tile;
# it is correct there, not fast. BLOCK_M x BLOCK_N is (query, key) for all three kernels.
_FWD = {
    (64, False, "short"): [(64, 64, 4, 3), (128, 64, 4, 3)],
    (64, False, "long"): [(128, 64, 4, 3), (128, 128, 8, 3)],
    (128, False, "short"): [(64, 64, 4, 3), (128, 64, 8, 3)],
    (128, False, "long"): [(128, 64, 8, 3), (128, 32, 8, 3)],
    (256, False, None): [(64, 16, 4, 2), (32, 32, 4, 2)],
    (64, True, None): [(128, 64, 8, 2), (64, 32, 4, 2)],
    (128, True, None): [(64, 32, 8, 1), (32, 16, 4, 2)],
    (256, True, None): [(64, 32, 8, 1)],
}
_DKDV = {  # BLOCK_N key rows hold the fp32 dK, dV accumulators; BLOCK_M is the streamed query tile
    (64, False, None): [(64, 128, 8, 3), (64, 64, 4, 3)],
    (128, False, None): [(32, 64, 8, 3), (32, 32, 4, 3)],
    (256, False, None): [(32, 32, 8, 2), (16, 32, 4, 2)],
    (64, True, None): [(16, 64, 4, 2), (32, 32, 4, 2)],
    (128, True, None): [(32, 32, 8, 1)],
    (256, True, None): [(32, 32, 8, 1)],
}
_DQ = {
    (64, False, None): [(128, 32, 8, 3), (128, 64, 8, 3)],
    (128, False, None): [(64, 32, 8, 3), (128, 32, 8, 3)],
    (256, False, None): [(32, 32, 8, 2), (32, 16, 4, 2)],
    (64, True, None): [(64, 32, 4, 2), (32, 32, 4, 2)],
    (128, True, None): [(32, 32, 8, 1)],
    (256, True, None): [(32, 32, 8, 1)],
}


def configs(kind: str, bd: int, fp32: bool, band: str) -> list:
    """The autotuning candidates of one family: padded head dim (<= 64, 128, 256), fp32 or 16-bit, band."""
    table = {"fwd": _FWD, "dkdv": _DKDV, "dq": _DQ}[kind]
    width = 64 if bd <= 64 else bd
    entries = table.get((width, fp32, band)) or table[(width, fp32, None)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=st) for m, n, w, st in entries]


_TUNE_KEY = ["N_BUCKET", "HEAD_D", "IS_CAUSAL", "HAS_PREFIX"]  # + input dtypes (added by Triton)


@functools.lru_cache(maxsize=None)
def _tuned(kind: str, bd: int, fp32: bool, band: str):
    kernel = {"fwd": attn_fwd_kernel, "dkdv": attn_bwd_dkdv_kernel, "dq": attn_bwd_dq_kernel}[kind]
    return triton.autotune(configs=configs(kind, bd, fp32, band), key=_TUNE_KEY)(kernel)


def _select(kind: str, head_dim: int, dtype: torch.dtype, n: int):
    if INTERPRET:
        tile = _interpret_tile(n)
        kernel = {"fwd": attn_fwd_kernel, "dkdv": attn_bwd_dkdv_kernel, "dq": attn_bwd_dq_kernel}[kind]
        return kernel, dict(BLOCK_M=tile, BLOCK_N=tile)
    bd, fp32, band = block_d(head_dim), dtype == torch.float32, _band(n)
    if not AUTOTUNE:
        first = configs(kind, bd, fp32, band)[0]
        kernel = {"fwd": attn_fwd_kernel, "dkdv": attn_bwd_dkdv_kernel, "dq": attn_bwd_dq_kernel}[kind]
        return kernel, dict(first.kwargs, num_warps=first.num_warps, num_stages=first.num_stages)
    return _tuned(kind, bd, fp32, band), {}


def forward(head_dim: int, dtype: torch.dtype, n: int):
    """(kernel, meta) for attn_fwd_kernel; grid (cdiv(N, BLOCK_M), B * H)."""
    return _select("fwd", head_dim, dtype, n)


def backward_dkdv(head_dim: int, dtype: torch.dtype, n: int):
    """(kernel, meta) for attn_bwd_dkdv_kernel; grid (cdiv(N, BLOCK_N), B * H)."""
    return _select("dkdv", head_dim, dtype, n)


def backward_dq(head_dim: int, dtype: torch.dtype, n: int):
    """(kernel, meta) for attn_bwd_dq_kernel; grid (cdiv(N, BLOCK_M), B * H)."""
    return _select("dq", head_dim, dtype, n)


def backward_preprocess():
    """(kernel, meta) for attn_bwd_preprocess_kernel; grid (cdiv(N, BLOCK_M), B * H)."""
    return attn_bwd_preprocess_kernel, dict(BLOCK_M=PREPROCESS_BLOCK_M, num_warps=4)


def use_fused_backward(head_dim: int, dtype: torch.dtype, n: int) -> bool:
    """Whether the one-program-per-head backward applies: the padded (N, D) tile of a head fits on chip."""
    limit = FUSED_BWD_MAX_ELEMS_FP32 if dtype == torch.float32 else FUSED_BWD_MAX_ELEMS
    return max(16, triton.next_power_of_2(n)) * block_d(head_dim) <= limit


def backward_fused(head_dim: int, dtype: torch.dtype, n: int):
    """(kernel, meta) for attn_bwd_fused_kernel; grid (B * H,). BLOCK_KV covers all N keys at once."""
    block_kv = max(16, triton.next_power_of_2(n))
    if INTERPRET:
        return attn_bwd_fused_kernel, dict(BLOCK_M=_interpret_tile(n), BLOCK_KV=block_kv)
    # dK, dV (BLOCK_KV, BLOCK_D) fp32 are wgmma accumulators, so they must fit in registers: 256 x 64 needs
    # 16 warps (ptxas, sm_90a: 128 registers, ~100 bytes spilled); 128 x 64 fits 8 warps with no spill.
    # 16 query rows per step keep the (BLOCK_M, BLOCK_KV) score tiles small beside them.
    elems = block_kv * block_d(head_dim) * (2 if dtype == torch.float32 else 1)
    warps = 16 if elems > 1 << 13 else 8
    block_m = 32 if elems <= 1 << 11 else 16
    return attn_bwd_fused_kernel, dict(BLOCK_M=block_m, BLOCK_KV=block_kv, num_warps=warps, num_stages=1)
