"""Launch configurations of the attention kernels (kernels/attention_fwd.py, kernels/attention_bwd.py).

``forward(...)``, ``backward_fused(...)`` etc. return a ``Choice`` (kernels/launch_table.py): the kernel,
its candidate configs for the call's family (padded head dim, fp32 or 16-bit, sequence band) and the one
config used under Triton's interpreter. ``aimkern.ops._launch.launch`` decides which of them runs.
Torch-free, so the compile gate (benchmarks/kernel_report.py) can import it with Triton alone.

Hopper (H100 / H200) choices, not yet timed (no GPU run so far), picked from `ptxas -v` register and spill
counts of sm_90a builds: 16-bit inputs use 64-128-row query tiles (wgmma works on 64-row slabs), 32-128 key
columns, 3 pipeline stages; D = 128 shrinks the tiles to stay in registers; D = 256 and fp32 smaller still.
D = 80 / 96 pad to 128 inside the kernel with masked loads: the D = 128 dot width, but no extra memory
traffic.
"""
from __future__ import annotations

import functools

import triton

from .attention_bwd import (
    QUERY_TAIL, attn_bwd_fused_kernel, attn_bwd_key_tail_kernel, attn_bwd_preprocess_kernel, attn_bwd_tiled_kernel,
)
from .attention_fwd import attn_fwd_kernel, attn_fwd_tail_kernel
from .launch_table import Choice, cfg

# The fused one-program-per-head backward holds K, V (16-bit) and dK, dV (fp32) of a whole head on chip, as
# 64-row key tiles: allowed up to this many elements of the key tiles (K_TILES * 64, D), per table arch.
# Compile gate, sm_90a bf16, BLOCK_M = 16 on 8 warps: 3 key tiles at D = 64 take 254 registers, no spill;
# 4 (N = 193..256) spill 280 B (16 warps: 720 B), so those N take the tiled backward. On sm_80 (mma.sync
# accumulators in registers) BLOCK_KV = 128 at D = 64 spilled 320 B: one tile.
FUSED_BWD_MAX_ELEMS = {90: 3 * 64 * 64, 80: 64 * 64}
FUSED_BWD_MAX_ELEMS_FP32 = 1 << 12

# Interpreter tiles (one fixed config per call): 16 up to N = 64, so tests at N = 37 cross several tile
# boundaries and all three tile classes; 64 beyond, since the interpreter's cost grows with the tile count.
INTERPRET_SMALL_TILE, INTERPRET_LARGE_TILE, INTERPRET_SMALL_N = 16, 64, 64
PREPROCESS_BLOCK_M = 64

_KERNELS = {"fwd": attn_fwd_kernel, "bwd": attn_bwd_tiled_kernel}
# Autotuning key (+ input dtypes, added by Triton): tuned once per sequence band, head dim and mask kind.
TUNE_KEY = ("N_BUCKET", "HEAD_D", "IS_CAUSAL", "HAS_PREFIX")
# The tiled backward accumulates into DQ_ACC and counts turns in SEM: the autotuner restores both.
BWD_RESTORE = ("DQ_ACC", "SEM")


# Shared memory each kernel needs at most for a config (Choice.shared: config, the launch's constexprs,
# input element bytes -> bytes): the launch layer keeps the configs that fit the device, and the compile gate
# fails any compile above its estimate. Calibrated on sm_90a builds (sm_80's mma.sync pipelines hold one
# stage less); fp32 inputs hold a second copy of the operand 3xTF32 splits.
def _fwd_shared(c, k: dict, e: int) -> int:
    """Q once, a K and a V tile per pipeline stage."""
    m, n, bd = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], k["BLOCK_D"]
    return e * ((2 if e == 4 else 1) * m * bd + max(1, c.num_stages) * 2 * n * bd)


def _fwd_tail_shared(c, k: dict, e: int) -> int:
    """The forward's, plus the transposed P tile of the key-major PV dot."""
    return _fwd_shared(c, k, e) + e * c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"]


