"""Attention backward kernels, with the forward's tile classes; deterministic by default.

Two paths:

* Short sequences (the whole K, V of a head fits on chip): ``attn_bwd_fused_kernel``, one program per
  (batch, head) holding K, V, dK, dV as up to four key tiles; it walks the query tiles once, so q, k, v,
  o, do are read once and dq, dk, dv written once, with no separate dQ pass and no delta pre-pass. Key
  tiles a query tile cannot see are skipped (this part is not memory-bound: counted, the old
  all-keys-per-query-tile kernel issued 2x the causal minimum).
* Long sequences: ``attn_bwd_preprocess_kernel`` (delta = rowsum(dO * O)), then ``attn_bwd_tiled_kernel``:
  one program per key tile, looping over the query tiles that see it, 5 dots a tile (no separate dQ pass
  recomputing S and dP). Where N > 64 and N % 64 is 1..32 (D <= 128), ``attn_bwd_key_tail_kernel`` takes
  those last keys in one narrow tile, launched before the tiled kernel. dK, dV are owned by their program;
  dQ shares are added into an fp32 accumulator, by default in a fixed order (a per-query-tile semaphore,
  FlashAttention-3's deterministic scheme: bit-identical gradients run to run), or in any order with
  ``deterministic=False``.

Gradients, with p = exp(s - lse) and s = scale * q k^T:  dv = p^T do,  dp = do v^T,
ds = p * (dp - delta),  dq = scale * ds k,  dk = scale * ds^T q.
Padded query rows (i >= N) load lse = +inf, so p = 0 there and they add nothing, with no mask arithmetic.
"""
import triton
import triton.language as tl

from .attention_fwd import flat_program, key_bounds, load_rows, query_bounds, store_rows, visible
from .constants import LOG2E

# The tiled backward's last N % BLOCK_M queries run in tiles of this many rows (key-major dots keep wgmma).
QUERY_TAIL = tl.constexpr(16)



@triton.jit
def attn_bwd_preprocess_kernel(O, DO, DELTA, sob, soh, son, sod, sdb, sdh, sdn, sdd, H, N,
                               HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                               FLAT: tl.constexpr = False):
    """delta[b, h, i] = sum_d o[b, h, i, d] * do[b, h, i, d] in fp32, stored (B, H, N); ``flat_program``."""
    pid_m, bh = flat_program(tl.cdiv(N, BLOCK_M), FLAT)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    o = load_rows(O + b * sob + h * soh, offs_m, N, offs_d, son, sod, HEAD_D, BLOCK_D, True)
    do = load_rows(DO + b * sdb + h * sdh, offs_m, N, offs_d, sdn, sdd, HEAD_D, BLOCK_D, True)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + bh.to(tl.int64) * N + offs_m, delta, mask=offs_m < N)


