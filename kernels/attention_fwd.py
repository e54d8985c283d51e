"""Attention forward kernels (FlashAttention-2 tiling) and the mask / tile-bound helpers the backward shares.

``attn_fwd_kernel`` runs the query tiles [0, M_END); ``attn_fwd_tail_kernel`` the last N - M_END < 64
queries in 16-row key-major tiles (kernels/attention.py, ``query_tail_start``). Both use a flat 1-D grid
(``flat_program``).

Mask (docs/design.md, "Masks"): query i sees key j when ``j < prefix_len[b]``, or not ``IS_CAUSAL``, or
``j // block_size <= i // block_size``. For a tile of queries [m0, m0 + BLOCK_M) the keys split in three
classes, computed in-kernel from prefix_len[b] and block_size (so they differ per sample):

    [0, full_end)   seen by every query of the tile: no mask arithmetic at all
    [full_end, hi)  the boundary (causal band, prefix edge, the ragged end at N): masked
    [hi, N)         seen by no query of the tile: never loaded

Every tensor is addressed through its own strides (B, H, N, D order), so q, k, v may be strided views of a
packed qkv activation and the output may be (B, N, H, D) memory seen as (B, H, N, D). Scores live in the
log2 domain (``qk_scale = scale * log2(e)``) so the softmax uses exp2; the saved logsumexp is natural-log.
"""
import triton
import triton.language as tl

from .constants import LN2


@triton.jit
def load_rows(base, rows, n_rows, offs_d, stride_n, stride_d,
              HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, CHECK_ROWS: tl.constexpr):
    """Load a (len(rows), BLOCK_D) tile; rows >= n_rows (if CHECK_ROWS) and columns >= HEAD_D read as 0."""
    ptrs = base + rows[:, None] * stride_n + offs_d[None, :] * stride_d
    if CHECK_ROWS:
        if BLOCK_D == HEAD_D:
            x = tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
        else:
            x = tl.load(ptrs, mask=(rows[:, None] < n_rows) & (offs_d[None, :] < HEAD_D), other=0.0)
    else:
        if BLOCK_D == HEAD_D:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=offs_d[None, :] < HEAD_D, other=0.0)
    return x


@triton.jit
def store_rows(base, x, rows, n_rows, offs_d, stride_n, stride_d, HEAD_D: tl.constexpr):
    ptrs = base + rows[:, None] * stride_n + offs_d[None, :] * stride_d
    tl.store(ptrs, x, mask=(rows[:, None] < n_rows) & (offs_d[None, :] < HEAD_D))


@triton.jit
def flat_program(tiles, FLAT: tl.constexpr):
    """(tile, batch * head) of this program: on the grid (tiles, B * H), or with FLAT on a flat grid of
    ``tiles * B * H`` programs, tiles fastest.

    CUDA caps grid axes 1 and 2 at 65,535 and axis 0 at 2**31 - 1, so B * H (70,000 at H = 12, B = 5,834)
    cannot always be an axis of its own: the launcher sets FLAT only then (its flat_grid in
    aimkern/ops/attention.py), because the division costs sm_80's D = 64 causal forward a 16 B spill. The
    flat order is the (tiles, B * H) grid's launch order: one head's tiles run side by side (sharing its K, V
    in L2), and the tiled backward's highest-key-tile-first order holds either way.
    """
    if FLAT:
        pid = tl.program_id(0)
        bh = pid // tiles
        return pid - bh * tiles, bh
    else:
        return tl.program_id(0), tl.program_id(1)


