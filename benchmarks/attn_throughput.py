"""Benchmark: aimkern.attention against the best peers, every mask of the contract, forward and fwd+bwd.

For each shape of the peer table in benchmarks/RESULTS.md (bf16, H = 12, 65,536 tokens per call) and each mask mode it
times, in the same run:
  * aimkern              aimkern.attention(backend="triton")
  * aimkern split bwd    the same under LaunchPolicy(attention_backward="split") (N <= 256 only): the
                         dK/dV + dQ kernels instead of the one-program-per-head backward; the policy is
                         captured at forward time, so the timed backward is the split one (checked with
                         the launch layer's observer before timing). Shows where the fused path should
                         hand over (kernels/attention.py, FUSED_BWD_MAX_ELEMS)
  * SDPA cuDNN / FA2     F.scaled_dot_product_attention on one backend (full and causal; cuDNN is also
                         tried with a dense mask)
  * SDPA mem-eff + mask  the efficient backend with a dense (B, 1, N, N) boolean mask (prefix, block)
  * Flex                 torch.compile(flex_attention), block mask built once per shape, recompile limit raised
Masks: full, causal (token), prefix (AIM: causal after a per-sample prefix in [1, N)), block (block-causal,
block_size = grid width sqrt(N), row by row). TFLOP/s counts visible (query, key) pairs only: forward
4 * D per pair and head, fwd+bwd 3.5x that (backward = 5 matmuls including the recompute of the scores).
Each shape also checks the (autotuned) aimkern forward against an fp32 reference on 2 samples ("max err").

    python benchmarks/attn_throughput.py            # all shapes, all masks
    python benchmarks/attn_throughput.py --quick    # 3 shapes, 3 masks, Flex fwd+bwd only (gpu_check.sh)

Prints a table; writes out/attn_throughput.json and .png. Without CUDA it says so and runs a small
correctness sweep of the kernels under Triton's interpreter instead (no timing).
"""
from __future__ import annotations

import argparse
import math
import os
import sys

if "torch" not in sys.modules:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before aimkern's kernels are defined

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
    MATMUL_CEILING_TFLOPS, has_cuda, no_cuda_notice, peak_extra_mib, time_ms, try_run, write_report,
)

import aimkern  # noqa: E402
from aimkern.ops import launch_policy  # noqa: E402
from aimkern.ops._launch import observe  # noqa: E402
from aimkern.reference.attention import attention_mask, attention_reference  # noqa: E402

NAME = "attn_throughput"
H = 12
SHAPES = [(256, 256, 64), (256, 196, 64), (64, 1024, 64), (16, 4096, 64), (64, 1024, 128)]
QUICK_SHAPES = [(256, 256, 64), (256, 196, 64), (64, 1024, 128)]
MASKS = ["full", "causal", "prefix", "block"]
QUICK_MASKS = ["causal", "prefix", "block"]
PEERS = ["aimkern", "aimkern split bwd", "SDPA cuDNN", "SDPA FA2", "SDPA mem-eff + mask", "Flex"]


def mask_options(mask: str, b: int, n: int) -> dict:
    """aimkern.attention keyword arguments of one mask mode (the prefix is drawn once, seeded)."""
    if mask == "full":
        return {}
    if mask == "causal":
        return dict(is_causal=True)
    if mask == "prefix":
        gen = torch.Generator().manual_seed(n)
        return dict(is_causal=True, prefix_len=torch.randint(1, n, (b,), generator=gen).cuda())
    if mask == "block":
        return dict(is_causal=True, block_size=max(1, math.isqrt(n)))
    raise ValueError(mask)


def _first_two(opts: dict) -> dict:
    """Mask options for the first two samples (the reference check runs on those)."""
    return {k: (v[:2] if torch.is_tensor(v) else v) for k, v in opts.items()}


def _dense_mask(opts: dict, b: int, n: int) -> torch.Tensor:
    return attention_mask(n, is_causal=opts.get("is_causal", False), block_size=opts.get("block_size", 1),
                          prefix_len=opts.get("prefix_len"), batch=b, device="cuda")


def _visible_pairs(opts: dict, b: int, n: int) -> float:
    if not opts:
        return float(b) * n * n
    return float(_dense_mask(opts, b, n).sum().item())