def _bwd_tiled_shared(c, k: dict, e: int) -> int:
    """K, V (and K^T for the dQ share; fp32: each twice more, 3xTF32's splits), the streamed q, do tiles,
    P and dS, and the fp32 dQ^T share."""
    m, n, bd = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], k["BLOCK_D"]
    key_tiles = 6 if e == 4 else 3
    return e * (key_tiles * n * bd + max(1, c.num_stages) * 2 * m * bd + 2 * m * n) + 4 * m * bd


def _key_tail_shared(c, k: dict, e: int) -> int:
    """q, do per pipeline stage, the tail's K, V, and the fp32 dQ share of a query tile."""
    m, kt, bd = c.kwargs["BLOCK_M"], c.kwargs["KEY_TILE"], k["BLOCK_D"]
    return e * (max(1, c.num_stages) * 2 * m * bd + 2 * kt * bd) + 4 * m * bd + 1024


def _fused_shared(c, k: dict, e: int) -> int:
    """K, V of every key tile, q, do of a query tile per stage, P and dS of one key tile, the fp32 dQ tile."""
    m, kv, bd = c.kwargs["BLOCK_M"], c.kwargs["KV_TILE"], k["BLOCK_D"]
    return e * (2 * k["K_TILES"] * kv * bd + max(1, c.num_stages) * 2 * m * bd + 2 * kv * m) + 4 * m * bd


_SHARED = {"fwd": _fwd_shared, "bwd": _bwd_tiled_shared}


def _interpret_tile(n: int) -> int:
    return INTERPRET_SMALL_TILE if n <= INTERPRET_SMALL_N else INTERPRET_LARGE_TILE


def block_d(head_dim: int) -> int:
    """Head dim padded to a power of two (>= 16, the smallest tl.dot width)."""
    return max(16, triton.next_power_of_2(head_dim))


def band(n: int) -> str:
    return "short" if n <= 256 else "long"


# Config tables: (BLOCK_M, BLOCK_N, num_warps, num_stages), two per family at most (each is a compile the
# first time a family is met). Keys: (padded head dim 64 | 128 | 256, fp32, band or None for any band).
# BLOCK_M x BLOCK_N is (query, key) for both kernels. Every 16-bit entry passes the compile gate
# (benchmarks/kernel_report.py): no spill, and wgmma on sm_90a, which needs 64-row accumulator slabs: a
# 32-row BLOCK_M (fwd) or BLOCK_N (bwd) falls back to mma.sync, so such entries were dropped.
FWD_TABLE = {
    # Short band: 64-row query tiles only. A 128-row tile issued 1.49x the visible work at N = 256 causal
    # (its diagonal block is 128 x 128) and 2.33x at N = 196, where rows 192-255 of its second query tile
    # are padding (benchmarks/kernel_cost.py counts every config of a table against the budgets).
    (64, False, "short"): [(64, 64, 4, 3)],
    # 128 x 64 runs 8 warps: on 4 it spills 8-56 B beside the forward's key-tail loop (sm_90a and sm_80).
    (64, False, "long"): [(128, 64, 8, 3), (128, 128, 8, 3)],
    (128, False, "short"): [(64, 64, 4, 3)],
    (128, False, "long"): [(128, 64, 8, 3), (128, 32, 8, 3)],
    (256, False, None): [(64, 32, 8, 2), (64, 16, 4, 2)],
    (64, True, None): [(128, 64, 8, 2), (64, 32, 4, 2)],
    (128, True, None): [(64, 32, 8, 1), (32, 16, 4, 2)],
    (256, True, None): [(64, 32, 8, 1)],
}
BWD_TABLE = {  # tiled backward: BLOCK_N key rows hold the fp32 dK, dV accumulators; BLOCK_M is the streamed
    # query tile, whose dQ^T share (BLOCK_D x BLOCK_M) is one more accumulator tile per step. Compile gate,
    # sm_90a bf16 with every mask flag: D = 64 (64, 128, 8, 3) spills 24 B, D = 128 (32, 64, 8, *) 24 B and
    # (64, 64, 8, 2) 432 B, D = 256 with 64 key rows 2.8-4.3 KB (8 or 16 warps): D = 256 runs 32 key rows
    # (mma.sync for four of its five dots; its dQ^T dot keeps wgmma).
    (64, False, "short"): [(64, 64, 4, 3)],  # 64-key tiles halve the diagonal's waste of 128 (cost report)
    (64, False, None): [(32, 128, 8, 3), (64, 64, 4, 3)],
    (128, False, None): [(16, 64, 8, 3)],
    (256, False, None): [(16, 32, 8, 1)],
    (64, True, None): [(16, 64, 4, 2), (32, 32, 4, 2)],
    (128, True, None): [(32, 32, 8, 1)],
    (256, True, None): [(32, 32, 8, 1)],
}
# Ampere (sm_80): mma.sync keeps accumulators in registers, so the Hopper tiles that spill there get these.
FWD_TABLE_SM80 = {  # Hopper's 64 x 64 and 128 x 64 tiles at D = 128 spill 8-20 B on sm_80
    (128, False, None): [(64, 32, 4, 3), (128, 32, 8, 2)],
}
BWD_TABLE_SM80 = {  # sm_80 computes the dQ share query-major (DQ_KEY_MAJOR off: K^T at D = 256 spilled 27 KB);
    # Hopper's 64 x 128 on 8 warps spills 16-32 B here
    (64, False, None): [(32, 128, 8, 3), (32, 64, 4, 2)],
    # The second entries fit 99 KB of shared memory per block (sm_86 / sm_89 / sm_120 also take these
    # tables): the launch layer drops the first there (aimkern.ops._launch.fit_to_device).
    (256, False, None): [(16, 64, 8, 2), (16, 32, 8, 1)],
    (128, True, None): [(32, 32, 8, 1), (16, 16, 4, 1)],
}
TABLES = {90: {"fwd": FWD_TABLE, "bwd": BWD_TABLE}, 80: {"fwd": FWD_TABLE_SM80, "bwd": BWD_TABLE_SM80}}