@triton.jit
def visible(q_idx, k_idx, n, prefix, block_size, IS_CAUSAL: tl.constexpr, HAS_PREFIX: tl.constexpr):
    """Boolean visibility of broadcastable query / key index tensors; keys >= n are never visible."""
    vis = k_idx < n
    if IS_CAUSAL:
        seen = (k_idx // block_size) <= (q_idx // block_size)
        if HAS_PREFIX:
            seen = seen | (k_idx < prefix)
        vis = vis & seen
    else:
        vis = vis & (q_idx >= 0)  # broadcast to the full tile shape
    return vis


@triton.jit
def key_bounds(m0, n, prefix, block_size, BLOCK_M: tl.constexpr, IS_CAUSAL: tl.constexpr):
    """(full_end, hi) for queries [m0, m0 + BLOCK_M): keys < full_end are seen by all of them, keys >= hi by none."""
    return key_bounds_rows(m0, n, n, prefix, block_size, BLOCK_M, IS_CAUSAL)


@triton.jit
def key_bounds_rows(m0, m_end, n, prefix, block_size, BLOCK_M: tl.constexpr, IS_CAUSAL: tl.constexpr):
    """key_bounds for the queries [m0, min(m0 + BLOCK_M, m_end)) of a head of n keys.

    A query i sees every key below max(prefix, (i // block_size + 1) * block_size); the tile's first query
    bounds what all see, its last real query what any sees.
    """
    if IS_CAUSAL:
        last_q = tl.minimum(m0 + BLOCK_M, m_end) - 1
        full_end = tl.minimum(tl.maximum(prefix, (m0 // block_size + 1) * block_size), n)
        hi = tl.minimum(tl.maximum(prefix, (last_q // block_size + 1) * block_size), n)
    else:
        full_end = n
        hi = n
    return full_end, hi


@triton.jit
def query_bounds(n0, n, prefix, block_size, BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr):
    """(lo, full_start) for keys [n0, n0 + BLOCK_N): queries < lo see none of them, queries >= full_start all.

    A key j >= prefix is seen by queries i >= (j // block_size) * block_size; a prefix key by every query.
    """
    if IS_CAUSAL:
        last_k = tl.minimum(n0 + BLOCK_N, n) - 1
        lo = tl.where(n0 < prefix, 0, (n0 // block_size) * block_size)
        full_start = tl.where(last_k < prefix, 0, (last_k // block_size) * block_size)
    else:
        lo = n * 0
        full_start = n * 0
    return lo, full_start


@triton.jit
def key_tile_scores(q, k_base, v_base, start_n, offs_m, offs_d, skn, skd, svn, svd, n, prefix, block_size,
                    qk_scale, HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                    IS_CAUSAL: tl.constexpr, HAS_PREFIX: tl.constexpr, MASKED: tl.constexpr,
                    DOT_PRECISION: tl.constexpr):
    """Load the key / value tile at ``start_n``; return (k, v, s) with s = q k^T in the log2 domain.

    Only MASKED (boundary) tiles check rows against N and set invisible scores to -inf; whole visible
    tiles skip both. One step of ``_fwd_tiles``, attn_fwd_kernel's key loop.
    """
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k = load_rows(k_base, offs_n, n, offs_d, skn, skd, HEAD_D, BLOCK_D, MASKED)
    v = load_rows(v_base, offs_n, n, offs_d, svn, svd, HEAD_D, BLOCK_D, MASKED)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    if MASKED:
        vis = visible(offs_m[:, None], offs_n[None, :], n, prefix, block_size, IS_CAUSAL, HAS_PREFIX)
        s = tl.where(vis, s, float("-inf"))
    return k, v, s


@triton.jit
def _fwd_tiles(acc, m_i, l_i, q, k_base, v_base, lo, hi, offs_m, offs_d,
               skn, skd, svn, svd, n, prefix, block_size, qk_scale,
               HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
               IS_CAUSAL: tl.constexpr, HAS_PREFIX: tl.constexpr, MASKED: tl.constexpr,
               DOT_PRECISION: tl.constexpr):
    """Online-softmax accumulation over key tiles [lo, hi); only MASKED tiles pay for the mask."""
    for start_n in range(lo, hi, BLOCK_N):
        k, v, s = key_tile_scores(q, k_base, v_base, start_n, offs_m, offs_d, skn, skd, svn, svd, n, prefix,
                                  block_size, qk_scale, HEAD_D, BLOCK_D, BLOCK_N, IS_CAUSAL, HAS_PREFIX, MASKED,
                                  DOT_PRECISION)
        # m_i is finite after the first tile (key 0 is visible to every query), so no -inf - -inf here.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, m_i, l_i


# Key tails: the part of the masked band narrower than BLOCK_N runs in tiles of this many keys (wgmma's N
# may be 16), so N = 196 visits 208 keys rather than 256.
KEY_TAIL = tl.constexpr(16)


@triton.jit
def fwd_query_tile(q, k_base, v_base, m0, m_end, n, offs_m, offs_d, skn, skd, svn, svd, prefix, block_size,
                   qk_scale, HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_PREFIX: tl.constexpr,
                   DOT_PRECISION: tl.constexpr):
    """(acc, m_i, l_i) of the query tile at m0 (rows < m_end real) against the n keys at k_base / v_base:
    whole visible key tiles unmasked, the boundary band masked in BLOCK_N tiles, its ragged end in KEY_TAIL
    tiles, invisible keys never loaded. Shared by the dense and the varlen forward."""
    full_end, hi = key_bounds_rows(m0, m_end, n, prefix, block_size, BLOCK_M, IS_CAUSAL)
    n_full = (full_end // BLOCK_N) * BLOCK_N  # whole tiles below full_end; the rest of the band is masked
    n_mid = n_full + ((hi - n_full) // BLOCK_N) * BLOCK_N  # the band's last part, narrower than a tile: KEY_TAIL

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, q, k_base, v_base, 0, n_full, offs_m, offs_d,
                               skn, skd, svn, svd, n, prefix, block_size, qk_scale,
                               HEAD_D, BLOCK_D, BLOCK_N, IS_CAUSAL, HAS_PREFIX, False, DOT_PRECISION)
    acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, q, k_base, v_base, n_full, n_mid, offs_m, offs_d,
                               skn, skd, svn, svd, n, prefix, block_size, qk_scale,
                               HEAD_D, BLOCK_D, BLOCK_N, IS_CAUSAL, HAS_PREFIX, True, DOT_PRECISION)
    acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, q, k_base, v_base, n_mid, hi, offs_m, offs_d,
                               skn, skd, svn, svd, n, prefix, block_size, qk_scale,
                               HEAD_D, BLOCK_D, KEY_TAIL, IS_CAUSAL, HAS_PREFIX, True, DOT_PRECISION)
    return acc, m_i, l_i


@triton.jit
def attn_fwd_kernel(
    Q, K, V, O, LSE, PREFIX,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, son, sod,
    H, N, M_END, N_BUCKET, block_size, qk_scale,
    HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_PREFIX: tl.constexpr, DOT_PRECISION: tl.constexpr,
    FLAT: tl.constexpr = False,
):
    """One program per (query tile, batch * head) over queries [0, M_END) (the launcher hands the last
    N - M_END < 64 queries to attn_fwd_tail_kernel), on a flat grid (``flat_program``). Writes O (B, H, N,
    D strides) and LSE (B, H, N) fp32.

    N_BUCKET (N rounded up to a power of two) is unused in the body: it is the autotuning key, so configs
    are tuned once per sequence band rather than once per N.
    """
    pid_m, bh = flat_program(tl.cdiv(M_END, BLOCK_M), FLAT)
    b = bh // H
    h = bh % H
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    q_base = Q + b64 * sqb + h64 * sqh
    k_base = K + b64 * skb + h64 * skh
    v_base = V + b64 * svb + h64 * svh
    o_base = O + b64 * sob + h64 * soh

    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = load_rows(q_base, offs_m, M_END, offs_d, sqn, sqd, HEAD_D, BLOCK_D, True)
    if HAS_PREFIX:
        prefix = tl.load(PREFIX + b)
    else:
        prefix = 0

    acc, m_i, l_i = fwd_query_tile(q, k_base, v_base, m0, M_END, N, offs_m, offs_d, skn, skd, svn, svd, prefix,
                                   block_size, qk_scale, HEAD_D, BLOCK_D, BLOCK_M, BLOCK_N, IS_CAUSAL, HAS_PREFIX,
                                   DOT_PRECISION)
    o = acc / l_i[:, None]
    store_rows(o_base, o.to(O.dtype.element_ty), offs_m, M_END, offs_d, son, sod, HEAD_D)
    lse = (m_i + tl.log2(l_i)) * LN2  # back to natural log
    tl.store(LSE + bh.to(tl.int64) * N + offs_m, lse, mask=offs_m < M_END)


@triton.jit
def fwd_tail_query_tile(q, k_base, v_base, m0, n, offs_m, offs_d, skn, skd, svn, svd, prefix, block_size, qk_scale,
                        HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        IS_CAUSAL: tl.constexpr, HAS_PREFIX: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """(acc_t (BLOCK_D, BLOCK_M), m_i, l_i) of a narrow query tile at m0 in key-major form (see
    attn_fwd_tail_kernel); shared by the dense and the varlen forward."""
    full_end, hi = key_bounds(m0, n, prefix, block_size, BLOCK_M, IS_CAUSAL)
    n_full = (full_end // BLOCK_N) * BLOCK_N
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc_t = tl.zeros([BLOCK_D, BLOCK_M], tl.float32)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = load_rows(k_base, offs_n, n, offs_d, skn, skd, HEAD_D, BLOCK_D, True)
        v = load_rows(v_base, offs_n, n, offs_d, svn, svd, HEAD_D, BLOCK_D, True)
        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_N, BLOCK_M)
        if start_n >= n_full:
            vis = visible(offs_m[None, :], offs_n[:, None], n, prefix, block_size, IS_CAUSAL, HAS_PREFIX)
            s_t = tl.where(vis, s_t, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s_t, 0))
        alpha = tl.exp2(m_i - m_new)
        p_t = tl.exp2(s_t - m_new[None, :])
        l_i = l_i * alpha + tl.sum(p_t, 0)
        acc_t = acc_t * alpha[None, :] + tl.dot(tl.trans(v), p_t.to(v.dtype), input_precision=DOT_PRECISION)
        m_i = m_new
    return acc_t, m_i, l_i


@triton.jit
def attn_fwd_tail_kernel(
    Q, K, V, O, LSE, PREFIX,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, son, sod,
    H, N, M_START, block_size, qk_scale,
    HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_PREFIX: tl.constexpr, DOT_PRECISION: tl.constexpr,
    FLAT: tl.constexpr = False,
):
    """The last queries [M_START, N) (fewer than 64), BLOCK_M (16) at a time, in key-major form: S^T = K Q^T
    and O^T += V^T P^T have BLOCK_N key rows and BLOCK_D rows, so a narrow query tile keeps wgmma (a 16-row
    query-major dot would not). One program per (16-query tile, batch * head); the softmax runs down the
    key axis. Same scores, mask and tile classes as attn_fwd_kernel; a flat grid (``flat_program``)."""
    pid_m, bh = flat_program(tl.cdiv(N - M_START, BLOCK_M), FLAT)
    b = bh // H
    b64 = b.to(tl.int64)
    h64 = (bh % H).to(tl.int64)
    k_base = K + b64 * skb + h64 * skh
    v_base = V + b64 * svb + h64 * svh
    m0 = M_START + pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = load_rows(Q + b64 * sqb + h64 * sqh, offs_m, N, offs_d, sqn, sqd, HEAD_D, BLOCK_D, True)
    if HAS_PREFIX:
        prefix = tl.load(PREFIX + b)
    else:
        prefix = 0
    acc_t, m_i, l_i = fwd_tail_query_tile(q, k_base, v_base, m0, N, offs_m, offs_d, skn, skd, svn, svd, prefix,
                                          block_size, qk_scale, HEAD_D, BLOCK_D, BLOCK_M, BLOCK_N, IS_CAUSAL,
                                          HAS_PREFIX, DOT_PRECISION)
    o_t = acc_t / l_i[None, :]
    o_ptrs = O + b64 * sob + h64 * soh + offs_m[None, :] * son + offs_d[:, None] * sod
    tl.store(o_ptrs, o_t.to(O.dtype.element_ty), mask=(offs_m[None, :] < N) & (offs_d[:, None] < HEAD_D))
    lse = (m_i + tl.log2(l_i)) * LN2
    tl.store(LSE + bh.to(tl.int64) * N + offs_m, lse, mask=offs_m < N)
