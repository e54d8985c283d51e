"""Varlen attention: S sequences laid end to end in (T, H, D), bounded by int32 cu_seqlens (S + 1,).

The kernels and their launch configurations, one family (launched by aimkern/ops/attention_varlen.py).
Every tile belongs to one sequence: program (tile, h, s) reads cu_seqlens[s], cu_seqlens[s + 1],
block_size[s] and prefix_len[s], and addresses its sequence's rows from its first token, so tiles start
at token 0 of a sequence and never straddle two. The tiled kernels' grid is (tiles, H, S): CUDA caps axes 1
and 2 at 65,535 each (so S and H may each reach that; S * H is not bounded by it), and launches axis 0
fastest, so one head's tiles of one sequence run side by side. The backward's key tail runs one program per
(s, h) on a flat axis 0 (2**31 - 1). The grid is sized by a host-side bound on the sequence lengths
(max_seqlen, also a kernel argument); a program whose tile lies past its own sequence's end does nothing.

max_seqlen below a sequence's length (the caller's bound is wrong; checking it would cost the host sync it
saves): that sequence, and only it, comes out NaN in every row of O and LSE (the forward), and of dK, dV and
dQ (the backward), never a finite wrong value and never a hang. Each program compares n with max_seqlen; for
such a sequence the main kernels' programs write NaN over all n rows among them (``nan_rows``, the grid's
axis-0 programs striding over the rows) and the tail kernels skip it. A branch taken only then: a covered
sequence runs exactly as before.

Inside a sequence everything is the dense kernels' code (kernels/attention_fwd.py, attention_bwd.py), shared
as @triton.jit helpers: the same mask (query i of s sees key j of s when j < prefix_len[s], or not
IS_CAUSAL, or j // block_size[s] <= i // block_size[s]), the same three key-tile classes, the same tails:

* forward: queries [0, split) in BLOCK_M tiles (``attn_varlen_fwd_kernel``), split = n - n % 64 (n itself when n < 64 or a multiple of
  64), the last n % 64 queries in 16-row key-major tiles (``attn_varlen_fwd_tail_kernel``);
* backward: delta = rowsum(o * do) (the dense pre-pass on the (1, H, T, D) view), then the last <= 32
  keys of each sequence in 16-key tiles (``attn_varlen_bwd_key_tail_kernel``, one program per sequence
  and head, so its dQ shares land first and in one order), then one program per (key tile, sequence *
  head) over the query tiles that see it, 5 dots a tile (``attn_varlen_bwd_kernel``). dQ shares go into an
  fp32 (H, T, D) accumulator, in descending key-tile order per query tile when DETERMINISTIC (the dense
  scheme: one turn counter per query tile; the grid runs each sequence's highest key tile first).

Row-indexed buffers (LSE, DELTA: (H, T) fp32; DQ_ACC: (H, T, HEAD_D) fp32) are per head, token-major, so a
sequence's rows are contiguous at h * T + cu_seqlens[s].

No fused one-program-per-head backward yet (the dense short-N path): every sequence takes the tiled one.
"""
from __future__ import annotations

import functools

import triton
import triton.language as tl

from .attention import (
    INTERPRET_LARGE_TILE, INTERPRET_SMALL_N, INTERPRET_SMALL_TILE, KEY_TAIL_MAX, KEY_TAIL_QUANTUM,
    QUERY_TAIL_QUANTUM, _bwd_tiled_shared, _fwd_shared, backward_key_tail as dense_backward_key_tail,
    backward_preprocess, block_d, forward_tail as dense_forward_tail, table_entries,
)
from .attention_bwd import QUERY_TAIL, key_tail_tile, key_tile_backward
from .attention_fwd import fwd_query_tile, fwd_tail_query_tile, load_rows, store_rows
from .constants import LN2
from .launch_table import Choice, cfg

__all__ = ["backward_key_tail", "backward_preprocess", "backward_tiled", "forward", "forward_tail"]

