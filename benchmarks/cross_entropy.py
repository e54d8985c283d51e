"""Benchmark: aimkern.linear_cross_entropy (fused linear + 8192-way cross-entropy) against its peers.

Forward + backward (d(input), d(weight)) of the token head, bf16, V = 8192, in the same run. Shapes and
peers: ``BENCH["linear_cross_entropy"]`` (benchmarks/bench_cases.py), timed by benchmarks/harness.py:
  * aimkern              the Triton kernels (no (T, V) logits in memory)
  * eager fp32 logits    F.cross_entropy(F.linear(x, W).float(), t)       (the reference)
  * chunked fp32 logits  the same over 4096-token chunks, each recomputed in the backward
  * torch fused          F.linear_cross_entropy, where the installed torch has it (>= 2.13)
and this script's own:
  * eager bf16 logits    F.cross_entropy(F.linear(x, W), t)
  * compiled             torch.compile of the fp32-logits version
Reported: median ms (triton.testing.do_bench), TFLOP/s counting the 3 GEMMs of the math (6 T V E flops),
and peak memory beyond what was live before the call, minus the two gradients themselves.

    python benchmarks/cross_entropy.py           # T in {8k, 65k, 262k} x E in {768, 1024, 1536}
    python benchmarks/cross_entropy.py --quick   # T in {8k, 65k}, E = 768 (for gpu_check.sh)

Without CUDA it says so, runs a small correctness sweep under Triton's interpreter and times the CPU
peers at a tiny shape.
"""
from __future__ import annotations

import os
import sys

if "torch" not in sys.modules:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before aimkern's kernels are defined

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from common import MATMUL_CEILING_TFLOPS, has_cuda, no_cuda_notice, write_report  # noqa: E402

import aimkern  # noqa: E402
from aimkern.ops import CrossEntropyParams  # noqa: E402
from aimkern.reference.cross_entropy import linear_cross_entropy_reference  # noqa: E402
from aimkern.specs import Problem, dtype_name, get_spec  # noqa: E402
from bench_cases import BENCH  # noqa: E402

NAME = "cross_entropy"
SPEC = get_spec("linear_cross_entropy")
V = BENCH["linear_cross_entropy"]["shapes"][0]["V"]


def eager_bf16(x, w, t, b, params: CrossEntropyParams):  # (no z-loss: the benchmark's shapes have none)
    return F.cross_entropy(F.linear(x, w, b), t, reduction=params.reduction, ignore_index=params.ignore_index,
                           label_smoothing=params.label_smoothing)


def eager_fp32(x, w, t, b, params: CrossEntropyParams):
    return F.cross_entropy(F.linear(x, w, b).float(), t, reduction=params.reduction,
                           ignore_index=params.ignore_index, label_smoothing=params.label_smoothing)


EXTRAS = [harness.Peer("eager bf16 logits", lambda problem: eager_bf16),
          harness.compiled_peer("compiled", eager_fp32)]


def problem_of(dtype: torch.dtype, device: str):
    def make(case: dict, grad: bool) -> Problem:
        t, e, v = case["T"], case["E"], case["V"]
        return Problem("linear_cross_entropy", device, dtype_name(dtype), ((t, e), (v, e), (t,), None),
                       CrossEntropyParams(),
                       (grad, grad, False, False), (dtype_name(dtype), dtype_name(dtype), "int64", None))

    return make


def work(case: dict, problem: Problem, tensors: tuple, pass_: str) -> dict:
    return {"flop": 6.0 * case["T"] * case["V"] * case["E"]}  # the 3 GEMMs of forward + backward


def row(r: "harness.Result") -> dict:
    x, w = r.case["T"] * r.case["E"], r.case["V"] * r.case["E"]
    grads_mib = (x + w) * harness.DTYPES[r.case["dtype"]].itemsize / 2**20
    return {**{k: r.case[k] for k in ("T", "E", "V")}, "method": r.peer, "ms": r.ms, "TFLOP/s": r.tflops,
            "% of matmul ceiling": 100 * r.tflops / MATMUL_CEILING_TFLOPS if r.tflops else None,
            "extra MiB beyond grads": r.mib - grads_mib if r.mib is not None else None}


def run(args) -> None:
    device = "cuda" if has_cuda() else "cpu"
    args.dtype = harness.dtype(args, device)
    cases = [dict(c, dtype=args.dtype) for c in harness.cases(SPEC, args, device)]
    peers = harness.spec_peers(SPEC, all_candidates=args.all_candidates or device == "cpu") + EXTRAS
    results = harness.measure(SPEC, cases, problem_of(harness.DTYPES[args.dtype], device), peers,
                              passes=("fwd+bwd",), work=work)
    rows = [row(r) for r in results]
    chart = harness.bar_chart([(f"T={r['T'] // 1024}k\nE={r['E']}", r["method"], r["ms"]) for r in rows],
                              ylabel="fwd+bwd ms (lower is better)", log=True,
                              title=f"linear + {V}-way cross-entropy, {args.dtype}, {harness.device_name()}")
    harness.write(NAME, rows,
                  ["T", "E", "method", "ms", "TFLOP/s", "% of matmul ceiling", "extra MiB beyond grads"], results,
                  chart=chart, device=device)


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
    args = harness.parser(__doc__).parse_args()
    if not has_cuda():
        run_interpreter_check()
        harness.cpu_notice(NAME)
    run(args)


if __name__ == "__main__":
    main()
