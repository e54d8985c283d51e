"""Cost report: the work the real kernels issue, counted on CPU, against each op's exact minimum.

The CPU stand-in for a profiler. Every launcher runs for real under Triton's interpreter with the configs
the GPU would run (the sm_90a tables, autotuning off: ``aimkern.ops._launch.gpu_configs``), while
``aimkern.ops._counting.count_work`` adds up each kernel's ``tl.dot`` multiply-adds (M x N x K) and the
global-memory bytes its loads, stores and atomics request (masked-off elements excluded). Work that is
linear in the batch (B * H heads, B images, T tokens) is counted on a small batch and scaled.

Counted by phase: the forward call and ``backward()`` each in their own block, so a kernel counts where it
runs, whatever its name. Counted for every config a table may hand the autotuner: the problem runs once per
config index (``gpu_configs(i)``), and each kernel keeps its largest counts over those runs, so a budget
holds for whichever config the autotuner picks (``worst_over_configs``).

Exact minimums (V = visible (query, key) pairs of the mask, e = element bytes):
  attention forward   2 V D MACs;  bytes: q, k, v read once, o written once (+ the fp32 logsumexp)
  attention backward  5 V D MACs;  bytes: q, k, v, o, do read once, dq, dk, dv written once (+ lse)
  linear + CE         1 GEMM (T E V) without grad, 3 with (logits, d input, d weight); bytes: x, W, b read
  patch embed         one GEMM forward, one for d weight (d images when they need it)
  pixel loss          no GEMM; pred and images read once, d pred written once
  varlen attention    the same 2 V D / 5 V D, V summed over the pack's images (aimkern.varlen.cost counts
                      the tiles from the lengths; tests/test_attention_varlen_cost.py holds it equal to the
                      interpreter's count)

The design floor is ``max(MACs / 765 TFLOP/s, bytes / 4.2 TB/s)`` on the H200's measured ceilings: a
bound, never a prediction (no kernel reaches either ceiling, and the two overlap imperfectly). Attention
prints it twice, with each tensor moved once and with every requested byte; the GEMM-like ops use each
operand once (a tiled GEMM re-reads its operands from L2 by design; the requested multiple is printed
beside it). It stands beside the peers' fwd+bwd times measured on the H200 (benchmarks/RESULTS.md).

    python benchmarks/kernel_cost.py                 # every op at the benchmark shapes
    python benchmarks/kernel_cost.py --check         # also fail (exit 1) on any budget exceeded
    python benchmarks/kernel_cost.py --quick --check # the CI subset (N <= 1024)
    python benchmarks/kernel_cost.py --json out.json
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

os.environ["TRITON_INTERPRET"] = "1"  # the counts come from the interpreter, also on a GPU machine

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cost_budgets import BUDGETS, check_row  # noqa: E402

import aimkern  # noqa: E402
from aimkern.ops import launch_policy  # noqa: E402
from aimkern.ops._counting import WorkCount, count_work  # noqa: E402
from aimkern.ops._launch import gpu_configs, observe  # noqa: E402
from aimkern.reference.attention import attention_mask  # noqa: E402

MATMUL_TFLOPS = 765.0  # H200, bf16 dense matmul (benchmarks/RESULTS.md, "Ceilings and peers")
COPY_GBPS = 4200.0
H = 12
ATTN_SHAPES = [(256, 256, 64), (256, 196, 64), (64, 1024, 64), (16, 4096, 64), (64, 1024, 128)]
QUICK_ATTN_SHAPES = [(256, 256, 64), (256, 196, 64), (64, 1024, 64), (64, 1024, 128)]
MASKS = ("full", "causal", "prefix", "block")
# Peers' fwd+bwd ms on the H200 (bf16, H = 12; benchmarks/RESULTS.md): the best measured path per mask.
PEERS = {
    (256, 256, 64): {"causal": ("cuDNN", 0.969), "prefix": ("Flex", 1.246), "block": ("Flex", 1.197)},
    (256, 196, 64): {"causal": ("cuDNN", 0.867), "prefix": ("SDPA mask", 1.286), "block": ("Flex", 1.658)},
    (64, 1024, 64): {"causal": ("cuDNN", 1.529), "prefix": ("Flex", 2.323), "block": ("Flex", 1.978)},
    (16, 4096, 64): {"causal": ("cuDNN", 3.933), "prefix": ("Flex", 6.996), "block": ("Flex", 5.187)},
    (64, 1024, 128): {"causal": ("cuDNN", 2.471), "prefix": ("Flex", 3.713), "block": ("Flex", 3.150)},
}


def mask_options(mask: str, n: int) -> dict:
    """aimkern.attention keywords of one mask mode: prefix = N // 2 (AIM's mean), block = the grid width."""
    if mask == "full":
        return {}
    if mask == "causal":
        return dict(is_causal=True)
    if mask == "prefix":
        return dict(is_causal=True, prefix_len=n // 2)
    if mask == "block":
        return dict(is_causal=True, block_size=max(1, math.isqrt(n)))
    raise ValueError(mask)


def visible_pairs(n: int, opts: dict) -> int:
    mask = attention_mask(n, is_causal=opts.get("is_causal", False), block_size=opts.get("block_size", 1),
                          prefix_len=torch.tensor([opts["prefix_len"]]) if "prefix_len" in opts else None)
    return int(mask.sum())


def _keep_worst(into: WorkCount, work: WorkCount) -> None:
    """Fold ``work`` into ``into`` keeping, per kernel, the largest of each count (launches, dots, MACs, bytes)."""
    for name, k in work.kernels.items():
        w = into.kernels[name]
        for f in ("launches", "dots", "macs", "load_bytes", "store_bytes"):
            setattr(w, f, max(getattr(w, f), getattr(k, f)))


def worst_over_configs(step) -> tuple:
    """Run ``step`` (no arguments -> one ``WorkCount`` per phase, each from its own ``count_work()`` block)
    once per config index of the Choices it launches (``gpu_configs(i)``: a table with fewer configs repeats
    its last). Returns (per phase, a WorkCount holding each kernel's largest counts over the runs; the
    runs' per-phase WorkCounts, by config index). A kernel's work depends on its own config only, so the
    sum of the kernels' maxima is the work of the worst combination the autotuner may pick."""
    worst, runs, i, n = None, [], 0, 1
    while i < n:
        with gpu_configs(i), observe() as launches:
            phases = step()
        n = max([n] + [len(launch.choice.configs) for launch in launches])
        worst = worst or [WorkCount() for _ in phases]
        for into, work in zip(worst, phases):
            _keep_worst(into, work)
        runs.append(phases)
        i += 1
    return worst, runs


def _total(phases) -> WorkCount:
    """One WorkCount of several phases' (a kernel launched in two phases adds up)."""
    total = WorkCount()
    for work in phases:
        for name, k in work.kernels.items():
            t = total.kernels[name]
            for f in ("launches", "dots", "macs", "load_bytes", "store_bytes"):
                setattr(t, f, getattr(t, f) + getattr(k, f))
    return total


def backward_paths(n: int, d: int) -> list:
    """(label, LaunchPolicy changes, attention kwargs) of each backward path that applies at (N, D)."""
    from aimkern.kernels import attention as kern

    fits = kern.fused_backward_fits(d, False, n, 90)
    paths = [("split", dict(attention_backward="split"), {}, not fits)]
    if fits or n <= 256:  # the fused kernel where it fits on chip (the default), else to show what it would do
        paths.insert(0, ("fused", dict(attention_backward="fused"), {}, fits))
    paths.append(("split nondet", dict(attention_backward="split"), dict(deterministic=False), False))
    return paths


def _supports_deterministic() -> bool:
    import inspect

    return "deterministic" in inspect.signature(aimkern.attention).parameters


def attention_row(b: int, n: int, d: int, mask: str, path: str = "split", policy: dict = None,
                  extra: dict = None, default: bool = True) -> dict:
    """One report row: (B, H = 12, N, D) attention with ``mask``, forward and backward counted apart, each
    at the worst of the configs its tables hold (counted on one head, scaled to B * H)."""
    policy, extra = policy or dict(attention_backward=path), extra or {}
    heads, e = b * H, 2  # fp16 / bf16
    opts = mask_options(mask, n)
    vis = visible_pairs(n, opts)

    def step():
        gen = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, 1, n, d, generator=gen, dtype=torch.float16).requires_grad_() for _ in range(3))
        do = torch.randn(1, 1, n, d, generator=gen, dtype=torch.float16)
        with launch_policy(autotune=False, **policy):
            with count_work() as fwd_work:
                o = aimkern.attention(q, k, v, backend="triton", **opts, **extra)
            with count_work() as bwd_work:
                o.backward(do)
        return fwd_work, bwd_work

    t0 = time.perf_counter()
    (fwd_work, bwd_work), runs = worst_over_configs(step)
    secs = time.perf_counter() - t0
    min_fwd_macs, min_bwd_macs = 2 * vis * d, 5 * vis * d
    min_fwd_bytes = 4 * n * d * e + 4 * n
    min_bwd_bytes = 8 * n * d * e + 4 * n
    fwd, bwd = fwd_work.of(*fwd_work.kernels), bwd_work.of(*bwd_work.kernels)
    peer = PEERS.get((b, n, d), {}).get(mask)
    return dict(
        op="attention", shape=f"B={b} N={n} D={d}", mask=mask, path=path, default=default, heads=heads,
        kernels=sorted(set(fwd_work.kernels) | set(bwd_work.kernels)), interp_s=round(secs, 2),
        fwd_kernels=sorted(fwd_work.kernels), bwd_kernels=sorted(bwd_work.kernels), configs=len(runs),
        fwd_x_by_config=[round(f.macs / min_fwd_macs, 4) for f, _ in runs],
        bwd_x_by_config=[round(w.macs / min_bwd_macs, 4) for _, w in runs],
        fwd_macs=fwd.macs * heads, fwd_x=fwd.macs / min_fwd_macs,
        bwd_macs=bwd.macs * heads, bwd_x=bwd.macs / min_bwd_macs,
        fwd_bytes=fwd.bytes * heads, fwd_bytes_x=fwd.bytes / min_fwd_bytes,
        bwd_bytes=bwd.bytes * heads, bwd_bytes_x=bwd.bytes / min_bwd_bytes,
        floor_ms=floor_ms((fwd.macs + bwd.macs) * heads, (fwd.bytes + bwd.bytes) * heads),
        floor_min_ms=floor_ms((fwd.macs + bwd.macs) * heads, (min_fwd_bytes + min_bwd_bytes) * heads),
        peer=f"{peer[0]} {peer[1]:.3f}" if peer else "-", n=n, d=d,
    )


