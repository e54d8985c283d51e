"""Benchmark: aimkern.linear_cross_entropy (fused linear + 8192-way cross-entropy) against its peers.

Forward + backward (d(input), d(weight)) of the token head, bf16, V = 8192, in the same run:
  * aimkern            the Triton kernels (no (T, V) logits in memory)
  * eager fp32 logits  F.cross_entropy(F.linear(x, W).float(), t)       (what the reference computes)
  * eager bf16 logits  F.cross_entropy(F.linear(x, W), t)
  * compiled           torch.compile of the fp32-logits version
  * torch fused        F.linear_cross_entropy, where the installed torch has it (>= 2.13)
Reported: median ms (triton.testing.do_bench), TFLOP/s counting the 3 GEMMs of the math (6 T V E flops),
and peak memory beyond what was live before the call, minus the two gradients themselves.

    python benchmarks/cross_entropy.py           # T in {8k, 65k, 262k} x E in {768, 1024, 1536}
    python benchmarks/cross_entropy.py --quick   # T in {8k, 65k}, E = 768 (for gpu_check.sh)

Without CUDA it says so and runs a small correctness sweep under Triton's interpreter instead.
"""
from __future__ import annotations

import argparse
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
from aimkern.reference.cross_entropy import linear_cross_entropy_reference  # noqa: E402

V = 8192
NAME = "cross_entropy"


def _peers() -> dict:
    def eager_fp32(x, w, t):
        return F.cross_entropy(F.linear(x, w).float(), t)

    def eager_bf16(x, w, t):
        return F.cross_entropy(F.linear(x, w), t)

    peers = {
        "aimkern": lambda x, w, t: aimkern.linear_cross_entropy(x, w, t, backend="triton"),
        "eager fp32 logits": eager_fp32,
        "eager bf16 logits": eager_bf16,
        # A fresh compiled function per shape: no recompile-limit surprises across the sweep.
        "compiled": "compile",
    }
    if hasattr(F, "linear_cross_entropy"):
        peers["torch fused"] = lambda x, w, t: F.linear_cross_entropy(x, w, t)
    return peers


def _bench_shape(t_tokens: int, e: int, rows: list) -> None:
    torch.manual_seed(0)
    x = (torch.randn(t_tokens, e, device="cuda") * 0.5).to(torch.bfloat16).requires_grad_()
    w = (torch.randn(V, e, device="cuda") * e**-0.5).to(torch.bfloat16).requires_grad_()
    t = torch.randint(0, V, (t_tokens,), device="cuda")
    grads_mib = (x.numel() + w.numel()) * 2 / 2**20
    flops = 6.0 * t_tokens * V * e
    for name, fn in _peers().items():
        if fn == "compile":
            fn = torch.compile(lambda x, w, t: F.cross_entropy(F.linear(x, w).float(), t))

        def step(fn=fn):
            return torch.autograd.grad(fn(x, w, t), (x, w))

        print(f"T={t_tokens} E={e} {name} ...", flush=True)
        ok = try_run(lambda: (step(), torch.cuda.synchronize(), 0.0)[-1])  # warm-up, autotune, compile
        ms = try_run(lambda: time_ms(step)) if ok is not None else None
        mem = try_run(lambda: peak_extra_mib(step)) if ms is not None else None
        rows.append({
            "T": t_tokens, "E": e, "V": V, "method": name, "ms": ms,
            "TFLOP/s": flops / ms / 1e9 if ms else None,
            "% of matmul ceiling": 100 * flops / ms / 1e9 / MATMUL_CEILING_TFLOPS if ms else None,
            "extra MiB beyond grads": mem - grads_mib if mem is not None else None,
        })
        torch.cuda.empty_cache()


def _chart(rows):
    def draw(ax):
        methods = list(dict.fromkeys(r["method"] for r in rows))
        shapes = list(dict.fromkeys((r["T"], r["E"]) for r in rows))
        width = 0.8 / len(methods)
        for i, m in enumerate(methods):
            vals = [next((r["ms"] or 0.0 for r in rows if r["method"] == m and (r["T"], r["E"]) == s), 0.0)
                    for s in shapes]
            ax.bar([j + i * width for j in range(len(shapes))], vals, width, label=m)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(shapes))])
        ax.set_xticklabels([f"T={s[0] // 1024}k\nE={s[1]}" for s in shapes])
        ax.set_ylabel("fwd+bwd ms (lower is better)")
        ax.set_yscale("log")
        ax.set_title(f"linear + {V}-way cross-entropy, bf16, {torch.cuda.get_device_name()}")
        ax.legend(fontsize=8)

    return draw


def run_gpu(quick: bool) -> None:
    tokens = [8192, 65536] if quick else [8192, 65536, 262144]
    widths = [768] if quick else [768, 1024, 1536]
    rows: list = []
    for t_tokens in tokens:
        for e in widths:
            _bench_shape(t_tokens, e, rows)
    cols = ["T", "E", "method", "ms", "TFLOP/s", "% of matmul ceiling", "extra MiB beyond grads"]
    write_report(NAME, rows, cols, chart=_chart(rows))


def run_interpreter_check() -> None:
    """Tiny correctness sweep of the Triton kernels under the interpreter (no timing: there is no GPU)."""
    no_cuda_notice(NAME)
    rows = []
    for (t_tokens, v, e), dtype in [
        ((37, 300, 48), torch.float32), ((37, 300, 48), torch.float16), ((5, V, 48), torch.float32),
    ]:
        torch.manual_seed(0)
        x = torch.randn(t_tokens, e, dtype=torch.float64)
        w = torch.randn(v, e, dtype=torch.float64) * e**-0.5
        t = torch.randint(0, v, (t_tokens,))
        kw = dict(label_smoothing=0.1, z_loss=1e-4)
        xs, ws = x.to(dtype).requires_grad_(), w.to(dtype).requires_grad_()
        loss = aimkern.linear_cross_entropy(xs, ws, t, backend="triton", **kw)
        dx, dw = torch.autograd.grad(loss, (xs, ws))
        x64, w64 = x.to(dtype).double().requires_grad_(), w.to(dtype).double().requires_grad_()
        ref = linear_cross_entropy_reference(x64, w64, t, **kw)
        rdx, rdw = torch.autograd.grad(ref, (x64, w64))
        errs = [abs(loss.item() - ref.item()), (dx.double() - rdx).abs().max().item(),
                (dw.double() - rdw).abs().max().item()]
        rows.append({"T": t_tokens, "V": v, "E": e, "dtype": str(dtype).replace("torch.", ""),
                     **{k: f"{err:.1e}" for k, err in zip(("loss err", "dx err", "dW err"), errs)}})
        bound = 1e-5 if dtype == torch.float32 else 1e-3
        assert max(errs) <= bound, f"linear_cross_entropy T={t_tokens} V={v} {dtype}: error {max(errs):.1e} > {bound}"
    write_report(f"{NAME}_interpreter", rows, ["T", "V", "E", "dtype", "loss err", "dx err", "dW err"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="T in {8k, 65k}, E = 768 only")
    args = parser.parse_args()
    if has_cuda():
        run_gpu(args.quick)
    else:
        run_interpreter_check()


if __name__ == "__main__":
    main()