@triton.jit
def _bwd_key_tile(dk, dv, k, v, q_base, do_base, lse_base, delta_base, dq_base, sem_base, lo, hi, n_tile,
                  last_tile, sem_first, offs_n, offs_d, sqn, sqd, sdn, sdd, n, k_end, prefix, block_size, qk_scale,
                  HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  IS_CAUSAL: tl.constexpr, HAS_PREFIX: tl.constexpr, MASKED: tl.constexpr,
                  DETERMINISTIC: tl.constexpr, DQ_KEY_MAJOR: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """dK, dV of one key tile over query tiles [lo, hi), and each query tile's dQ share (5 dots a tile).

    Key-major ("transposed") form: every dot has BLOCK_N key rows or BLOCK_D rows, so all run on wgmma.
    The dQ share goes into the fp32 accumulator dq (B * H, N, HEAD_D) with atomics; DETERMINISTIC orders
    them: query tile m takes the shares of its key tiles in descending key-tile order (its semaphore counts
    the shares already added), so every run adds the same values in the same order. The query tile starting
    at start_m has semaphore sem_first + start_m // BLOCK_M (main tiles: sem_first = 0; the caller shifts
    the tail tiles past the main ones). MASKED blocks hide keys >= k_end (the program's own key range) as
    well as the mask's invisible ones.
    """
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q = load_rows(q_base, offs_m, n, offs_d, sqn, sqd, HEAD_D, BLOCK_D, True)
        do = load_rows(do_base, offs_m, n, offs_d, sdn, sdd, HEAD_D, BLOCK_D, True)
        lse = tl.load(lse_base + offs_m, mask=offs_m < n, other=float("inf")) * LOG2E
        delta = tl.load(delta_base + offs_m, mask=offs_m < n, other=0.0)
        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_N, BLOCK_M)
        p_t = tl.exp2(s_t - lse[None, :])
        if MASKED:
            vis = visible(offs_m[None, :], offs_n[:, None], k_end, prefix, block_size, IS_CAUSAL, HAS_PREFIX)
            p_t = tl.where(vis, p_t, 0.0)
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        ds_t = (p_t * (dp_t - delta[None, :])).to(q.dtype)
        dk += tl.dot(ds_t, q, input_precision=DOT_PRECISION)
        if DQ_KEY_MAJOR:  # dQ^T = K^T dS^T: BLOCK_D rows, a wgmma slab however narrow the query tile
            dq_t = tl.dot(tl.trans(k), ds_t, input_precision=DOT_PRECISION)  # (BLOCK_D, BLOCK_M)
            dq_ptrs = dq_base + offs_m[None, :] * HEAD_D + offs_d[:, None]
            dq_ok = (offs_m[None, :] < n) & (offs_d[:, None] < HEAD_D)
        else:  # dQ = dS K (sm_80: mma.sync takes operands from registers, and K^T at D = 256 spills)
            dq_t = tl.dot(tl.trans(ds_t), k, input_precision=DOT_PRECISION)  # (BLOCK_M, BLOCK_D)
            dq_ptrs = dq_base + offs_m[:, None] * HEAD_D + offs_d[None, :]
            dq_ok = (offs_m[:, None] < n) & (offs_d[None, :] < HEAD_D)
        if DETERMINISTIC:
            # Key tiles [0, n_max] add into query tile m; the higher ones have gone first.
            m0 = start_m
            n_max = (key_bounds(m0, n, prefix, block_size, BLOCK_M, IS_CAUSAL)[1] - 1) // BLOCK_N
            n_max = tl.minimum(n_max, last_tile)  # keys past K_END went first, in the key-tail kernel
            turn = n_max - n_tile
            sem = sem_base + sem_first + start_m // BLOCK_M
            while tl.atomic_cas(sem, turn, turn, sem="acquire") != turn:
                pass
            tl.atomic_add(dq_ptrs, dq_t, mask=dq_ok, sem="relaxed")
            tl.debug_barrier()  # every thread's share is in before the next key tile's turn
            tl.atomic_add(sem, 1, sem="release")
        else:
            tl.atomic_add(dq_ptrs, dq_t, mask=dq_ok, sem="relaxed")
    return dk, dv