def table_entries(kind: str, bd: int, fp32: bool, n_band: str, arch: int = 90) -> list:
    """(BLOCK_M, BLOCK_N, warps, stages) candidates of one family on a table arch (90 or 80)."""
    width = 64 if bd <= 64 else bd
    for table in ((TABLES[80][kind], TABLES[90][kind]) if arch == 80 else (TABLES[90][kind],)):
        entries = table.get((width, fp32, n_band)) or table.get((width, fp32, None))
        if entries:
            return entries
    raise KeyError((kind, width, fp32, n_band))


def least_padding(entries, rows: int, tile_of) -> tuple:
    """The entries whose tiles (``tile_of(entry)`` rows each) pad ``rows`` rows least, in table order.

    Pruned by N before any autotuning: a config that pads more rows than another candidate issues more work
    for the same result (the 128-row forward tile at N = 196 covered queries 128-255 for 64 real ones), so
    neither the autotuner nor a fixed pick may run it."""
    pad = [-(-rows // tile_of(e)) * tile_of(e) - rows for e in entries]
    return tuple(e for e, p in zip(entries, pad) if p == min(pad))


@functools.lru_cache(maxsize=None)
def _choice(kind: str, entries: tuple, tile: int) -> Choice:
    configs = tuple(cfg(w, st, BLOCK_M=m, BLOCK_N=bn) for m, bn, w, st in entries)
    restore = BWD_RESTORE if kind == "bwd" else ()
    return Choice(_KERNELS[kind], configs, cfg(4, 1, BLOCK_M=tile, BLOCK_N=tile), key=TUNE_KEY, restore=restore,
                  shared=_SHARED[kind])


def forward(head_dim: int, fp32: bool, n: int, arch: int = 90) -> Choice:
    """attn_fwd_kernel; flat grid (cdiv(M_END, BLOCK_M) * B * H,), query tiles fastest, over the queries
    [0, M_END = query_tail_start(n)) (the configs that pad those rows least)."""
    entries = table_entries("fwd", block_d(head_dim), fp32, band(n), arch)
    return _choice("fwd", least_padding(entries, query_tail_start(n), lambda e: e[0]), _interpret_tile(n))


BWD_QUERY_TAIL = QUERY_TAIL.value  # the tiled backward's tail query tile (rows)

# The forward's last N % 64 queries (when N > 64) run in 16-row key-major tiles (attn_fwd_tail_kernel):
# 196 = 3 x 64 + 4 pads the head to 208 query rows, not 256.
QUERY_TAIL_QUANTUM = 64
TAIL_BLOCK_M = 16


def query_tail_start(n: int) -> int:
    """First query of the forward's tail launch (== n when there is none)."""
    split = (n // QUERY_TAIL_QUANTUM) * QUERY_TAIL_QUANTUM
    return n if split == 0 or split == n else split


@functools.lru_cache(maxsize=None)
def _tail_choice(bd: int, fp32: bool) -> Choice:
    # 64 key rows: wgmma's slab height (fp32: 32, as its table). 4 warps: one warpgroup for 16 query columns.
    # D = 256 without a second stage: two stages of 64 x 256 K and V tiles need 138 KB, over the 99 KB of a
    # consumer GPU's block (the tail is at most 63 queries: its pipeline hardly matters).
    block_n = 32 if fp32 else 64
    stages = 1 if bd >= 256 else 2
    return Choice(attn_fwd_tail_kernel, (cfg(4, stages, BLOCK_M=TAIL_BLOCK_M, BLOCK_N=block_n),),
                  cfg(4, 1, BLOCK_M=TAIL_BLOCK_M, BLOCK_N=16), shared=_fwd_tail_shared)


def forward_tail(head_dim: int, fp32: bool) -> Choice:
    """attn_fwd_tail_kernel; flat grid (cdiv(N - M_START, BLOCK_M) * B * H,)."""
    return _tail_choice(block_d(head_dim), fp32)


# The tiled backward's last N % 64 keys, when at most KEY_TAIL_MAX of them, run in one narrow query-major
# key tile (attn_bwd_key_tail_kernel): 196 = 3 x 64 + 4 pays for 16 tail keys, not 64.
KEY_TAIL_QUANTUM = 64
KEY_TAIL_MAX = 32


def key_tail(n: int, head_dim: int) -> tuple:
    """(K_END, KEY_TILE) of the tiled backward: keys [K_END, n) go to the key-tail kernel in one tile of
    KEY_TILE (16 or 32) keys; KEY_TILE 0 (and K_END == n) when there is no tail. Not at D = 256, where the
    kernel's 64 x 256 dQ share spills (676 B on sm_90a)."""
    k_end = (n // KEY_TAIL_QUANTUM) * KEY_TAIL_QUANTUM
    rest = n - k_end
    if k_end == 0 or rest == 0 or rest > KEY_TAIL_MAX or block_d(head_dim) > 128:
        return n, 0
    return k_end, max(16, triton.next_power_of_2(rest))


@functools.lru_cache(maxsize=None)
def _key_tail_choice(bd: int, fp32: bool, key_tile: int, arch: int) -> Choice:
    # 64 query rows: wgmma's slab height for S, dP and the dQ share. sm_80 (mma.sync, accumulators in
    # registers) spills 2-9 KB with them at D = 128: 16 rows there.
    block_m = 32 if fp32 else (64 if arch >= 90 or bd <= 64 else 16)
    return Choice(attn_bwd_key_tail_kernel, (cfg(4, 2, BLOCK_M=block_m, KEY_TILE=key_tile),),
                  cfg(4, 1, BLOCK_M=16, KEY_TILE=key_tile), shared=_key_tail_shared)


def backward_key_tail(head_dim: int, fp32: bool, key_tile: int, arch: int = 90) -> Choice:
    """attn_bwd_key_tail_kernel; grid (B * H,)."""
    return _key_tail_choice(block_d(head_dim), fp32, key_tile, arch)


def backward_tiled(head_dim: int, fp32: bool, n: int, arch: int = 90) -> Choice:
    """attn_bwd_tiled_kernel; flat grid (cdiv(K_END, BLOCK_N) * B * H,) over the keys [0, K_END) (``key_tail``;
    the configs that pad those rows least); DQ_ACC (B * H, N, D) fp32 and SEM (B * H, cdiv(N, BWD_QUERY_TAIL))
    int32 (at least one per query tile of any config), zeroed by the launcher."""
    entries = table_entries("bwd", block_d(head_dim), fp32, band(n), arch)
    k_end = key_tail(n, head_dim)[0]
    return _choice("bwd", least_padding(entries, k_end, lambda e: e[1]), _interpret_tile(n))


@functools.lru_cache(maxsize=None)
def backward_preprocess() -> Choice:
    """attn_bwd_preprocess_kernel (delta = rowsum(o * do)); flat grid (cdiv(N, BLOCK_M) * B * H,)."""
    return Choice(attn_bwd_preprocess_kernel, (cfg(4, 1, BLOCK_M=PREPROCESS_BLOCK_M),), cfg(4, 1, BLOCK_M=16))


# The fused backward's key tiles: 64 rows on the GPU (wgmma's slab height); under the interpreter a quarter of
# the padded head, so small test shapes cross several key tiles. At most FUSED_MAX_KEY_TILES of them: the
# kernel unrolls k0..k3 by hand.
FUSED_KV_TILE = 64
FUSED_MAX_KEY_TILES = 4


def fused_key_tile_count(n: int, kv_tile: int = FUSED_KV_TILE) -> int:
    """The one rule of how many key tiles the fused backward runs for N keys: cdiv(N, kv_tile), or 0 where
    that is more than the kernel's FUSED_MAX_KEY_TILES. Both the path choice (``fused_backward_fits``) and
    the launch (``fused_key_tiles``) go through it, so a head the choice accepts always launches."""
    tiles = -(-n // kv_tile)
    return tiles if tiles <= FUSED_MAX_KEY_TILES else 0


def fused_backward_fits(head_dim: int, fp32: bool, n: int, arch: int = 90) -> bool:
    """Whether the one-program-per-head backward applies on a GPU of table arch ``arch``: the head takes at
    most FUSED_MAX_KEY_TILES 64-row key tiles, and their (tiles * 64, BLOCK_D) elements fit the arch's
    on-chip budget. (The budget alone took 6 tiles at D = 32 and 12 at D = 16 on sm_90: N up to 384 / 768.)"""
    tiles = fused_key_tile_count(n)
    limit = FUSED_BWD_MAX_ELEMS_FP32 if fp32 else FUSED_BWD_MAX_ELEMS[arch]
    return tiles > 0 and tiles * FUSED_KV_TILE * block_d(head_dim) <= limit


@functools.lru_cache(maxsize=None)
def _fused_choice(bd: int, fp32: bool, block_kv: int, tile: int) -> Choice:
    # dK, dV of the K_TILES key tiles (K_TILES x 64 x BLOCK_D fp32) are the accumulators of the kernel's
    # wgmma dots and stay in registers beside the (64, BLOCK_M) score tiles of one key tile at a time.
    block_m = 16  # 32 query rows spill beside three key tiles (compile gate)
    return Choice(
        attn_bwd_fused_kernel,
        (cfg(8, 1, BLOCK_M=block_m, KV_TILE=FUSED_KV_TILE),),
        cfg(4, 1, BLOCK_M=tile, KV_TILE=max(16, block_kv // FUSED_MAX_KEY_TILES)),
        shared=_fused_shared,
    )


def backward_fused(head_dim: int, fp32: bool, n: int) -> Choice:
    """attn_bwd_fused_kernel; grid (B * H,); constexpr K_TILES = cdiv(N, KV_TILE) <= 4 (``fused_key_tiles``)."""
    return _fused_choice(block_d(head_dim), fp32, max(16, triton.next_power_of_2(n)), _interpret_tile(n))


def fused_key_tiles(n: int, config) -> int:
    """K_TILES of the fused backward for N keys under ``config`` (its KV_TILE): ``fused_key_tile_count``,
    refused with a ValueError where that rule says no."""
    kv_tile = config.kwargs["KV_TILE"]
    tiles = fused_key_tile_count(n, kv_tile)
    if not tiles:
        raise ValueError(f"fused attention backward: N={n} needs {-(-n // kv_tile)} key tiles of {kv_tile}, "
                         f"more than {FUSED_MAX_KEY_TILES}")
    return tiles