def attention_rows(shapes) -> list:
    rows = []
    for b, n, d in shapes:
        for mask in MASKS:
            for path, policy, extra, default in backward_paths(n, d):
                if extra and not _supports_deterministic():
                    continue
                rows.append(attention_row(b, n, d, mask, path, policy, extra, default))
    return rows


def cross_entropy_rows(t_count: int = 256) -> list:
    """The 8192-way head on 65,536 tokens x 768, counted on ``t_count`` tokens and scaled (linear in T)."""
    t_real, e, v = 65536, 768, 8192
    rows = []
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(t_count, e, generator=gen) * 0.5).half()
    w = (torch.randn(v, e, generator=gen) * 0.05).half()
    tgt = torch.randint(0, v, (t_count,), generator=gen)
    gemm = t_count * e * v
    for grad in (False, True):
        def step():
            xs, ws = x.clone().requires_grad_(grad), w.clone().requires_grad_(grad)
            with launch_policy(autotune=False), torch.set_grad_enabled(grad):
                with count_work() as fwd_work:
                    loss = aimkern.linear_cross_entropy(xs, ws, tgt, backend="triton")
                with count_work() as bwd_work:
                    if grad:
                        loss.backward()
            return fwd_work, bwd_work

        work = _total(worst_over_configs(step)[0])
        scale = t_real / t_count
        min_bytes = (t_count * e + v * e) * 2 + t_count * 8 + ((t_count * e + v * e) * 2 if grad else 0)
        rows.append(dict(
            op="linear_cross_entropy", shape=f"T={t_real} E={e} V={v}", mask="-", path="fwd+bwd" if grad else "no grad",
            kernels=sorted(work.kernels), gemm_equiv=work.macs / gemm, macs=int(work.macs * scale),
            bytes=int(work.bytes * scale), bytes_x=work.bytes / min_bytes,
            floor_ms=floor_ms(work.macs * scale, min_bytes * scale),  # tiled GEMMs re-read operands from L2
            peer="compiled 5.100" if grad else "-",
        ))
    return rows