def _flex_fn(opts: dict, b: int, n: int):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if not hasattr(_flex_fn, "compiled"):
        for knob in ("recompile_limit", "cache_size_limit"):  # one compile per shape and mask
            if hasattr(torch._dynamo.config, knob):
                setattr(torch._dynamo.config, knob, 256)
        _flex_fn.compiled = torch.compile(flex_attention, dynamic=False)
    bs, prefix = opts.get("block_size", 1), opts.get("prefix_len")
    if not opts:
        block_mask, batch = None, None
    elif prefix is not None:
        def mod(bi, hi, qi, ki):
            return (ki < prefix[bi]) | ((ki // bs) <= (qi // bs))
        block_mask, batch = mod, b
    else:
        def mod(bi, hi, qi, ki):
            return (ki // bs) <= (qi // bs)
        block_mask, batch = mod, None
    if block_mask is not None:
        block_mask = create_block_mask(block_mask, batch, None, n, n, device="cuda")  # built once
    return lambda q, k, v: _flex_fn.compiled(q, k, v, block_mask=block_mask)


def _sdpa_fn(backend_name: str, opts: dict, b: int, n: int):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"SDPA cuDNN": SDPBackend.CUDNN_ATTENTION, "SDPA FA2": SDPBackend.FLASH_ATTENTION,
               "SDPA mem-eff + mask": SDPBackend.EFFICIENT_ATTENTION}[backend_name]
    dense = "prefix_len" in opts or opts.get("block_size", 1) > 1
    if backend_name == "SDPA FA2" and dense:
        return None  # FlashAttention-2 has no arbitrary masks
    if backend_name == "SDPA mem-eff + mask" and not dense:
        return None  # full / causal: the dedicated backends above are the peers
    mask = _dense_mask(opts, b, n) if dense else None
    causal = opts.get("is_causal", False) and not dense

    def run(q, k, v):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)

    return run


def _aimkern_fn(opts: dict, split: bool):
    """aimkern.attention on the auto or the split backward path. The path is fixed when the forward runs
    (the policy travels into the custom op), so autograd's later backward follows it."""
    path = "split" if split else "auto"

    def run(q, k, v):
        with launch_policy(attention_backward=path):
            return aimkern.attention(q, k, v, backend="triton", **opts)

    return run


def backward_kernels(fn, q, k, v) -> set:
    """Names of the kernels a forward + backward of ``fn`` launches (the backward outside fn's policy)."""
    with observe() as launches:
        o = fn(q, k, v)
        torch.autograd.grad(o, (q, k, v), torch.ones_like(o))
    return {launch.name for launch in launches}


SPLIT_KERNELS = {"attn_bwd_tiled_kernel"}


def check_split_column(fn, q, k, v) -> None:
    names = backward_kernels(fn, q, k, v)
    if not SPLIT_KERNELS <= names or "attn_bwd_fused_kernel" in names:
        raise AssertionError(f"the 'aimkern split bwd' column ran {sorted(names)}, not the split backward")


def _bench(b: int, n: int, d: int, mask: str, rows: list, warmup: int, rep: int, quick: bool) -> None:
    torch.manual_seed(0)
    q, k, v = (torch.randn(b, H, n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    do = torch.randn(b, H, n, d, device="cuda", dtype=torch.bfloat16)
    opts = mask_options(mask, b, n)
    fwd_flops = 4.0 * d * H * _visible_pairs(opts, b, n)
    results = {"fwd": {}, "fwd+bwd": {}}
    mem = {}
    errors = {}
    ref = attention_reference(*(t[:2].detach().float() for t in (q, k, v)), **_first_two(opts))
    for peer in PEERS:
        if peer == "aimkern split bwd" and n > 256:
            continue
        try:
            if peer.startswith("aimkern"):
                fn = _aimkern_fn(opts, split=peer.endswith("split bwd"))
            elif peer == "Flex":
                fn = _flex_fn(opts, b, n)
            else:
                fn = _sdpa_fn(peer, opts, b, n)
        except Exception as e:  # noqa: BLE001 - a peer this torch lacks is reported missing
            print(f"  {peer}: unavailable ({type(e).__name__}: {str(e)[:100]})")
            fn = None
        if fn is None:
            continue
        print(f"B={b} N={n} D={d} {mask} {peer} ...", flush=True)

        def fwd(fn=fn):
            with torch.no_grad():
                return fn(q, k, v)

        def fwd_bwd(fn=fn):
            return torch.autograd.grad(fn(q, k, v), (q, k, v), do)

        if peer == "aimkern split bwd":
            check_split_column(fn, q, k, v)  # the column times what it says
        if peer == "aimkern":  # the autotuned kernels are checked here, at the benchmark's shapes
            errors[peer] = try_run(lambda: (fwd()[:2].float() - ref).abs().max().item())
        passes = (("fwd", fwd), ("fwd+bwd", fwd_bwd))
        if quick and peer == "Flex":
            passes = passes[1:]  # each Flex pass is a compile of several seconds; the goals are on fwd+bwd
        for name, step in passes:
            ok = try_run(lambda: (step(), torch.cuda.synchronize(), 0.0)[-1])  # compile, autotune, warm-up
            results[name][peer] = try_run(lambda: time_ms(step, warmup=warmup, rep=rep)) if ok is not None else None
        if results["fwd+bwd"].get(peer) is not None:
            mem[peer] = try_run(lambda: peak_extra_mib(fwd_bwd))
        torch.cuda.empty_cache()

    for name, times in results.items():
        flops = fwd_flops * (1.0 if name == "fwd" else 3.5)
        ours = times.get("aimkern")
        row = {"B": b, "N": n, "D": d, "mask": mask, "pass": name,
               "aimkern TFLOP/s": flops / ours / 1e9 if ours else None,
               "% matmul ceiling": 100 * flops / ours / 1e9 / MATMUL_CEILING_TFLOPS if ours else None}
        for peer in PEERS:
            row[f"{peer} ms"] = times.get(peer)
        sdpa = [t for p, t in times.items() if p.startswith("SDPA") and t]
        row["x vs best SDPA"] = min(sdpa) / ours if ours and sdpa else None
        row["x vs Flex"] = times["Flex"] / ours if ours and times.get("Flex") else None
        if name == "fwd":
            err = errors.get("aimkern")
            row["aimkern max err"] = f"{err:.1e}" if err is not None else None  # bf16: expect ~1e-2
        if name == "fwd+bwd":
            row["aimkern extra MiB"] = mem.get("aimkern")
            row["Flex extra MiB"] = mem.get("Flex")
        rows.append(row)


def _chart(rows):
    def draw(ax):
        sel = [r for r in rows if r["pass"] == "fwd+bwd"]
        labels = [f"{r['B']},{r['N']},{r['D']}\n{r['mask']}" for r in sel]
        peers = [p for p in PEERS if any(r.get(f"{p} ms") for r in sel)]
        width = 0.8 / max(1, len(peers))
        for i, p in enumerate(peers):
            ax.bar([j + i * width for j in range(len(sel))], [r.get(f"{p} ms") or 0.0 for r in sel], width, label=p)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(sel))])
        ax.set_xticklabels(labels, fontsize=7)
        ax.set_ylabel("fwd+bwd ms (lower is better)")
        ax.set_title(f"attention, bf16, H={H}, {torch.cuda.get_device_name()}")
        ax.legend(fontsize=7)

    return draw


