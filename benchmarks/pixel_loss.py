"""Next-patch pixel loss: aimkern.next_patch_pixel_loss against the PyTorch reference and torch.compile of it.

    python benchmarks/pixel_loss.py [--batch 256] [--img 224] [--patch 16] [--dtype bf16]

Shapes and peers: ``BENCH["next_patch_pixel_loss"]`` (benchmarks/bench_cases.py), timed by benchmarks/harness.py;
the flags override the spec's shape. Forward and forward+backward (d(pred); images are data) in the same
run, AIM's setting: norm_pix, a per-sample prefix, offset 1. Median ms (triton.testing.do_bench), GB/s over
the bytes the op must move (pred and images read once; in fwd+bwd also d(pred) written once), that as a
share of the 4.2 TB/s copy ceiling, and peak extra memory. Table on stdout, JSON and PNG under
$AIMKERN_BENCH_OUT or benchmarks/out/. Without CUDA it runs a tiny correctness check under Triton's
interpreter and times the CPU peers at a tiny shape.
"""
from __future__ import annotations

import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before aimkern's kernels are defined

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from common import COPY_CEILING_GBPS, has_cuda, no_cuda_notice  # noqa: E402

import aimkern  # noqa: E402
from aimkern.ops import PixelLossParams  # noqa: E402
from aimkern.specs import Problem, dtype_name, get_spec  # noqa: E402
from aimkern.reference.pixel_loss import next_patch_pixel_loss_reference  # noqa: E402

NAME = "pixel_loss"
SPEC = get_spec("next_patch_pixel_loss")


def aimkern_op(pred, images, prefix, patch_size):
    return aimkern.next_patch_pixel_loss(pred, images, patch_size=patch_size, prefix_len=prefix, backend="triton")


def reference_peer(pred, images, prefix, patch_size):
    return next_patch_pixel_loss_reference(pred, images, patch_size=patch_size, prefix_len=prefix)


EXTRAS = [harness.compiled_peer("compile(reference)", SPEC.reference)]


def problem_of(dtype: torch.dtype, device: str):
    def make(case: dict, grad: bool) -> Problem:
        b, s, p = case["batch"], case["img"], case["patch"]
        shapes = ((b, (s // p) ** 2, 3 * p * p), (b, 3, s, s), (b,))  # AIM: a random prefix per image
        return Problem("next_patch_pixel_loss", device, dtype_name(dtype), shapes, PixelLossParams(patch_size=p),
                       (grad, False, False), (dtype_name(dtype), dtype_name(dtype), "int32"))

    return make


def work(case: dict, problem: Problem, tensors: tuple, pass_: str) -> dict:
    pred, images = tensors[0], tensors[1]
    pred_bytes = pred.numel() * pred.element_size()
    nbytes = pred_bytes + images.numel() * images.element_size()
    return {"bytes": nbytes if pass_ == "fwd" else nbytes + pred_bytes}


def run(args) -> None:
    device = "cuda" if has_cuda() else "cpu"
    args.dtype = harness.dtype(args, device)
    flags = {k: getattr(args, k) for k in ("batch", "img", "patch") if getattr(args, k) is not None}
    cases = [dict(c, **flags) for c in harness.cases(SPEC, args, device)]
    peers = harness.spec_peers(SPEC, all_candidates=args.all_candidates or device == "cpu") + EXTRAS
    results = harness.measure(SPEC, cases, problem_of(harness.DTYPES[args.dtype], device), peers, work=work)
    rows = [{"peer": r.peer, "mode": r.pass_, "ms": r.ms, "GB/s": r.gbps,
             "%copy": 100.0 * r.gbps / COPY_CEILING_GBPS if r.gbps else None,
             "peak_extra_MiB": r.mib, **r.case, "dtype": args.dtype} for r in results]
    chart = harness.bar_chart([(r["peer"], r["mode"], r["GB/s"]) for r in rows],
                              ylabel="GB/s over the bytes that must move (higher is better)",
                              title=f"next-patch pixel loss, {harness.device_name()}",
                              hline=(COPY_CEILING_GBPS, "copy ceiling"))
    harness.write(NAME, rows,
                  ["peer", "mode", "ms", "GB/s", "%copy", "peak_extra_MiB"], results, chart=chart, device=device)


def interpreter_check() -> None:
    """Tiny fp32 check of the Triton kernel against the reference (no timing)."""
    torch.manual_seed(0)
    for b, c, h, w, p in [(2, 3, 16, 20, 4), (2, 1, 10, 15, 5)]:
        n = (h // p) * (w // p)
        images = torch.rand(b, c, h, w)
        pred = torch.randn(b, n, p * p * c, requires_grad=True)
        prefix = torch.tensor([0, n // 2])
        losses = [fn(pred, images, prefix, p) for fn in (aimkern_op, reference_peer)]
        grads = [torch.autograd.grad(loss, pred)[0] for loss in losses]
        err = max((losses[0] - losses[1]).abs().item(), (grads[0] - grads[1]).abs().max().item())
        print(f"  B={b} C={c} H={h} W={w} P={p}: max |triton - reference| over loss and d(pred) {err:.2e}")
        assert err < 1e-4, "next_patch_pixel_loss: Triton kernel disagrees with the reference"
    print("interpreter check passed")


def main() -> None:
    ap = harness.parser(__doc__)
    for flag in ("batch", "img", "patch"):
        ap.add_argument(f"--{flag}", type=int, default=None, help="overrides the spec's shape")
    args = ap.parse_args()
    if not has_cuda():
        no_cuda_notice(NAME)
        interpreter_check()
        harness.cpu_notice(NAME)
    run(args)


if __name__ == "__main__":
    main()