@triton.jit
def key_tile_backward(k, v, q_base, do_base, lse_base, delta_base, dq_base, sem_base, n0, n_tile, last_tile, offs_n,
                      offs_d, sqn, sqd, sdn, sdd, n, k_end, prefix, block_size, qk_scale,
                      HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      IS_CAUSAL: tl.constexpr, HAS_PREFIX: tl.constexpr, DETERMINISTIC: tl.constexpr,
                      DQ_KEY_MAJOR: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """(dk, dv) fp32 of the key tile at n0 (index n_tile of tiles [0, last_tile] over keys [0, k_end)) of a
    head of n queries: the query tiles that see it, masked only in the boundary band, the last n % BLOCK_M
    queries in QUERY_TAIL-row tiles; each query tile's dQ share is added into dq_base (rows of HEAD_D fp32)
    in the order of sem_base's turn counters (one per query tile, cdiv(n, QUERY_TAIL) of them) when
    DETERMINISTIC. lse_base / delta_base: the head's n rows at stride 1. Shared by the dense and the varlen
    tiled backward."""
    lo, full_start = query_bounds(n0, k_end, prefix, block_size, BLOCK_N, IS_CAUSAL)
    # Queries [0, m_split) in BLOCK_M tiles, the rest (< BLOCK_M of them) in QUERY_TAIL-row tiles.
    m_split = (n // BLOCK_M) * BLOCK_M
    m_lo = tl.minimum((lo // BLOCK_M) * BLOCK_M, m_split)
    m_full = tl.minimum(((full_start + BLOCK_M - 1) // BLOCK_M) * BLOCK_M, m_split)  # first tile past the band
    # A key tile running past k_end (padded rows of the last tile, keys the key-tail kernel owns, or a varlen
    # tile's rows past its sequence) loads those rows as 0, so s = 0 and p = exp(-lse): inf once lse < ~-11
    # (fp16 ds) or ~-88 (fp32), and ds * k = inf * 0 = NaN in dQ. That one tile masks every query tile; the
    # others stay mask-free.
    m_full = tl.where(n0 + BLOCK_N > k_end, m_split, m_full)
    t_lo = tl.maximum((lo // QUERY_TAIL) * QUERY_TAIL, m_split)

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    # The three query ranges: the masked band, the mask-free tiles past it, the QUERY_TAIL-row tail tiles
    # (their semaphores come after the m_split // BLOCK_M main ones: start_m // QUERY_TAIL counts from 0, so
    # subtract the m_split // QUERY_TAIL tail-sized slots it would skip).
    dk, dv = _bwd_key_tile(dk, dv, k, v, q_base, do_base, lse_base, delta_base, dq_base, sem_base, m_lo, m_full,
                           n_tile, last_tile, 0, offs_n, offs_d, sqn, sqd, sdn, sdd, n, k_end, prefix, block_size,
                           qk_scale, HEAD_D, BLOCK_D, BLOCK_M, BLOCK_N, IS_CAUSAL, HAS_PREFIX, True, DETERMINISTIC,
                           DQ_KEY_MAJOR, DOT_PRECISION)
    dk, dv = _bwd_key_tile(dk, dv, k, v, q_base, do_base, lse_base, delta_base, dq_base, sem_base, m_full,
                           m_split, n_tile, last_tile, 0, offs_n, offs_d, sqn, sqd, sdn, sdd, n, k_end, prefix,
                           block_size, qk_scale, HEAD_D, BLOCK_D, BLOCK_M, BLOCK_N, IS_CAUSAL, HAS_PREFIX, False,
                           DETERMINISTIC, DQ_KEY_MAJOR, DOT_PRECISION)
    dk, dv = _bwd_key_tile(dk, dv, k, v, q_base, do_base, lse_base, delta_base, dq_base, sem_base, t_lo, n,
                           n_tile, last_tile, m_split // BLOCK_M - m_split // QUERY_TAIL, offs_n, offs_d, sqn, sqd,
                           sdn, sdd, n, k_end, prefix, block_size, qk_scale, HEAD_D, BLOCK_D, QUERY_TAIL, BLOCK_N,
                           IS_CAUSAL, HAS_PREFIX, True, DETERMINISTIC, DQ_KEY_MAJOR, DOT_PRECISION)
    return dk, dv


@triton.jit
def attn_bwd_tiled_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, DQ_ACC, SEM, PREFIX,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdb, sdh, sdn, sdd,
    skgb, skgh, skgn, skgd, svgb, svgh, svgn, svgd,
    H, N, K_END, N_BUCKET, block_size, qk_scale, sm_scale,
    HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_PREFIX: tl.constexpr, DETERMINISTIC: tl.constexpr,
    DQ_KEY_MAJOR: tl.constexpr, DOT_PRECISION: tl.constexpr, FLAT: tl.constexpr = False,
):
    """One program per (key tile, batch * head), the highest key tile first: dK, dV of BLOCK_N keys written
    once, dQ shares accumulated in DQ_ACC (B * H, N, HEAD_D) fp32 (zeroed by the launcher; SEM (B * H,
    cdiv(N, BLOCK_M)) int32 zeros when DETERMINISTIC). Query tiles that see none of the keys are skipped,
    and only the boundary band pays for the mask. The grid runs key tiles in descending order so that a
    deterministic program only ever waits for programs launched before it. Flat grid (``flat_program``)
    of cdiv(K_END, BLOCK_N) key tiles per batch * head.
    """
    key_tiles = tl.cdiv(K_END, BLOCK_N)
    pid_n, bh = flat_program(key_tiles, FLAT)
    last_tile = key_tiles - 1
    n_tile = last_tile - pid_n
    b = bh // H
    b64 = b.to(tl.int64)
    h64 = (bh % H).to(tl.int64)
    n0 = n_tile * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    # Keys [0, K_END) (rows past it load as 0: they add nothing to dQ, and their dK, dV are not stored).
    k = load_rows(K + b64 * skb + h64 * skh, offs_n, K_END, offs_d, skn, skd, HEAD_D, BLOCK_D, True)
    v = load_rows(V + b64 * svb + h64 * svh, offs_n, K_END, offs_d, svn, svd, HEAD_D, BLOCK_D, True)
    if HAS_PREFIX:
        prefix = tl.load(PREFIX + b)
    else:
        prefix = 0

    q_base = Q + b64 * sqb + h64 * sqh
    do_base = DO + b64 * sdb + h64 * sdh
    row_base = bh.to(tl.int64) * N
    sem_base = SEM + bh.to(tl.int64) * tl.cdiv(N, QUERY_TAIL)
    dk, dv = key_tile_backward(k, v, q_base, do_base, LSE + row_base, DELTA + row_base, DQ_ACC + row_base * HEAD_D,
                               sem_base, n0, n_tile, last_tile, offs_n, offs_d, sqn, sqd, sdn, sdd, N, K_END, prefix,
                               block_size, qk_scale, HEAD_D, BLOCK_D, BLOCK_M, BLOCK_N, IS_CAUSAL, HAS_PREFIX,
                               DETERMINISTIC, DQ_KEY_MAJOR, DOT_PRECISION)
    store_rows(DK + b64 * skgb + h64 * skgh, (dk * sm_scale).to(DK.dtype.element_ty), offs_n, K_END, offs_d,
               skgn, skgd, HEAD_D)
    store_rows(DV + b64 * svgb + h64 * svgh, dv.to(DV.dtype.element_ty), offs_n, K_END, offs_d, svgn, svgd, HEAD_D)


@triton.jit
def key_tail_tile(k_base, v_base, q_base, do_base, lse_base, delta_base, dq_base, dk_base, dv_base, k_start, offs_d,
                  sqn, sqd, skn, skd, svn, svd, sdn, sdd, skgn, skgd, svgn, svgd, n, prefix, block_size, qk_scale,
                  sm_scale, HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                  KEY_TILE: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_PREFIX: tl.constexpr,
                  DOT_PRECISION: tl.constexpr):
    """dK, dV of the keys [k_start, min(k_start + KEY_TILE, n)) of one head of n tokens, written through
    dk_base / dv_base, and their dQ shares added into dq_base (rows of HEAD_D fp32) in query order; see
    attn_bwd_key_tail_kernel. lse_base / delta_base: the head's n rows at stride 1. Shared by the dense and
    the varlen backward."""
    offs_n = k_start + tl.arange(0, KEY_TILE)
    k = load_rows(k_base, offs_n, n, offs_d, skn, skd, HEAD_D, BLOCK_D, True)
    v = load_rows(v_base, offs_n, n, offs_d, svn, svd, HEAD_D, BLOCK_D, True)
    lo, _ = query_bounds(k_start, n, prefix, block_size, KEY_TILE, IS_CAUSAL)
    dk_t = tl.zeros([BLOCK_D, KEY_TILE], tl.float32)
    dv_t = tl.zeros([BLOCK_D, KEY_TILE], tl.float32)
    for start_m in range((lo // BLOCK_M) * BLOCK_M, n, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q = load_rows(q_base, offs_m, n, offs_d, sqn, sqd, HEAD_D, BLOCK_D, True)
        do = load_rows(do_base, offs_m, n, offs_d, sdn, sdd, HEAD_D, BLOCK_D, True)
        lse = tl.load(lse_base + offs_m, mask=offs_m < n, other=float("inf")) * LOG2E
        delta = tl.load(delta_base + offs_m, mask=offs_m < n, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_M, KEY_TILE)
        vis = visible(offs_m[:, None], offs_n[None, :], n, prefix, block_size, IS_CAUSAL, HAS_PREFIX)
        p = tl.where(vis, tl.exp2(s - lse[:, None]), 0.0)
        dv_t += tl.dot(tl.trans(do), p.to(do.dtype), input_precision=DOT_PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = (p * (dp - delta[:, None])).to(q.dtype)
        dk_t += tl.dot(tl.trans(q), ds, input_precision=DOT_PRECISION)
        dq = tl.dot(ds, k, input_precision=DOT_PRECISION)  # (BLOCK_M, BLOCK_D)
        tl.atomic_add(dq_base + offs_m[:, None] * HEAD_D + offs_d[None, :], dq,
                      mask=(offs_m[:, None] < n) & (offs_d[None, :] < HEAD_D), sem="relaxed")
    ok = (offs_n[None, :] < n) & (offs_d[:, None] < HEAD_D)
    dk_ptrs = dk_base + offs_n[None, :] * skgn + offs_d[:, None] * skgd
    tl.store(dk_ptrs, (dk_t * sm_scale).to(dk_base.dtype.element_ty), mask=ok)
    dv_ptrs = dv_base + offs_n[None, :] * svgn + offs_d[:, None] * svgd
    tl.store(dv_ptrs, dv_t.to(dv_base.dtype.element_ty), mask=ok)


@triton.jit
def attn_bwd_key_tail_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, DQ_ACC, PREFIX,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdb, sdh, sdn, sdd,
    skgb, skgh, skgn, skgd, svgb, svgh, svgn, svgd,
    H, N, K_START, block_size, qk_scale, sm_scale,
    HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, KEY_TILE: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_PREFIX: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """The last keys [K_START, N) (at most KEY_TILE <= 32 of them) of each head, before attn_bwd_tiled_kernel.

    Query-major with transposed accumulators: S = Q K^T (BLOCK_M, KEY_TILE), dV^T += dO^T P, dK^T += Q^T dS
    (BLOCK_D rows) and dQ += dS K (BLOCK_M rows) all keep 64-row wgmma slabs while the key tile is narrow,
    so N = 196 pays for 16 tail keys, not 64. One program per (batch * head), launched before the tiled
    kernel: its dQ shares land first, in one fixed order (deterministic).
    """
    bh = tl.program_id(0)
    b = bh // H
    b64 = b.to(tl.int64)
    h64 = (bh % H).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    if HAS_PREFIX:
        prefix = tl.load(PREFIX + b)
    else:
        prefix = 0
    row_base = bh.to(tl.int64) * N
    key_tail_tile(K + b64 * skb + h64 * skh, V + b64 * svb + h64 * svh, Q + b64 * sqb + h64 * sqh,
                  DO + b64 * sdb + h64 * sdh, LSE + row_base, DELTA + row_base, DQ_ACC + row_base * HEAD_D,
                  DK + b64 * skgb + h64 * skgh, DV + b64 * svgb + h64 * svgh, K_START, offs_d,
                  sqn, sqd, skn, skd, svn, svd, sdn, sdd, skgn, skgd, svgn, svgd, N, prefix, block_size, qk_scale,
                  sm_scale, HEAD_D, BLOCK_D, BLOCK_M, KEY_TILE, IS_CAUSAL, HAS_PREFIX, DOT_PRECISION)


@triton.jit
def _fused_block(dk, dv, dq_t, k, v, q, do, lse, delta, offs_m, n0, full_end, hi, offs_d, n, prefix, block_size,
                 qk_scale, KV_TILE: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_PREFIX: tl.constexpr,
                 DOT_PRECISION: tl.constexpr):
    """One (key tile at n0, query tile) block of the fused backward, key-major: skipped when no query of the
    tile sees a key of it (n0 >= hi), masked only when it straddles the boundary (n0 + KV_TILE > full_end).
    Every dot has KV_TILE key rows or BLOCK_D rows (wgmma on Hopper)."""
    if n0 < hi:
        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale  # (KV_TILE, BLOCK_M)
        p_t = tl.exp2(s_t - lse[None, :])
        if n0 + KV_TILE > full_end:
            offs_n = n0 + tl.arange(0, KV_TILE)
            vis = visible(offs_m[None, :], offs_n[:, None], n, prefix, block_size, IS_CAUSAL, HAS_PREFIX)
            p_t = tl.where(vis, p_t, 0.0)
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        ds_t = (p_t * (dp_t - delta[None, :])).to(q.dtype)
        dk += tl.dot(ds_t, q, input_precision=DOT_PRECISION)
        dq_t += tl.dot(tl.trans(k), ds_t, input_precision=DOT_PRECISION)  # (BLOCK_D, BLOCK_M)
    return dk, dv, dq_t


@triton.jit
def attn_bwd_fused_kernel(
    Q, K, V, O, DO, LSE, DQ, DK, DV, PREFIX,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, son, sod, sdb, sdh, sdn, sdd,
    sqgb, sqgh, sqgn, sqgd, skgb, skgh, skgn, skgd, svgb, svgh, svgn, svgd,
    H, N, block_size, qk_scale, sm_scale,
    HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, KV_TILE: tl.constexpr,
    K_TILES: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_PREFIX: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One program per (batch * head), N <= K_TILES * KV_TILE (K_TILES <= 4): the head's K, V and fp32
    dK, dV stay on chip as K_TILES key tiles; the program walks the query tiles once, so q, k, v, o, do
    are read once and dq, dk, dv written once (no delta pre-pass, no dQ pass, no atomics: deterministic).
    Per query tile, key tiles no query of it sees are skipped and only boundary tiles are masked; the
    tiles are unrolled statically (a tile's accumulators are separate registers, which a loop cannot index).
    """
    bh = tl.program_id(0)
    b = bh // H
    b64 = b.to(tl.int64)
    h64 = (bh % H).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    offs_kv = tl.arange(0, KV_TILE)
    k_base = K + b64 * skb + h64 * skh
    v_base = V + b64 * svb + h64 * svh
    k0 = load_rows(k_base, offs_kv, N, offs_d, skn, skd, HEAD_D, BLOCK_D, True)
    v0 = load_rows(v_base, offs_kv, N, offs_d, svn, svd, HEAD_D, BLOCK_D, True)
    k1 = load_rows(k_base, KV_TILE + offs_kv, N, offs_d, skn, skd, HEAD_D, BLOCK_D, True)
    v1 = load_rows(v_base, KV_TILE + offs_kv, N, offs_d, svn, svd, HEAD_D, BLOCK_D, True)
    k2 = load_rows(k_base, 2 * KV_TILE + offs_kv, N, offs_d, skn, skd, HEAD_D, BLOCK_D, True)
    v2 = load_rows(v_base, 2 * KV_TILE + offs_kv, N, offs_d, svn, svd, HEAD_D, BLOCK_D, True)
    k3 = load_rows(k_base, 3 * KV_TILE + offs_kv, N, offs_d, skn, skd, HEAD_D, BLOCK_D, True)
    v3 = load_rows(v_base, 3 * KV_TILE + offs_kv, N, offs_d, svn, svd, HEAD_D, BLOCK_D, True)
    if HAS_PREFIX:
        prefix = tl.load(PREFIX + b)
    else:
        prefix = 0
    q_base = Q + b64 * sqb + h64 * sqh
    o_base = O + b64 * sob + h64 * soh
    do_base = DO + b64 * sdb + h64 * sdh
    dq_base = DQ + b64 * sqgb + h64 * sqgh
    lse_base = LSE + bh.to(tl.int64) * N

    dk0 = tl.zeros([KV_TILE, BLOCK_D], tl.float32)
    dv0 = tl.zeros([KV_TILE, BLOCK_D], tl.float32)
    dk1 = tl.zeros([KV_TILE, BLOCK_D], tl.float32)
    dv1 = tl.zeros([KV_TILE, BLOCK_D], tl.float32)
    dk2 = tl.zeros([KV_TILE, BLOCK_D], tl.float32)
    dv2 = tl.zeros([KV_TILE, BLOCK_D], tl.float32)
    dk3 = tl.zeros([KV_TILE, BLOCK_D], tl.float32)
    dv3 = tl.zeros([KV_TILE, BLOCK_D], tl.float32)
    for start_m in range(0, N, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q = load_rows(q_base, offs_m, N, offs_d, sqn, sqd, HEAD_D, BLOCK_D, True)
        do = load_rows(do_base, offs_m, N, offs_d, sdn, sdd, HEAD_D, BLOCK_D, True)
        o = load_rows(o_base, offs_m, N, offs_d, son, sod, HEAD_D, BLOCK_D, True)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
        lse = tl.load(lse_base + offs_m, mask=offs_m < N, other=float("inf")) * LOG2E
        full_end, hi = key_bounds(start_m, N, prefix, block_size, BLOCK_M, IS_CAUSAL)
        dq_t = tl.zeros([BLOCK_D, BLOCK_M], tl.float32)
        dk0, dv0, dq_t = _fused_block(dk0, dv0, dq_t, k0, v0, q, do, lse, delta, offs_m, 0, full_end, hi, offs_d,
                                      N, prefix, block_size, qk_scale, KV_TILE, IS_CAUSAL, HAS_PREFIX, DOT_PRECISION)
        if K_TILES > 1:
            dk1, dv1, dq_t = _fused_block(dk1, dv1, dq_t, k1, v1, q, do, lse, delta, offs_m, KV_TILE, full_end, hi,
                                          offs_d, N, prefix, block_size, qk_scale, KV_TILE, IS_CAUSAL, HAS_PREFIX,
                                          DOT_PRECISION)
        if K_TILES > 2:
            dk2, dv2, dq_t = _fused_block(dk2, dv2, dq_t, k2, v2, q, do, lse, delta, offs_m, 2 * KV_TILE, full_end,
                                          hi, offs_d, N, prefix, block_size, qk_scale, KV_TILE, IS_CAUSAL,
                                          HAS_PREFIX, DOT_PRECISION)
        if K_TILES > 3:
            dk3, dv3, dq_t = _fused_block(dk3, dv3, dq_t, k3, v3, q, do, lse, delta, offs_m, 3 * KV_TILE, full_end,
                                          hi, offs_d, N, prefix, block_size, qk_scale, KV_TILE, IS_CAUSAL,
                                          HAS_PREFIX, DOT_PRECISION)
        dq_ptrs = dq_base + offs_m[None, :] * sqgn + offs_d[:, None] * sqgd
        tl.store(dq_ptrs, (dq_t * sm_scale).to(DQ.dtype.element_ty),
                 mask=(offs_m[None, :] < N) & (offs_d[:, None] < HEAD_D))
    dk_base = DK + b64 * skgb + h64 * skgh
    dv_base = DV + b64 * svgb + h64 * svgh
    store_rows(dk_base, (dk0 * sm_scale).to(DK.dtype.element_ty), offs_kv, N, offs_d, skgn, skgd, HEAD_D)
    store_rows(dv_base, dv0.to(DV.dtype.element_ty), offs_kv, N, offs_d, svgn, svgd, HEAD_D)
    if K_TILES > 1:
        store_rows(dk_base, (dk1 * sm_scale).to(DK.dtype.element_ty), KV_TILE + offs_kv, N, offs_d, skgn, skgd,
                   HEAD_D)
        store_rows(dv_base, dv1.to(DV.dtype.element_ty), KV_TILE + offs_kv, N, offs_d, svgn, svgd, HEAD_D)
    if K_TILES > 2:
        store_rows(dk_base, (dk2 * sm_scale).to(DK.dtype.element_ty), 2 * KV_TILE + offs_kv, N, offs_d, skgn,
                   skgd, HEAD_D)
        store_rows(dv_base, dv2.to(DV.dtype.element_ty), 2 * KV_TILE + offs_kv, N, offs_d, svgn, svgd, HEAD_D)
    if K_TILES > 3:
        store_rows(dk_base, (dk3 * sm_scale).to(DK.dtype.element_ty), 3 * KV_TILE + offs_kv, N, offs_d, skgn,
                   skgd, HEAD_D)
        store_rows(dv_base, dv3.to(DV.dtype.element_ty), 3 * KV_TILE + offs_kv, N, offs_d, svgn, svgd, HEAD_D)
