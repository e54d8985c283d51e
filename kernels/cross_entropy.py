"""Triton kernels of `aimkern.linear_cross_entropy`: linear head + cross-entropy without the (T, V) logits.

Shapes: x (T, E) hidden states, W (V, E) head weight, bias (V,), target (T,) int64. Logits are
``x @ W^T + bias``, computed tile by tile in fp32 (tensor cores, fp32 accumulation) and never stored whole.

Kernels:
  * ``ce_fwd_kernel``: programs over (token tile, vocabulary split); each loops over the vocab tiles of its
    split with an online logsumexp and writes per-token partial statistics (fp32): logsumexp, target
    logit, and the sum of logits (label smoothing). The launcher combines the splits (a logsumexp over a
    handful of values per token) and reduces the loss in a fixed order: deterministic. Splitting the
    vocabulary keeps the card full when there are few tokens (8k tokens = 64 token tiles < 132 SMs).
    With STORE_LOGITS it also stores the logits (bias included, in the input dtype) into a token-chunk
    buffer (Tc, V), for ``ce_dlogits_inplace_kernel``.
  * ``ce_dlogits_inplace_kernel``: turns those stored logits into dlogits in place, elementwise:
        dlogits = g_t * (softmax * (1 + 2 z lse) - (1 - eps) * onehot - eps / V)      (0 for ignored t)
  * ``ce_dlogits_kernel``: the same dlogits without stored logits: it recomputes one (token tile, vocab
    tile) block of logits and writes the block into the chunk buffer, in the input dtype.
  * ``matmul_kernel``: C (+)= A @ B with fp32 accumulation and strided operands; it gives
        d(input)[chunk] = dlogits @ W               and          dW32 += dlogits^T @ x[chunk]
    and, for the second, d(bias)32 += column sums of dlogits (the row sums of its A operand).
  * ``ce_dlogits_inplace_kernel`` (stored logits -> dlogits in place) and ``ce_scale_kernel`` (the
    incoming gradient times the reduction's factor, in fp32) serve the forward-with-gradient path.

Every token-indexed input (target, lse, per-token gradient) is read through its stride: a target is often
a column of a label table, and the gradient of ``.sum()`` is a stride-0 view.

Two plans (aimkern/ops/cross_entropy.py), each computing gradients chunk by chunk over the tokens:
  * the loss's gradient known in the forward (reduction "mean" or "sum", grad on): per chunk,
    ce_fwd_kernel (STORE_LOGITS), ce_dlogits_inplace_kernel, then the two matmuls: the logits GEMM runs
    once, 3 GEMM-equivalents in all;
  * otherwise ce_fwd_kernel over all tokens (1 GEMM: all that a call without grad runs). With reduction
    "none", whose per-token upstream gradient arrives only in the backward, the backward then recomputes the
    logits per chunk in ce_dlogits_kernel and runs the two matmuls: 4 GEMM-equivalents with the forward.

Why the gradient materializes dlogits for a chunk of tokens (default budget 64 MiB, e.g. 4096 tokens at
V = 8192 in bf16) rather than fusing everything into one kernel: each (token tile, vocab tile) block of
dlogits feeds two outputs that are E wide (dx rows and dW rows), and E = 768..1536 is far too wide for
register accumulators (a 128 x 768 fp32 tile is 384 registers a thread at 8 warps). The fused
alternatives pay more: atomics into dx and dW (non-deterministic, ~2 x (BT + BV) x E x 4 bytes of atomic
traffic per block), read-modify-write of fp32 dx rows per vocab tile (tens of GB of L2 traffic at 65k
tokens), or programs that own E slices of dW and recompute the logits once per slice (E / slice extra
GEMMs). The chunked form costs at most one recompute GEMM (none in the first plan), every GEMM is large and
well shaped, there are no atomics, and dW / d(bias) accumulate across chunks in fp32 buffers in a fixed
order: deterministic and fp32-accurate. Extra memory: the chunk buffer plus fp32 dW (when W is 16-bit),
independent of T.

Launch configs live here too, as Choices (kernels/launch_table.py): small autotuned Hopper sets for big
16-bit problems, one fixed config otherwise, one interpreter config per shape.
"""
from __future__ import annotations

import functools

import triton
import triton.language as tl

from .constants import LOG2E
from .launch_table import Choice, cfg, tunable

