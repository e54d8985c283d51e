"""Launch configurations of the attention kernels (kernels/attention_fwd.py, kernels/attention_bwd.py).

``forward(...)``, ``backward_fused(...)`` etc. return ``(kernel, meta)``: the kernel to launch and the
constexpr block sizes to pass. On CUDA the kernel is an autotuner over a few configs picked for the call's
family (padded head dim, input dtype, sequence band) and ``meta`` is empty; under Triton's interpreter,
where an autotuner with more than one config cannot run, it is the plain kernel and one fixed config.

Hopper (H100 / H200) choices, unmeasured until a GPU run tunes them: 16-bit inputs use 128-row query tiles
(one warpgroup MMA per 64 rows), 64-128 key columns, 3 pipeline stages; D = 128 halves the key tile to stay
in registers; D = 256 and fp32 (true fp32 dots, "ieee") use smaller tiles. D = 80 pads to 128 inside the
kernel with masked loads, so it pays the D = 128 dot width but no extra memory traffic.
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

# The fused one-program-per-head backward holds K, V (16-bit) and dK, dV (fp32) of a whole head on chip:
# allowed up to this many padded elements of one (N, D) tile (256 x 64 on Hopper). Module-level so a
# benchmark or test can move the switch point (tests force both paths under the interpreter).
FUSED_BWD_MAX_ELEMS = 1 << 14
FUSED_BWD_MAX_ELEMS_FP32 = 1 << 13

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
    """fp32 inputs get true fp32 dots (matching torch's fp32 attention), not tf32."""
    return "ieee" if dtype == torch.float32 else "tf32"


def _band(n: int) -> str:
    return "short" if n <= 256 else "long"


def _cfg(bm: int, bn: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)


# Two configs per family at most: each is a compile (seconds) the first time a family is met.
def _fwd_configs(bd: int, fp32: bool, band: str) -> list:
    if fp32:
        return [_cfg(64, 32, 4, 2), _cfg(32, 32, 4, 2)]
    if bd <= 64:
        if band == "short":
            return [_cfg(64, 64, 4, 3), _cfg(128, 64, 4, 3)]
        return [_cfg(128, 64, 4, 3), _cfg(128, 128, 8, 3)]
    if bd <= 128:
        if band == "short":
            return [_cfg(64, 64, 4, 3), _cfg(128, 64, 8, 3)]
        return [_cfg(128, 64, 8, 3), _cfg(128, 128, 8, 2)]
    return [_cfg(64, 32, 4, 2), _cfg(64, 64, 8, 2)]


def _dkdv_configs(bd: int, fp32: bool, band: str) -> list:
    # BLOCK_N key rows are the program's accumulators; BLOCK_M is the streamed query tile.
    if fp32:
        return [_cfg(32, 32, 4, 2), _cfg(16, 64, 4, 2)]
    if bd <= 64:
        return [_cfg(32, 128, 4, 3), _cfg(64, 128, 8, 3)]
    if bd <= 128:
        return [_cfg(32, 128, 8, 3), _cfg(32, 64, 4, 3)]
    return [_cfg(16, 64, 4, 2), _cfg(32, 32, 4, 2)]


def _dq_configs(bd: int, fp32: bool, band: str) -> list:
    if fp32:
        return [_cfg(32, 32, 4, 2), _cfg(64, 16, 4, 2)]
    if bd <= 64:
        return [_cfg(128, 32, 4, 3), _cfg(128, 64, 8, 3)]
    if bd <= 128:
        return [_cfg(128, 32, 8, 3), _cfg(64, 64, 4, 3)]
    return [_cfg(64, 16, 4, 2), _cfg(32, 32, 4, 2)]


_TUNE_KEY = ["N_BUCKET", "HEAD_D", "IS_CAUSAL", "HAS_PREFIX"]  # + input dtypes (added by Triton)


@functools.lru_cache(maxsize=None)
def _tuned(kind: str, bd: int, fp32: bool, band: str):
    kernel, configs = {
        "fwd": (attn_fwd_kernel, _fwd_configs),
        "dkdv": (attn_bwd_dkdv_kernel, _dkdv_configs),
        "dq": (attn_bwd_dq_kernel, _dq_configs),
    }[kind]
    return triton.autotune(configs=configs(bd, fp32, band), key=_TUNE_KEY)(kernel)


def _select(kind: str, head_dim: int, dtype: torch.dtype, n: int):
    if INTERPRET:
        tile = _interpret_tile(n)
        kernel = {"fwd": attn_fwd_kernel, "dkdv": attn_bwd_dkdv_kernel, "dq": attn_bwd_dq_kernel}[kind]
        return kernel, dict(BLOCK_M=tile, BLOCK_N=tile)
    return _tuned(kind, block_d(head_dim), dtype == torch.float32, _band(n)), {}


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
    # 16 query rows per step keep the (BLOCK_M, N) score tiles small next to the resident K, V, dK, dV.
    block_m = 32 if block_kv * block_d(head_dim) <= 1 << 13 else 16
    return attn_bwd_fused_kernel, dict(BLOCK_M=block_m, BLOCK_KV=block_kv, num_warps=8, num_stages=2)
