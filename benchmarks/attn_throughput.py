"""Benchmark: aimkern.attention against the best peers, every mask of the contract, forward and fwd+bwd.

Shapes, masks and peers: ``BENCH["attention"]`` (benchmarks/bench_cases.py; the peer table's shapes of
benchmarks/RESULTS.md, bf16, H = 12, 65,536 tokens per call), timed by benchmarks/harness.py, in the same run:
  * aimkern              aimkern.attention(backend="triton")
  * aimkern split bwd    the spec's triton-split candidate (N <= 256 only): the dK/dV + dQ kernels instead
                         of the one-program-per-head backward (checked with the launch layer's observer
                         before timing). Shows where the fused path should hand over (kernels/attention.py,
                         FUSED_BWD_MAX_ELEMS)
  * SDPA cuDNN / FA2     F.scaled_dot_product_attention pinned to one backend, where it takes the mask
  * SDPA mem-eff + mask  the efficient backend with a dense (B, 1, N, N) boolean mask (prefix, block)
  * Flex                 (this script's own) torch.compile(flex_attention), block mask built once per shape,
                         recompile limit raised
Masks: full, causal (token), prefix (AIM: causal after a per-sample prefix), block (block-causal,
block_size = grid width sqrt(N), row by row). TFLOP/s counts visible (query, key) pairs only: forward
4 * D per pair and head, fwd+bwd 3.5x that (backward = 5 matmuls including the recompute of the scores).
Each shape also checks the (autotuned) aimkern forward against an fp32 reference on 2 samples ("max err").

    python benchmarks/attn_throughput.py            # all shapes, all masks
    python benchmarks/attn_throughput.py --quick    # 3 shapes, 3 masks, Flex fwd+bwd only (gpu_check.sh)

Prints a table; writes out/attn_throughput.json and .png. Without CUDA it says so, runs a small
correctness sweep of the kernels under Triton's interpreter and times the CPU peers at a tiny shape.
"""
from __future__ import annotations

import math
import os
import sys

if "torch" not in sys.modules:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before aimkern's kernels are defined

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from common import MATMUL_CEILING_TFLOPS, has_cuda, no_cuda_notice, write_report  # noqa: E402

import aimkern  # noqa: E402
from aimkern.ops import AttentionParams, launch_policy  # noqa: E402
from aimkern.ops._launch import observe  # noqa: E402
from aimkern.reference.attention import attention_mask, attention_reference  # noqa: E402
from aimkern.specs import Problem, dtype_name, get_spec  # noqa: E402
from bench_cases import BENCH  # noqa: E402

NAME = "attn_throughput"
SPEC = get_spec("attention")
H = BENCH["attention"]["heads"]
QUICK_TIMING = (10, 40)  # do_bench warm-up / repetition ms under --quick (gpu_check.sh's time limit)


def mask_options(mask: str, n: int) -> dict:
    """aimkern.attention's plain options of one mask mode (prefix: a per-sample prefix_len tensor besides)."""
    return {"full": {}, "causal": dict(is_causal=True), "prefix": dict(is_causal=True),
            "block": dict(is_causal=True, block_size=max(1, math.isqrt(n)))}[mask]


def problem_of(dtype: torch.dtype, device: str):
    def make(case: dict, grad: bool) -> Problem:
        b, n, d, prefix = case["B"], case["N"], case["D"], case["mask"] == "prefix"
        shape, name = (b, H, n, d), dtype_name(dtype)
        return Problem("attention", device, name, (shape, shape, shape, (b,) if prefix else None),
                       AttentionParams(**mask_options(case["mask"], n)), (grad, grad, grad, False),
                       (name, name, name, "int64" if prefix else None))

    return make


def work(case: dict, problem: Problem, tensors: tuple, pass_: str) -> dict:
    """4 D flops per visible (query, key) pair and head forward; fwd+bwd 3.5x that."""
    b, n, d = case["B"], case["N"], case["D"]
    params = problem.params
    if params.is_causal:
        pairs = float(attention_mask(n, is_causal=True, block_size=params.block_size, prefix_len=tensors[3],
                                     batch=b, device=tensors[0].device).sum().item())
    else:
        pairs = float(b) * n * n
    return {"flop": 4.0 * d * H * pairs * (1.0 if pass_ == "fwd" else 3.5)}


# --------------------------------------------------------------------------------- this script's checks
def max_err_check(fn, args, pass_) -> dict:
    """The (autotuned) forward at the benchmark's shape against an fp32 reference on its first 2 samples."""
    if pass_ != "fwd":
        return {}
    q, k, v, prefix, params = args
    with torch.no_grad():
        out = fn(*args)[:2].float()
        ref = attention_reference(*(t[:2].float() for t in (q, k, v)), is_causal=params.is_causal,
                                  block_size=params.block_size, prefix_len=None if prefix is None else prefix[:2],
                                  scale=params.scale)
    return {"aimkern max err": f"{(out - ref).abs().max().item():.1e}"}  # bf16: expect ~1e-2


SPLIT_KERNELS = {"attn_bwd_tiled_kernel"}


def check_split_column(fn, q, k, v, prefix_len, params) -> None:
    """The split column times what it says: its backward launches the tiled kernels, not the fused one."""
    with observe() as launches:
        o = fn(q, k, v, prefix_len, params)
        torch.autograd.grad(o, (q, k, v), torch.ones_like(o))
    names = {launch.name for launch in launches}
    if not SPLIT_KERNELS <= names or "attn_bwd_fused_kernel" in names:
        raise AssertionError(f"the 'aimkern split bwd' column ran {sorted(names)}, not the split backward")