# The forward splits the vocabulary into slices that are multiples of this (the largest BLOCK_V), so every
# autotuned BLOCK_V tiles a slice exactly and no program gets an empty slice.
VOCAB_SPLIT_QUANTUM = 256
# Bytes of the backward's dlogits chunk buffer on CUDA (the memory-vs-launch-count trade-off).
BWD_CHUNK_BYTES = 64 << 20


@triton.jit
def _logits_tile(
    x_ptr, w_ptr, offs_t, t_ok, offs_v, v_ok, E,
    s_xt, s_xe, s_wv, s_we,
    DOT_PRECISION: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """fp32 (BLOCK_T, BLOCK_V) block of x @ W^T (no bias); rows/cols outside the masks hold 0."""
    offs_e = tl.arange(0, BLOCK_E)
    # int64 row offsets: T * E can pass 2**31 at large batches.
    x_ptrs = x_ptr + offs_t.to(tl.int64)[:, None] * s_xt + offs_e[None, :] * s_xe
    w_ptrs = w_ptr + offs_v.to(tl.int64)[None, :] * s_wv + offs_e[:, None] * s_we
    acc = tl.zeros((BLOCK_T, BLOCK_V), dtype=tl.float32)
    for e0 in range(0, E, BLOCK_E):
        e_ok = (e0 + offs_e) < E
        xt = tl.load(x_ptrs, mask=t_ok[:, None] & e_ok[None, :], other=0.0)
        wt = tl.load(w_ptrs, mask=e_ok[:, None] & v_ok[None, :], other=0.0)
        acc = tl.dot(xt, wt, acc, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_E * s_xe
        w_ptrs += BLOCK_E * s_we
    return acc


@triton.jit
def ce_fwd_kernel(
    x_ptr, w_ptr, b_ptr, tgt_ptr, lse_ptr, tgt_logit_ptr, sum_ptr, logits_ptr,
    T, V, E, VS,
    s_xt, s_xe, s_wv, s_we, s_b, s_lt, s_tgt,
    HAS_BIAS: tl.constexpr, NEED_SUM: tl.constexpr, STORE_LOGITS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """Per (token tile, vocab slice [s * VS, (s + 1) * VS)): partial lse, target logit, logit sum -> (S, T) fp32.

    STORE_LOGITS: also write the logits (bias included) into logits (T, V) rows of stride s_lt, in its dtype:
    the forward-with-gradient path turns them into dlogits in place, so the logits GEMM runs once.
    """
    pid_t = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = offs_t < T
    tgt = tl.load(tgt_ptr + offs_t.to(tl.int64) * s_tgt, mask=t_ok, other=-1)  # any stride: a label column
    v_start = pid_s * VS
    v_end = tl.minimum(V, v_start + VS)

    m = tl.full((BLOCK_T,), float("-inf"), dtype=tl.float32)  # running max
    s = tl.zeros((BLOCK_T,), dtype=tl.float32)  # running sum of exp(logit - m)
    tgt_logit = tl.zeros((BLOCK_T,), dtype=tl.float32)
    logit_sum = tl.zeros((BLOCK_T,), dtype=tl.float32)
    for v0 in range(v_start, v_end, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        v_ok = offs_v < v_end
        logits = _logits_tile(x_ptr, w_ptr, offs_t, t_ok, offs_v, v_ok, E, s_xt, s_xe, s_wv, s_we,
                              DOT_PRECISION, BLOCK_T, BLOCK_V, BLOCK_E)
        if HAS_BIAS:
            logits += tl.load(b_ptr + offs_v * s_b, mask=v_ok, other=0.0).to(tl.float32)[None, :]
        if STORE_LOGITS:
            # The statistics then come from the stored (rounded) logits, as F.linear's output would give
            # them: the in-place dlogits then sum to zero over the vocabulary, like torch's.
            rounded = logits.to(logits_ptr.dtype.element_ty)
            l_ptrs = logits_ptr + offs_t.to(tl.int64)[:, None] * s_lt + offs_v[None, :]
            tl.store(l_ptrs, rounded, mask=t_ok[:, None] & v_ok[None, :])
            logits = rounded.to(tl.float32)
        logits = tl.where(v_ok[None, :], logits, float("-inf"))
        # Every tile holds at least one valid column (v0 < v_end), so m_new is finite.
        m_new = tl.maximum(m, tl.max(logits, axis=1))
        s = s * tl.exp2((m - m_new) * LOG2E) + tl.sum(tl.exp2((logits - m_new[:, None]) * LOG2E), axis=1)
        m = m_new
        # The v_ok term matters: a target in the next slice must not match a masked column here.
        hit = (offs_v[None, :] == tgt[:, None]) & v_ok[None, :]
        tgt_logit += tl.sum(tl.where(hit, logits, 0.0), axis=1)
        if NEED_SUM:
            logit_sum += tl.sum(tl.where(v_ok[None, :], logits, 0.0), axis=1)

    out = pid_s * T + offs_t
    tl.store(lse_ptr + out, m + tl.log(s), mask=t_ok)
    tl.store(tgt_logit_ptr + out, tgt_logit, mask=t_ok)
    if NEED_SUM:
        tl.store(sum_ptr + out, logit_sum, mask=t_ok)


@triton.jit
def ce_dlogits_kernel(
    x_ptr, w_ptr, b_ptr, tgt_ptr, lse_ptr, g_ptr, d_ptr,
    T, V, E, ignore_index, smooth_per_class, target_weight, two_z,
    s_xt, s_xe, s_wv, s_we, s_b, s_g, s_dt, s_tgt, s_lse,
    HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """d[t, v] = g_t * (p_tv * (1 + two_z * lse_t) - target_weight * [v == tgt_t] - smooth_per_class), 0 if ignored.

    T is the chunk's token count (the launcher offsets every token-indexed pointer to the chunk start).
    """
    pid_t = tl.program_id(0)
    pid_v = tl.program_id(1)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    t_ok = offs_t < T
    v_ok = offs_v < V
    logits = _logits_tile(x_ptr, w_ptr, offs_t, t_ok, offs_v, v_ok, E, s_xt, s_xe, s_wv, s_we,
                          DOT_PRECISION, BLOCK_T, BLOCK_V, BLOCK_E)
    if HAS_BIAS:
        logits += tl.load(b_ptr + offs_v * s_b, mask=v_ok, other=0.0).to(tl.float32)[None, :]
    tgt = tl.load(tgt_ptr + offs_t.to(tl.int64) * s_tgt, mask=t_ok, other=ignore_index)
    lse = tl.load(lse_ptr + offs_t.to(tl.int64) * s_lse, mask=t_ok, other=0.0)
    g = tl.load(g_ptr + offs_t.to(tl.int64) * s_g, mask=t_ok, other=0.0).to(tl.float32)
    # where, not a product: the "mean" of an all-ignored batch sends g = inf, and inf * 0 would be NaN.
    g = tl.where(t_ok & (tgt != ignore_index), g, 0.0)
    p = tl.exp2((logits - lse[:, None]) * LOG2E)
    d = p * (1.0 + two_z * lse)[:, None] - smooth_per_class
    d = d - tl.where(offs_v[None, :] == tgt[:, None], target_weight, 0.0)
    d = d * g[:, None]
    d_ptrs = d_ptr + offs_t.to(tl.int64)[:, None] * s_dt + offs_v[None, :]
    tl.store(d_ptrs, d.to(d_ptr.dtype.element_ty), mask=t_ok[:, None] & v_ok[None, :])


@triton.jit
def ce_dlogits_inplace_kernel(
    d_ptr, tgt_ptr, lse_ptr, g_ptr,
    T, V, ignore_index, smooth_per_class, target_weight, two_z, s_g, s_dt, s_tgt,
    BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """Stored logits -> dlogits, in place: the formula of ce_dlogits_kernel without the recompute GEMM.

    d (T, V) holds the logits (bias included) in the input dtype, as F.linear would return them.
    """
    pid_t = tl.program_id(0)
    pid_v = tl.program_id(1)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    t_ok = offs_t < T
    ok = t_ok[:, None] & (offs_v < V)[None, :]
    d_ptrs = d_ptr + offs_t.to(tl.int64)[:, None] * s_dt + offs_v[None, :]
    logits = tl.load(d_ptrs, mask=ok, other=0.0).to(tl.float32)
    tgt = tl.load(tgt_ptr + offs_t.to(tl.int64) * s_tgt, mask=t_ok, other=ignore_index)
    lse = tl.load(lse_ptr + offs_t, mask=t_ok, other=0.0)  # the launcher's own contiguous (T,) buffer
    g = tl.load(g_ptr + offs_t.to(tl.int64) * s_g, mask=t_ok, other=0.0).to(tl.float32)
    g = tl.where(t_ok & (tgt != ignore_index), g, 0.0)  # where, not a product: g may be inf (see above)
    p = tl.exp2((logits - lse[:, None]) * LOG2E)
    d = p * (1.0 + two_z * lse)[:, None] - smooth_per_class
    d = d - tl.where(offs_v[None, :] == tgt[:, None], target_weight, 0.0)
    d = d * g[:, None]
    tl.store(d_ptrs, d.to(d_ptr.dtype.element_ty), mask=ok)


@triton.jit
def ce_scale_kernel(src_ptr, dst_ptr, g_ptr, s_ptr, N, BLOCK: tl.constexpr):
    """dst = src * (g * s) in fp32, cast once on store; src and dst contiguous, N elements.

    The forward-with-gradient path's gradients are computed for an upstream gradient of 1 per token; the
    autograd backward applies the incoming gradient g (a 0-d tensor: GradScaler's first 65536 is past
    fp16's range) and the reduction's factor s (1 / count for "mean") here, in fp32, in one pass.
    """
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    f = tl.load(g_ptr).to(tl.float32) * tl.load(s_ptr).to(tl.float32)
    v = tl.load(src_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(dst_ptr + offs, (v * f).to(dst_ptr.dtype.element_ty), mask=ok)


@triton.jit
def matmul_kernel(
    a_ptr, b_ptr, c_ptr, rs_ptr, M, N, K,
    s_am, s_ak, s_bk, s_bn, s_cm, s_cn,
    ACCUMULATE: tl.constexpr, ROWSUM: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """C (M, N) = [C +] A (M, K) @ B (K, N), fp32 accumulation, cast once on store.

    ROWSUM: also rs (M,) fp32 = [rs +] sum_k A[m, k] (written by the programs of column-tile 0 only).
    Grouped program order (GROUP_M row tiles share each B column tile) keeps operands in L2.
    """
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    in_group = GROUP_M * num_n
    first_m = (pid // in_group) * GROUP_M
    group_rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % group_rows
    pid_n = (pid % in_group) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < N
    a_ptrs = a_ptr + offs_m.to(tl.int64)[:, None] * s_am + offs_k[None, :] * s_ak
    b_ptrs = b_ptr + offs_k[:, None] * s_bk + offs_n.to(tl.int64)[None, :] * s_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    rs = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + offs_k) < K
        a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        if ROWSUM:
            rs += tl.sum(a.to(tl.float32), axis=1)
        a_ptrs += BLOCK_K * s_ak
        b_ptrs += BLOCK_K * s_bk

    c_ptrs = c_ptr + offs_m.to(tl.int64)[:, None] * s_cm + offs_n[None, :] * s_cn
    c_ok = m_ok[:, None] & n_ok[None, :]
    if ACCUMULATE:
        acc += tl.load(c_ptrs, mask=c_ok, other=0.0).to(tl.float32)
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=c_ok)
    if ROWSUM:
        if pid_n == 0:
            if ACCUMULATE:
                rs += tl.load(rs_ptr + offs_m, mask=m_ok, other=0.0)
            tl.store(rs_ptr + offs_m, rs, mask=m_ok)


# ---------------------------------------------------------------------------------------------------
# Launch configs, as Choices (kernels/launch_table.py)


def _pow2_between(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(int(n), 1))))


def interpreter_tile_config(t: int, v: int, e: int) -> triton.Config:
    """The one config for the forward / dlogits kernels under the interpreter: large tiles mean fewer
    (slow, Python-level) iterations; the whole of a small E in one step."""
    return cfg(4, 1, BLOCK_T=_pow2_between(t, 16, 32), BLOCK_V=_pow2_between(v, 16, 128),
               BLOCK_E=_pow2_between(e, 16, 128))


def interpreter_matmul_config(m: int, n: int, k: int) -> triton.Config:
    return cfg(4, 1, BLOCK_M=_pow2_between(m, 16, 64), BLOCK_N=_pow2_between(n, 16, 128),
               BLOCK_K=_pow2_between(k, 16, 128), GROUP_M=4)


# Hopper (H100 / H200, 228 KB shared memory per SM), 16-bit operands. Forward / dlogits: a
# (BLOCK_T x BLOCK_V) fp32 logits block per program, fed by a BLOCK_E-deep pipelined K loop; 8 warps = two
# warpgroups of wgmma. Every BLOCK_V divides VOCAB_SPLIT_QUANTUM. Shared memory per stage:
# (BLOCK_T + BLOCK_V) * BLOCK_E * 2 bytes, 96-196 KB over the stages below.
# Dropped after the compile gate (sm_90a, Triton 3.8): 128 x 256 logits tiles spill 520-544 B in the
# forward (its online-softmax state beside a 128-register accumulator), and the 128 x 256 matmul spills
# 384-448 B when it accumulates into C.
TILE_CONFIGS = (
    cfg(8, 4, BLOCK_T=128, BLOCK_V=128, BLOCK_E=64),
    cfg(8, 4, BLOCK_T=64, BLOCK_V=256, BLOCK_E=64),
    cfg(8, 3, BLOCK_T=128, BLOCK_V=128, BLOCK_E=128),
)
MATMUL_CONFIGS = (
    cfg(8, 4, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
    cfg(4, 4, BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, GROUP_M=8),
    cfg(4, 4, BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
)
# Ampere (sm_80): mma.sync keeps the logits block in registers beside the online-softmax state; the
# 128 x 128 Hopper tiles spill 400-1000 B there, and 64 x 128 on 4 warps 684-720 B with label smoothing.
TILE_CONFIGS_SM80 = (
    cfg(8, 3, BLOCK_T=128, BLOCK_V=64, BLOCK_E=64),
    cfg(8, 3, BLOCK_T=64, BLOCK_V=128, BLOCK_E=64),
    cfg(4, 3, BLOCK_T=64, BLOCK_V=64, BLOCK_E=64),
)
MATMUL_CONFIGS_SM80 = (
    cfg(8, 3, BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8),
    cfg(4, 3, BLOCK_M=64, BLOCK_N=128, BLOCK_K=32, GROUP_M=8),
    cfg(4, 4, BLOCK_M=128, BLOCK_N=64, BLOCK_K=32, GROUP_M=8),
)
# fp32 operands (3xTF32 products, not a speed path): one config whose stages fit shared memory.
TILE_CONFIG_FP32 = cfg(4, 3, BLOCK_T=64, BLOCK_V=128, BLOCK_E=32)
MATMUL_CONFIG_FP32 = cfg(4, 3, BLOCK_M=64, BLOCK_N=128, BLOCK_K=32, GROUP_M=8)
# The token-tile size the CUDA launcher assumes when choosing the forward's vocabulary split.
CUDA_BLOCK_T = 128

_TILE_KERNELS = {"fwd": ce_fwd_kernel, "dlogits": ce_dlogits_kernel}
# The dlogits chunk size T changes only on the last chunk; tuning on V and E alone avoids re-tuning there.
_TILE_KEYS = {"fwd": ("V", "E", "HAS_BIAS", "NEED_SUM"), "dlogits": ("V", "E", "HAS_BIAS")}


def _tile_shared(c, k: dict, e: int) -> int:
    """Shared memory at most (Choice.shared): an x and a W tile per pipeline stage (fp32: one stage more,
    for the operand 3xTF32 splits). Calibrated on sm_90a builds; sm_80's pipelines hold one stage less."""
    kw = c.kwargs
    return (c.num_stages + (e == 4)) * (kw["BLOCK_T"] + kw["BLOCK_V"]) * kw["BLOCK_E"] * e


def _matmul_shared(c, k: dict, e: int) -> int:
    """An A and a B tile per pipeline stage (as ``_tile_shared``)."""
    kw = c.kwargs
    return (c.num_stages + (e == 4)) * (kw["BLOCK_M"] + kw["BLOCK_N"]) * kw["BLOCK_K"] * e


def _configs(macs: int, elem_bytes: int, tuned: tuple, fp32: triton.Config) -> tuple:
    if elem_bytes >= 4:
        return (fp32,)
    return tuned if tunable(macs, True) else tuned[:1]


@functools.lru_cache(maxsize=None)
def _tile_choice(kind: str, configs: tuple, interpreter_key: tuple) -> Choice:
    return Choice(_TILE_KERNELS[kind], configs, cfg(4, 1, **dict(interpreter_key)), key=_TILE_KEYS[kind],
                  shared=_tile_shared)


def tile(kind: str, t: int, v: int, e: int, elem_bytes: int, arch: int = 90) -> Choice:
    """ce_fwd_kernel ("fwd", grid (cdiv(T, BLOCK_T), slices)) or ce_dlogits_kernel ("dlogits", grid
    (cdiv(T, BLOCK_T), cdiv(V, BLOCK_V))) for T tokens, V classes, E features, on table arch 90 or 80."""
    tuned = TILE_CONFIGS if arch >= 90 else TILE_CONFIGS_SM80
    configs = _configs(t * v * e, elem_bytes, tuned, TILE_CONFIG_FP32)
    return _tile_choice(kind, configs, tuple(interpreter_tile_config(t, v, e).kwargs.items()))


@functools.lru_cache(maxsize=None)
def _matmul_choice(configs: tuple, interpreter_key: tuple) -> Choice:
    # ACCUMULATE calls read-modify-write C and rs: the autotuner restores them after each trial.
    return Choice(matmul_kernel, configs, cfg(4, 1, **dict(interpreter_key)),
                  key=("M", "N", "K", "ACCUMULATE", "ROWSUM"), restore=("c_ptr", "rs_ptr"), shared=_matmul_shared)


def matmul(m: int, n: int, k: int, elem_bytes: int, arch: int = 90) -> Choice:
    """matmul_kernel for C (M, N) (+)= A (M, K) @ B (K, N); flat grid (cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N),)."""
    tuned = MATMUL_CONFIGS if arch >= 90 else MATMUL_CONFIGS_SM80
    configs = _configs(m * n * k, elem_bytes, tuned, MATMUL_CONFIG_FP32)
    return _matmul_choice(configs, tuple(interpreter_matmul_config(m, n, k).kwargs.items()))


INPLACE_CONFIG = cfg(8, 1, BLOCK_T=32, BLOCK_V=256)  # elementwise: 8K elements a program, 16-byte rows


@functools.lru_cache(maxsize=None)
def dlogits_inplace() -> Choice:
    """ce_dlogits_inplace_kernel; grid (cdiv(T, BLOCK_T), cdiv(V, BLOCK_V))."""
    return Choice(ce_dlogits_inplace_kernel, (INPLACE_CONFIG,), cfg(4, 1, BLOCK_T=16, BLOCK_V=64))


SCALE_CONFIG = cfg(8, 1, BLOCK=4096)  # elementwise: 16 values a thread


@functools.lru_cache(maxsize=None)
def scale() -> Choice:
    """ce_scale_kernel; flat grid (cdiv(N, BLOCK),)."""
    return Choice(ce_scale_kernel, (SCALE_CONFIG,), cfg(4, 1, BLOCK=4096))


def vocab_split(n_token_tiles: int, v: int, n_programs_wanted: int) -> int:
    """Width VS of the forward's vocabulary slices (a multiple of VOCAB_SPLIT_QUANTUM, no empty slice).

    Few token tiles -> more slices, so that about ``n_programs_wanted`` programs run.
    """
    max_slices = triton.cdiv(v, VOCAB_SPLIT_QUANTUM)
    slices = max(1, min(max_slices, triton.cdiv(n_programs_wanted, max(n_token_tiles, 1))))
    return triton.cdiv(triton.cdiv(v, slices), VOCAB_SPLIT_QUANTUM) * VOCAB_SPLIT_QUANTUM


def bwd_chunk_tokens(t: int, v: int, elem_bytes: int, interpreting: bool) -> int:
    """Tokens per backward chunk: the dlogits buffer (chunk, V) stays within BWD_CHUNK_BYTES.

    Under the interpreter a small chunk, so that tests cover several chunks (fp32 accumulation of dW).
    """
    if interpreting:
        return max(1, min(t, 64))
    chunk = BWD_CHUNK_BYTES // (v * elem_bytes)
    chunk = max(CUDA_BLOCK_T, chunk // CUDA_BLOCK_T * CUDA_BLOCK_T)
    return max(1, min(t, chunk))