def run_gpu(quick: bool) -> None:
    warmup, rep = (10, 40) if quick else (25, 100)
    rows: list = []
    for b, n, d in QUICK_SHAPES if quick else SHAPES:
        for mask in QUICK_MASKS if quick else MASKS:
            _bench(b, n, d, mask, rows, warmup, rep, quick)
    cols = ["B", "N", "D", "mask", "pass", "aimkern ms", "aimkern TFLOP/s", "x vs best SDPA", "x vs Flex",
            "SDPA cuDNN ms", "SDPA FA2 ms", "SDPA mem-eff + mask ms", "Flex ms", "aimkern split bwd ms",
            "% matmul ceiling", "aimkern extra MiB", "Flex extra MiB", "aimkern max err"]
    write_report(NAME, rows, cols, chart=_chart(rows))


# Max |error| vs float64 over o, dq, dk, dv that the interpreter sweep accepts (unit-variance inputs).
SWEEP_BOUND = {torch.float32: 1e-4, torch.float16: 5e-3}


def run_interpreter_check() -> None:
    """Correctness sweep under Triton's interpreter vs the float64 reference (no timing: no GPU here)."""
    no_cuda_notice(NAME)
    rows = []
    cases = [(2, 37, 80, "causal", torch.float32), (2, 37, 80, "prefix", torch.float16),
             (2, 37, 16, "block", torch.float32), (1, 7, 16, "full", torch.float16)]
    for b, n, d, mask, dtype in cases:
        torch.manual_seed(0)
        opts = {"full": {}, "causal": dict(is_causal=True),
                "prefix": dict(is_causal=True, prefix_len=torch.randint(1, n, (b,))),
                "block": dict(is_causal=True, block_size=max(1, math.isqrt(n)))}[mask]
        q, k, v = (torch.randn(b, 2, n, d).to(dtype).requires_grad_() for _ in range(3))
        o = aimkern.attention(q, k, v, backend="triton", **opts)
        g = torch.randn_like(o)
        grads = torch.autograd.grad(o, (q, k, v), g)
        xs = [t.detach().double().requires_grad_() for t in (q, k, v)]
        ref = attention_reference(*xs, **opts)
        ref_grads = torch.autograd.grad(ref, xs, g.double())
        errs = [(a.double() - r).abs().max().item() for a, r in zip((o, *grads), (ref, *ref_grads))]
        bound = SWEEP_BOUND[dtype]
        assert max(errs) <= bound, f"attention {mask} N={n} D={d} {dtype}: error {max(errs):.1e} > {bound:.0e}"
        rows.append({"B": b, "N": n, "D": d, "mask": mask, "dtype": str(dtype).replace("torch.", ""),
                     **{f"{k} err": f"{e:.1e}" for k, e in zip(("o", "dq", "dk", "dv"), errs)}})
    write_report(f"{NAME}_interpreter", rows, ["B", "N", "D", "mask", "dtype", "o err", "dq err", "dk err", "dv err"])
    # The split column's contract, under the interpreter: the backward after the forward's policy block.
    q, k, v = (torch.randn(1, 2, 40, 16).requires_grad_() for _ in range(3))
    check_split_column(_aimkern_fn({"is_causal": True}, split=True), q, k, v)
    print("split column runs", sorted(SPLIT_KERNELS))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 shapes x 3 masks, shorter timing")
    args = parser.parse_args()
    if has_cuda():
        run_gpu(args.quick)
    else:
        run_interpreter_check()


if __name__ == "__main__":
    main()