def patch_embed_rows(b_count: int = 32) -> list:
    """ViT-B/16 patch embedding of 256 images at 224 px, counted on ``b_count`` images and scaled (32 x 196
    rows are a whole number of 128-row tiles, as 256 x 196 are)."""
    b_real, c, img, p, e = 256, 3, 224, 16, 768
    n = (img // p) ** 2
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(b_count, c, img, img, generator=gen).half()
    weight = (torch.randn(e, c, p, p, generator=gen) * 0.02).half().requires_grad_()
    bias = torch.zeros(e, dtype=torch.float16, requires_grad=True)
    pos = (torch.randn(n, e, generator=gen) * 0.02).half().requires_grad_()
    grad = torch.randn(b_count, n, e, generator=gen).half()

    def step():
        with launch_policy(autotune=False):
            with count_work() as fwd_work:
                out = aimkern.patch_embed(images, weight, bias, pos, backend="triton")
            with count_work() as bwd_work:
                out.backward(grad)
        return fwd_work, bwd_work

    work = _total(worst_over_configs(step)[0])
    gemm = b_count * n * e * c * p * p
    min_bytes = (images.numel() + weight.numel() + pos.numel() + b_count * n * e * 2 + weight.numel() + e
                 + pos.numel()) * 2
    scale = b_real / b_count
    return [dict(
        op="patch_embed", shape=f"B={b_real} 224px P={p} E={e}", mask="-", path="fwd+bwd (no d images)",
        kernels=sorted(work.kernels), gemm_equiv=work.macs / gemm, macs=int(work.macs * scale),
        bytes=int(work.bytes * scale), bytes_x=work.bytes / min_bytes,
        floor_ms=floor_ms(work.macs * scale, min_bytes * scale), peer="unfold+linear 0.880",
    )]


def pixel_loss_rows(b_count: int = 2) -> list:
    """AIM-600M's pixel loss (batch 64, 224 px, P = 14), counted on ``b_count`` images and scaled."""
    b_real, c, img, p = 64, 3, 224, 14
    n = (img // p) ** 2
    gen = torch.Generator().manual_seed(0)
    pred = torch.randn(b_count, n, p * p * c, generator=gen).half().requires_grad_()
    images = torch.randn(b_count, c, img, img, generator=gen).half()
    def step():
        with launch_policy(autotune=False):
            with count_work() as fwd_work:
                loss = aimkern.next_patch_pixel_loss(pred, images, patch_size=p, prefix_len=n // 2, backend="triton")
            with count_work() as bwd_work:
                loss.backward()
        return fwd_work, bwd_work

    work = _total(worst_over_configs(step)[0])
    min_bytes = (pred.numel() * 2 + images.numel()) * 2  # pred, images read once; d pred written once
    scale = b_real / b_count
    return [dict(
        op="next_patch_pixel_loss", shape=f"B={b_real} 224px P={p}", mask="prefix", path="fwd+bwd",
        kernels=sorted(work.kernels), gemm_equiv=0.0, macs=int(work.macs * scale), bytes=int(work.bytes * scale),
        bytes_x=work.bytes / min_bytes, floor_ms=floor_ms(work.macs * scale, work.bytes * scale), peer="-",
    )]


# A native-resolution mix (issue 29): 60 % 4:3 landscape, 20 % 3:4 portrait, 10 % square, 10 % 16:9, long
# side uniform in 200-1000 px, patch 16, each image scaled down at its aspect ratio to at most `budget` patches.
NATIVE_ASPECTS = ((0.6, 4 / 3), (0.2, 3 / 4), (0.1, 1.0), (0.1, 16 / 9))
NATIVE_BUDGETS = (256, 576, 1024)


def native_mix_grids(count: int, budget: int, seed: int = 0, patch: int = 16) -> list:
    """(h, w) patch grids of ``count`` images of the mix, drawn from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    grids = []
    for _ in range(count):
        u = float(torch.rand((), generator=gen))
        aspect = next((a for p_cum, a in _cumulative(NATIVE_ASPECTS) if u < p_cum), NATIVE_ASPECTS[-1][1])
        long_side = 200 + 800 * float(torch.rand((), generator=gen))
        w_px, h_px = (long_side, long_side / aspect) if aspect >= 1 else (long_side * aspect, long_side)
        shrink = min(1.0, math.sqrt(budget / max(1.0, (w_px / patch) * (h_px / patch))))
        h, w = max(1, int(h_px * shrink / patch)), max(1, int(w_px * shrink / patch))
        grids.append((h, w))
    return grids


def _cumulative(weights) -> list:
    out, acc = [], 0.0
    for p_share, value in weights:
        acc += p_share
        out.append((acc, value))
    return out


def attention_varlen_rows(count: int = 64, d: int = 64) -> list:
    """Packs of ``count`` images of the native mix at each patch budget: the work the varlen kernels issue
    (sm_90a configs, 16-bit, per head) against the pack's minimum, for full attention, token-causal,
    row-causal (block = the grid width) and AIM's prefix (sampled in [1, n - 1]) on row-causal."""
    from aimkern.varlen.cost import varlen_attention_cost

    rows = []
    for budget in NATIVE_BUDGETS:
        grids = native_mix_grids(count, budget)
        lengths = [h * w for h, w in grids]
        gen = torch.Generator().manual_seed(budget)
        prefixes = [int(torch.randint(1, max(2, n), (1,), generator=gen)) for n in lengths]
        widths = [w for _, w in grids]
        for mask, opts in (("full", {}), ("causal", dict(is_causal=True)),
                           ("rows", dict(is_causal=True, block_size=widths)),
                           ("prefix", dict(is_causal=True, block_size=widths, prefix_len=prefixes))):
            c = varlen_attention_cost(lengths, head_dim=d, **opts)
            rows.append(dict(
                op="attention_varlen", shape=f"mix{budget} S={count} T={sum(lengths)} D={d}", mask=mask,
                path="fwd+bwd", kernels=["attn_varlen_*"], fwd_x=c.fwd_x, bwd_x=c.bwd_x, total_x=c.total_x,
                gemm_equiv=c.total_x, bytes_x=float("nan"), floor_ms=float("nan"), peer="-",
            ))
    return rows


def floor_ms(macs: float, nbytes: float) -> float:
    return max(2 * macs / (MATMUL_TFLOPS * 1e12), nbytes / (COPY_GBPS * 1e9)) * 1e3


def print_tables(rows: list) -> None:
    print("Issued work per kernel family, counted under Triton's interpreter with the sm_90a configs (forward")
    print("and backward apart, each kernel at the worst of the configs its table may hand the autotuner), as")
    print("multiples of the exact minimum. Floor = max(MACs / 765 TFLOP/s, bytes / 4.2 TB/s) on the H200, with")
    print("each tensor moved once ('floor ms') and with every requested byte from DRAM ('(req B)'; re-reads")
    print("of q / do and dQ atomics mostly hit L2, so the truth lies between): a bound, never a prediction.")
    print("Peers: fwd+bwd ms measured on the H200 (benchmarks/RESULTS.md).\n")
    attn = [r for r in rows if r["op"] == "attention"]
    if attn:
        head = (f"{'shape':<20} {'mask':<7} {'bwd path (*: default)':<22} {'cfgs':>4} {'fwd x':>6} {'bwd x':>6} "
                f"{'bwd bytes x':>11} "
                f"{'fwd+bwd GFLOP':>13} {'req GB':>6} {'floor ms':>8} {'(req B)':>8}  peer ms")
        print(head)
        print("-" * len(head))
        for r in attn:
            gflop = 2 * (r["fwd_macs"] + r["bwd_macs"]) / 1e9
            gb = (r["fwd_bytes"] + r["bwd_bytes"]) / 1e9
            path = r["path"] + (" *" if r["default"] else "")
            print(f"{r['shape']:<20} {r['mask']:<7} {path:<22} {r['configs']:>4} {r['fwd_x']:>6.2f} {r['bwd_x']:>6.2f} "
                  f"{r['bwd_bytes_x']:>11.2f} {gflop:>13.1f} {gb:>6.2f} {r['floor_min_ms']:>8.3f} {r['floor_ms']:>8.3f}"
                  f"  {r['peer']}")
        print()
    varlen = [r for r in rows if r["op"] == "attention_varlen"]
    if varlen:
        head = f"{'varlen pack (per head)':<34} {'mask':<7} {'fwd x':>6} {'bwd x':>6} {'fwd+bwd x':>9}"
        print(head)
        print("-" * len(head))
        for r in varlen:
            print(f"{r['shape']:<34} {r['mask']:<7} {r['fwd_x']:>6.3f} {r['bwd_x']:>6.3f} {r['total_x']:>9.3f}")
        print()
    other = [r for r in rows if r["op"] not in ("attention", "attention_varlen")]
    if other:
        head = f"{'op':<22} {'shape':<24} {'path':<24} {'GEMM-equiv':>10} {'bytes x':>8} {'floor ms':>8}  peer ms"
        print(head)
        print("-" * len(head))
        for r in other:
            print(f"{r['op']:<22} {r['shape']:<24} {r['path']:<24} {r['gemm_equiv']:>10.2f} {r['bytes_x']:>8.2f} "
                  f"{r['floor_ms']:>8.3f}  {r['peer']}")
        print()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="CI subset: attention shapes with N <= 1024")
    ap.add_argument("--check", action="store_true", help="exit 1 when any budget (cost_budgets.py) is exceeded")
    ap.add_argument("--op", nargs="*", default=None,
                    choices=["attention", "attention_varlen", "linear_cross_entropy", "patch_embed",
                             "next_patch_pixel_loss"])
    ap.add_argument("--json", default=None, help="write every row to this file")
    args = ap.parse_args(argv)
    ops = set(args.op or ["attention", "attention_varlen", "linear_cross_entropy", "patch_embed",
                          "next_patch_pixel_loss"])
    t0 = time.perf_counter()
    rows = []
    if "attention" in ops:
        rows += attention_rows(QUICK_ATTN_SHAPES if args.quick else ATTN_SHAPES)
    if "attention_varlen" in ops:
        rows += attention_varlen_rows()
    if "linear_cross_entropy" in ops:
        rows += cross_entropy_rows()
    if "patch_embed" in ops:
        rows += patch_embed_rows()
    if "next_patch_pixel_loss" in ops:
        rows += pixel_loss_rows()
    print_tables(rows)
    failures = [msg for r in rows for msg in check_row(r)]
    print(f"{len(rows)} rows in {time.perf_counter() - t0:.0f} s (torch {torch.__version__}, "
          f"triton {__import__('triton').__version__}); budgets: {len(BUDGETS)} rules, {len(failures)} exceeded")
    for msg in failures:
        print("  OVER BUDGET:", msg)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 1 if (args.check and failures) else 0


if __name__ == "__main__":
    sys.exit(main())