_QUANTUM = tl.constexpr(QUERY_TAIL_QUANTUM)  # the forward's query split and the backward's key split
_KEY_TAIL_MAX = tl.constexpr(KEY_TAIL_MAX)
KEY_TAIL_TILE = 16  # keys per tile of the backward's key tail (at most two tiles: KEY_TAIL_MAX = 32)
assert KEY_TAIL_QUANTUM == QUERY_TAIL_QUANTUM  # one split quantum, used for queries and keys


# --------------------------------------------------------------------------------------- per sequence
@triton.jit
def sequence(CU, s):
    """(first token as int64, length) of sequence s."""
    start = tl.load(CU + s)
    return start.to(tl.int64), tl.load(CU + s + 1) - start


@triton.jit
def sequence_mask(BLOCK_SIZE, PREFIX, s, IS_CAUSAL: tl.constexpr, HAS_PREFIX: tl.constexpr):
    """(block_size, prefix) of sequence s (1 and 0 where the mask does not use them)."""
    if IS_CAUSAL:
        block_size = tl.load(BLOCK_SIZE + s)
    else:
        block_size = 1
    if HAS_PREFIX:
        prefix = tl.load(PREFIX + s)
    else:
        prefix = 0
    return block_size, prefix


@triton.jit
def query_split(n):
    """First query of the forward's 16-row tail tiles (n when there are none): the dense query_tail_start."""
    split = (n // _QUANTUM) * _QUANTUM
    return tl.where((split == 0) | (split == n), n, split)


@triton.jit
def key_split(n, HAS_KEY_TAIL: tl.constexpr):
    """End of the backward's main key tiles (n when there is no key tail): the dense key_tail rule."""
    if HAS_KEY_TAIL:
        k_end = (n // _QUANTUM) * _QUANTUM
        rest = n - k_end
        k_end = tl.where((k_end == 0) | (rest == 0) | (rest > _KEY_TAIL_MAX), n, k_end)
    else:
        k_end = n
    return k_end


@triton.jit
def nan_rows(base, first, n, stride_n, stride_d, HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr,
             BLOCK_ROWS: tl.constexpr):
    """NaN into rows [0, n) (HEAD_D wide) at ``base``, for a sequence the grid does not cover (n > max_seqlen),
    shared among the programs of grid axis 0: this one writes row tiles first, first + num_programs(0), ..."""
    offs_d = tl.arange(0, BLOCK_D)
    nan = tl.full([BLOCK_ROWS, BLOCK_D], float("nan"), base.dtype.element_ty)
    for r0 in range(first * BLOCK_ROWS, n, tl.num_programs(0) * BLOCK_ROWS):
        store_rows(base, nan, r0 + tl.arange(0, BLOCK_ROWS), n, offs_d, stride_n, stride_d, HEAD_D)


# -------------------------------------------------------------------------------------------- forward
@triton.jit
def attn_varlen_fwd_kernel(
    Q, K, V, O, LSE, CU, BLOCK_SIZE, PREFIX,
    sqt, sqh, sqd, skt, skh, skd, svt, svh, svd, sot, soh, sod,
    H, T, max_seqlen, qk_scale,
    HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_PREFIX: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One program per (query tile, h, s) over its sequence's queries [0, split); grid
    (cdiv(max_seqlen, BLOCK_M), H, S). Writes O (T, H, D strides) and LSE (H, T) fp32, natural log; a
    sequence longer than max_seqlen gets NaN in all its O and LSE rows (``nan_rows``)."""
    pid_m = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    s = tl.program_id(2)
    start, n = sequence(CU, s)
    m_end = query_split(n)
    m0 = pid_m * BLOCK_M
    if n > max_seqlen:  # uncovered: NaN in every row (the tail kernel leaves the sequence alone)
        nan_rows(O + start * sot + h * soh, pid_m, n, sot, sod, HEAD_D, BLOCK_D, BLOCK_M)
        nan_rows(LSE + h * T + start, pid_m, n, 1, 0, 1, 1, BLOCK_M)
    elif m0 < m_end:
        block_size, prefix = sequence_mask(BLOCK_SIZE, PREFIX, s, IS_CAUSAL, HAS_PREFIX)
        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        q = load_rows(Q + start * sqt + h * sqh, offs_m, m_end, offs_d, sqt, sqd, HEAD_D, BLOCK_D, True)
        acc, m_i, l_i = fwd_query_tile(q, K + start * skt + h * skh, V + start * svt + h * svh, m0, m_end, n,
                                       offs_m, offs_d, skt, skd, svt, svd, prefix, block_size, qk_scale,
                                       HEAD_D, BLOCK_D, BLOCK_M, BLOCK_N, IS_CAUSAL, HAS_PREFIX, DOT_PRECISION)
        o = acc / l_i[:, None]
        store_rows(O + start * sot + h * soh, o.to(O.dtype.element_ty), offs_m, m_end, offs_d, sot, sod, HEAD_D)
        tl.store(LSE + h * T + start + offs_m, (m_i + tl.log2(l_i)) * LN2, mask=offs_m < m_end)


@triton.jit
def attn_varlen_fwd_tail_kernel(
    Q, K, V, O, LSE, CU, BLOCK_SIZE, PREFIX,
    sqt, sqh, sqd, skt, skh, skd, svt, svh, svd, sot, soh, sod,
    H, T, max_seqlen, qk_scale,
    HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_PREFIX: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """The last queries [split, n) of each sequence (fewer than 64), BLOCK_M (16) at a time, key-major (the
    dense attn_fwd_tail_kernel); grid (cdiv(63, BLOCK_M), H, S). Skips a sequence longer than max_seqlen
    (attn_varlen_fwd_kernel has written its rows NaN)."""
    pid_m = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    s = tl.program_id(2)
    start, n = sequence(CU, s)
    m0 = query_split(n) + pid_m * BLOCK_M
    if (m0 < n) & (n <= max_seqlen):
        block_size, prefix = sequence_mask(BLOCK_SIZE, PREFIX, s, IS_CAUSAL, HAS_PREFIX)
        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        q = load_rows(Q + start * sqt + h * sqh, offs_m, n, offs_d, sqt, sqd, HEAD_D, BLOCK_D, True)
        acc_t, m_i, l_i = fwd_tail_query_tile(q, K + start * skt + h * skh, V + start * svt + h * svh, m0, n,
                                              offs_m, offs_d, skt, skd, svt, svd, prefix, block_size, qk_scale,
                                              HEAD_D, BLOCK_D, BLOCK_M, BLOCK_N, IS_CAUSAL, HAS_PREFIX,
                                              DOT_PRECISION)
        o_t = acc_t / l_i[None, :]
        o_ptrs = O + start * sot + h * soh + offs_m[None, :] * sot + offs_d[:, None] * sod
        tl.store(o_ptrs, o_t.to(O.dtype.element_ty), mask=(offs_m[None, :] < n) & (offs_d[:, None] < HEAD_D))
        tl.store(LSE + h * T + start + offs_m, (m_i + tl.log2(l_i)) * LN2, mask=offs_m < n)


# ------------------------------------------------------------------------------------------- backward
@triton.jit
def attn_varlen_bwd_key_tail_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, DQ_ACC, CU, BLOCK_SIZE, PREFIX,
    sqt, sqh, sqd, skt, skh, skd, svt, svh, svd, sdt, sdh, sdd, skgt, skgh, skgd, svgt, svgh, svgd,
    H, T, max_seqlen, qk_scale, sm_scale,
    HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, KEY_TILE: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_PREFIX: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """dK, dV of each sequence's keys [key_split(n), n) (at most 32) in KEY_TILE-key tiles, and their dQ
    shares; one program per (s * H + h), launched before attn_varlen_bwd_kernel. Grid (S * H,), flat (S * H
    may pass 65,535). Skips a sequence longer than max_seqlen (attn_varlen_bwd_kernel writes it NaN)."""
    sh = tl.program_id(0)
    s = sh // H
    h = (sh % H).to(tl.int64)
    start, n = sequence(CU, s)
    block_size, prefix = sequence_mask(BLOCK_SIZE, PREFIX, s, IS_CAUSAL, HAS_PREFIX)
    offs_d = tl.arange(0, BLOCK_D)
    row = h * T + start
    k_stop = tl.where(n > max_seqlen, 0, n)  # uncovered: no tile
    for k_start in range(key_split(n, True), k_stop, KEY_TILE):
        key_tail_tile(K + start * skt + h * skh, V + start * svt + h * svh, Q + start * sqt + h * sqh,
                      DO + start * sdt + h * sdh, LSE + row, DELTA + row, DQ_ACC + row * HEAD_D,
                      DK + start * skgt + h * skgh, DV + start * svgt + h * svgh, k_start, offs_d,
                      sqt, sqd, skt, skd, svt, svd, sdt, sdd, skgt, skgd, svgt, svgd, n, prefix, block_size,
                      qk_scale, sm_scale, HEAD_D, BLOCK_D, BLOCK_M, KEY_TILE, IS_CAUSAL, HAS_PREFIX, DOT_PRECISION)


@triton.jit
def attn_varlen_bwd_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, DQ_ACC, SEM, CU, BLOCK_SIZE, PREFIX,
    sqt, sqh, sqd, skt, skh, skd, svt, svh, svd, sdt, sdh, sdd, skgt, skgh, skgd, svgt, svgh, svgd,
    H, T, max_seqlen, sem_stride, qk_scale, sm_scale,
    HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_PREFIX: tl.constexpr, HAS_KEY_TAIL: tl.constexpr,
    DETERMINISTIC: tl.constexpr, DQ_KEY_MAJOR: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One program per (key tile, h, s) over keys [0, key_split(n)), grid (cdiv(max_seqlen, BLOCK_N), H, S),
    key tiles in descending order along axis 0. CUDA launches axis 0 fastest, then 1, then 2: the tiles of
    one (s, h) are launched together, its highest key tile first, so a DETERMINISTIC program only waits for
    programs launched before it (the turns of a query tile come from its own (s, h) only). dK, dV written
    once (rows of the sequence only); dQ shares added into DQ_ACC. SEM (H, sem_stride) int32 zeros:
    sequence s's query tiles count turns in slots [cu[s] // 16 + s, ... + cdiv(n, 16)), disjoint across
    sequences (sem_stride = T // 16 + S). A sequence longer than max_seqlen gets NaN in all its dK, dV and
    DQ_ACC rows (``nan_rows``), and no program waits on it."""
    pid = tl.program_id(0)
    n_tile = tl.num_programs(0) - 1 - pid
    h = tl.program_id(1).to(tl.int64)
    s = tl.program_id(2)
    start, n = sequence(CU, s)
    k_end = key_split(n, HAS_KEY_TAIL)
    # n <= max_seqlen puts every key tile on the grid; the minimum keeps a grid too short for the launcher's
    # max_seqlen from leaving the ordered dQ turns waiting forever for tiles that never run.
    tiles = tl.minimum(tl.cdiv(k_end, BLOCK_N), tl.num_programs(0))
    if n > max_seqlen:  # uncovered: NaN gradients for every row (the key tail left the sequence alone)
        row = h * T + start
        nan_rows(DK + start * skgt + h * skgh, pid, n, skgt, skgd, HEAD_D, BLOCK_D, BLOCK_N)
        nan_rows(DV + start * svgt + h * svgh, pid, n, svgt, svgd, HEAD_D, BLOCK_D, BLOCK_N)
        nan_rows(DQ_ACC + row * HEAD_D, pid, n, HEAD_D, 1, HEAD_D, BLOCK_D, BLOCK_N)
    elif n_tile < tiles:
        block_size, prefix = sequence_mask(BLOCK_SIZE, PREFIX, s, IS_CAUSAL, HAS_PREFIX)
        n0 = n_tile * BLOCK_N
        offs_n = n0 + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        # Keys [0, k_end) of the sequence; rows past it load as 0 (never another sequence's keys).
        k = load_rows(K + start * skt + h * skh, offs_n, k_end, offs_d, skt, skd, HEAD_D, BLOCK_D, True)
        v = load_rows(V + start * svt + h * svh, offs_n, k_end, offs_d, svt, svd, HEAD_D, BLOCK_D, True)
        row = h * T + start
        sem_base = SEM + h * sem_stride + start // QUERY_TAIL + s
        dk, dv = key_tile_backward(k, v, Q + start * sqt + h * sqh, DO + start * sdt + h * sdh, LSE + row,
                                   DELTA + row, DQ_ACC + row * HEAD_D, sem_base, n0, n_tile, tiles - 1, offs_n,
                                   offs_d, sqt, sqd, sdt, sdd, n, k_end, prefix, block_size, qk_scale,
                                   HEAD_D, BLOCK_D, BLOCK_M, BLOCK_N, IS_CAUSAL, HAS_PREFIX, DETERMINISTIC,
                                   DQ_KEY_MAJOR, DOT_PRECISION)
        store_rows(DK + start * skgt + h * skgh, (dk * sm_scale).to(DK.dtype.element_ty), offs_n, k_end, offs_d,
                   skgt, skgd, HEAD_D)
        store_rows(DV + start * svgt + h * svgh, dv.to(DV.dtype.element_ty), offs_n, k_end, offs_d, svgt, svgd,
                   HEAD_D)


# -------------------------------------------------------------------------------------------- configs
# No autotuning (a varlen problem has no single N to key a tuning on; the launcher runs the first config
# that fits the device's shared memory, aimkern.ops._launch.fit_to_device), configs taken from the dense
# tables' short band, so every tile shape is one the dense compile gate already passes. The
# forward splits its queries at multiples of 64, so its query tile is the first dense entry of at most 64
# rows (the 128-row entries would pad each sequence's last main tile by up to 64 rows).
def _configs(entries, fp32: bool) -> tuple:
    """The (BLOCK_M, BLOCK_N, warps, stages) entries as configs, first pick first, each once. 16-bit: the
    first entry alone (it fits every device's shared memory; the dense tables' later 16-bit entries spill in
    the varlen kernels: sm_80's (32, 64, 4, 2) tiled backward at D = 64 by 32 B, causal, compile gate
    2026-12-07). fp32 keeps the later entries as fallbacks for smaller shared memories (99 KB devices)."""
    entries = entries if fp32 else entries[:1]
    return tuple(cfg(w, st, BLOCK_M=m, BLOCK_N=n) for m, n, w, st in dict.fromkeys(tuple(e) for e in entries))


def interpret_tile(max_seqlen: int) -> int:
    """Interpreter tiles, as the dense kernels': 16 up to 64 tokens, 64 beyond."""
    return INTERPRET_SMALL_TILE if max_seqlen <= INTERPRET_SMALL_N else INTERPRET_LARGE_TILE


def has_key_tail(head_dim: int) -> bool:
    """Whether the backward runs a key tail (not at D = 256, where the dense key-tail tile spills)."""
    return block_d(head_dim) <= 128


@functools.lru_cache(maxsize=None)
def _forward(bd: int, fp32: bool, tile: int, arch: int) -> Choice:
    entries = [e for e in table_entries("fwd", bd, fp32, "short", arch) if e[0] <= QUERY_TAIL_QUANTUM]
    return Choice(attn_varlen_fwd_kernel, _configs(entries, fp32), cfg(4, 1, BLOCK_M=tile, BLOCK_N=tile),
                  shared=_fwd_shared)


def forward(head_dim: int, fp32: bool, max_seqlen: int, arch: int = 90) -> Choice:
    """attn_varlen_fwd_kernel; grid (cdiv(max_seqlen, BLOCK_M), H, S)."""
    return _forward(block_d(head_dim), fp32, interpret_tile(max_seqlen), arch)


@functools.lru_cache(maxsize=None)
def _forward_tail(bd: int, fp32: bool) -> Choice:
    dense = dense_forward_tail(bd, fp32)
    return Choice(attn_varlen_fwd_tail_kernel, dense.configs, dense.interpreter, shared=dense.shared)


def forward_tail(head_dim: int, fp32: bool) -> Choice:
    """attn_varlen_fwd_tail_kernel (16-query tiles); grid (cdiv(QUERY_TAIL_QUANTUM - 1, BLOCK_M), H, S)."""
    return _forward_tail(block_d(head_dim), fp32)


# Where the varlen kernel (a few more live values than the dense one: its sequence's start, length, key end)
# needs another config than the dense table's; (arch, padded D, fp32) -> (BLOCK_M, BLOCK_N, warps, stages).
# Compile gate (every mask flag, DETERMINISTIC on and off):
# - sm_90a 16-bit D = 64: the dense (64, 64, 4, 3) spills 12-16 B (causal, unordered; 72 B in the 2026-12-07
#   gate, after the merge of the dense issue-26 fixes into the shared helpers); 8 warps: 221-254
#   registers, no spill, wgmma only;
# - sm_80 16-bit D = 256: the dense (16, 64, 8, 2) spills 16-76 B (causal); (16, 32, 8, 2): 184-255, none;
# - sm_80 fp32 D = 256: the dense (32, 32, 8, 1) needs 262,144 B of shared memory (sm_80 has 166,912);
#   (32, 16, 8, 1) needs 163,840 (it spills 1-2.4 KB, as fp32 configs may).
BWD_OVERRIDES = {(90, 64, False): (64, 64, 8, 3), (80, 256, False): (16, 32, 8, 2), (80, 256, True): (32, 16, 8, 1)}


@functools.lru_cache(maxsize=None)
def _backward_tiled(bd: int, fp32: bool, tile: int, arch: int) -> Choice:
    # An override replaces the dense entries: they failed the gate in this kernel (the dense (64, 64, 4, 3)
    # spills 72 B here on sm_90a, causal and unordered, even as a fallback).
    override = BWD_OVERRIDES.get((arch, bd, fp32))
    entries = [override] if override else table_entries("bwd", bd, fp32, "short", arch)
    return Choice(attn_varlen_bwd_kernel, _configs(entries, fp32), cfg(4, 1, BLOCK_M=tile, BLOCK_N=tile),
                  shared=_bwd_tiled_shared)


def backward_tiled(head_dim: int, fp32: bool, max_seqlen: int, arch: int = 90) -> Choice:
    """attn_varlen_bwd_kernel; grid (cdiv(max_seqlen, BLOCK_N), H, S); DQ_ACC (H, T, D) fp32 zeros and,
    when DETERMINISTIC, SEM (H, T // 16 + S) int32 zeros."""
    return _backward_tiled(block_d(head_dim), fp32, interpret_tile(max_seqlen), arch)


@functools.lru_cache(maxsize=None)
def _backward_key_tail(bd: int, fp32: bool, arch: int) -> Choice:
    dense = dense_backward_key_tail(bd, fp32, KEY_TAIL_TILE, arch)
    return Choice(attn_varlen_bwd_key_tail_kernel, dense.configs, dense.interpreter, shared=dense.shared)


def backward_key_tail(head_dim: int, fp32: bool, arch: int = 90) -> Choice:
    """attn_varlen_bwd_key_tail_kernel (KEY_TILE = 16); grid (S * H,). Only where ``has_key_tail``."""
    return _backward_key_tail(block_d(head_dim), fp32, arch)


def sem_slots(t: int, s: int) -> int:
    """Turn counters per head of the deterministic backward (see attn_varlen_bwd_kernel)."""
    return t // QUERY_TAIL.value + s