def split_check(fn, args, pass_) -> None:
    if pass_ == "fwd+bwd":
        check_split_column(fn, *args)


def short_n(problem: Problem):
    return None if problem.shapes[0][2] <= 256 else "N > 256: the split backward is the default path there"


def dense_mask_only(problem: Problem):
    kind = SPEC.mask_kind(problem)
    return None if kind not in ("full", "causal") else f"{kind}: the dedicated SDPA backends are the peers"


def flex_peer(passes: tuple) -> "harness.Peer":
    """torch.compile(flex_attention) with the case's block mask, built on the first call (it needs the
    prefix tensor) and reused by every timed call."""

    def build(problem: Problem):
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        for knob in ("recompile_limit", "cache_size_limit"):  # one compile per shape and mask
            if hasattr(torch._dynamo.config, knob):
                setattr(torch._dynamo.config, knob, 256)
        compiled = torch.compile(flex_attention, dynamic=False)
        built = {}

        def run(q, k, v, prefix_len, params):
            if params.is_causal and "mask" not in built:
                b, n, bs, prefix = q.shape[0], q.shape[2], params.block_size, prefix_len
                if prefix is not None:
                    def mod(bi, hi, qi, ki):
                        return (ki < prefix[bi]) | ((ki // bs) <= (qi // bs))
                else:
                    def mod(bi, hi, qi, ki):
                        return (ki // bs) <= (qi // bs)
                built["mask"] = create_block_mask(mod, b if prefix is not None else None, None, n, n,
                                                  device=q.device)
            return compiled(q, k, v, block_mask=built.get("mask"))

        return run

    return harness.Peer("Flex", build, harness.cuda_only, passes=passes)


def peers(args) -> list:
    out = []
    for p in harness.spec_peers(SPEC, all_candidates=args.all_candidates or not has_cuda()):
        if p.name == "aimkern":
            p.check = max_err_check
        elif p.name == "aimkern split bwd":
            p = p.restricted(short_n)
            p.check = split_check
        elif p.name == "SDPA mem-eff + mask":
            p = p.restricted(dense_mask_only)
        out.append(p)
    # Each Flex pass is a compile of several seconds; under --quick only fwd+bwd, where the goals are.
    return out + [flex_peer(("fwd+bwd",) if args.quick else harness.PASSES)]


# ---------------------------------------------------------------------------------------------- the table
def derive(row: dict, by_peer: dict) -> None:
    """aimkern's TFLOP/s and its ratios to the best SDPA backend and to Flex."""
    ours = by_peer.get("aimkern")
    ms = ours.ms if ours else None
    row["aimkern TFLOP/s"] = ours.tflops if ours else None
    row["% matmul ceiling"] = 100 * ours.tflops / MATMUL_CEILING_TFLOPS if ours and ours.tflops else None
    sdpa = [r.ms for p, r in by_peer.items() if p.startswith("SDPA") and r.ms]
    row["x vs best SDPA"] = min(sdpa) / ms if ms and sdpa else None
    flex = by_peer.get("Flex")
    row["x vs Flex"] = flex.ms / ms if ms and flex and flex.ms else None


def run(args) -> None:
    device = "cuda" if has_cuda() else "cpu"
    args.dtype = harness.dtype(args, device)
    masks = BENCH["attention"]["quick_masks" if args.quick else "masks"]
    cases = [dict(shape, mask=m) for shape in harness.cases(SPEC, args, device) for m in masks]
    timing = QUICK_TIMING if args.quick and device == "cuda" else None
    ps = peers(args)
    results = harness.measure(SPEC, cases, problem_of(harness.DTYPES[args.dtype], device), ps, work=work,
                              timing=timing)
    rows = harness.wide_rows(results, derive)
    names = [p.name for p in ps]
    points = [(f"{r['B']},{r['N']},{r['D']}\n{r['mask']}", p, r.get(f"{p} ms"))
              for r in rows if r["pass"] == "fwd+bwd" for p in names]
    chart = harness.bar_chart(points, ylabel="fwd+bwd ms (lower is better)",
                              title=f"attention, {args.dtype}, H={H}, {harness.device_name()}")
    cols = ["B", "N", "D", "mask", "pass", "aimkern ms", "aimkern TFLOP/s", "x vs best SDPA", "x vs Flex",
            "SDPA cuDNN ms", "SDPA FA2 ms", "SDPA mem-eff + mask ms", "Flex ms", "aimkern split bwd ms",
            "% matmul ceiling", "aimkern extra MiB", "Flex extra MiB", "aimkern max err"]
    cols += [f"{p} ms" for p in names if f"{p} ms" not in cols]  # --all-candidates, the CPU's candidates
    harness.write(NAME, rows, cols, results, chart=chart, device=device)


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
    check_split_column(split_policy_fn, q, k, v, None, AttentionParams(is_causal=True))
    print("split column runs", sorted(SPLIT_KERNELS))


def split_policy_fn(q, k, v, prefix_len, params):
    """What the spec's triton-split candidate runs: the Triton path under the split backward policy."""
    args, kwargs = SPEC.public_call((q, k, v, prefix_len), params)
    with launch_policy(attention_backward="split"):
        return aimkern.attention(*args, backend="triton", **kwargs)


def main() -> None:
    args = harness.parser(__doc__).parse_args()
    if not has_cuda():
        run_interpreter_check()
        harness.cpu_notice(NAME)
    run(args)


if __name__ == "__main__":
    main()
