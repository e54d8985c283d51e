"""Patch embedding: aimkern.patch_embed against nn.Conv2d, unfold + nn.Linear and torch.compile of each.

    python benchmarks/patch_embed.py [--batch 256] [--img 224] [--patch 16] [--dim 768] [--dtype bf16]

Shapes and peers: ``BENCH["patch_embed"]`` (benchmarks/bench_cases.py), timed by benchmarks/harness.py;
the flags override the spec's shape. Forward and forward+backward (weight, bias and pos_embed gradients;
images are data) in the same run: median ms (triton.testing.do_bench), TFLOP/s of the patch GEMM(s), GB/s
over the bytes that must move (images read, tokens written; in the backward images and dOut read again)
and peak extra memory. Table on stdout, JSON and PNG under $AIMKERN_BENCH_OUT or benchmarks/out/. Without
CUDA it runs a tiny correctness check under Triton's interpreter and times the CPU peers at a tiny shape.
"""
from __future__ import annotations

import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before aimkern's kernels are defined

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from common import has_cuda, no_cuda_notice  # noqa: E402

import aimkern  # noqa: E402
from aimkern.ops import PatchEmbedParams  # noqa: E402
from aimkern.specs import Problem, dtype_name, get_spec  # noqa: E402
from aimkern.reference.patch_embed import patch_embed_reference, patchify  # noqa: E402

NAME = "patch_embed"
SPEC = get_spec("patch_embed")


def conv2d_peer(images, weight, bias, pos, params=None):
    return F.conv2d(images, weight, bias, stride=weight.shape[-1]).flatten(2).transpose(1, 2) + pos


def unfold_linear_peer(images, weight, bias, pos, params=None):
    x = patchify(images, weight.shape[-1], order="cpq")  # the unfold copy
    return F.linear(x, weight.reshape(weight.shape[0], -1), bias) + pos


EXTRAS = [harness.compiled_peer("compile(Conv2d)", conv2d_peer),
          harness.compiled_peer("compile(unfold+Linear)", unfold_linear_peer)]


def problem_of(dtype: torch.dtype, device: str):
    def make(case: dict, grad: bool) -> Problem:
        b, s, p, e = case["batch"], case["img"], case["patch"], case["dim"]
        shapes = ((b, 3, s, s), (e, 3, p, p), (e,), (1, (s // p) ** 2, e))
        return Problem("patch_embed", device, dtype_name(dtype), shapes, PatchEmbedParams(), (False, grad, grad, grad),
                       (dtype_name(dtype),) * 4)

    return make


def work(case: dict, problem: Problem, tensors: tuple, pass_: str) -> dict:
    """The patch GEMM (forward; and dW in the backward: no dImages) and the bytes that must move."""
    images, weight = tensors[0], tensors[1]
    e, k = weight.shape[0], weight[0].numel()
    tokens = images.shape[0] * (images.shape[2] // weight.shape[-1]) ** 2
    once = (images.numel() + tokens * e) * images.element_size()  # images read + tokens written (or dOut read)
    times = 1 if pass_ == "fwd" else 2
    return {"flop": times * 2.0 * tokens * k * e, "bytes": times * once}


def run(args) -> None:
    device = "cuda" if has_cuda() else "cpu"
    args.dtype = harness.dtype(args, device)
    flags = {k: getattr(args, k) for k in ("batch", "img", "patch", "dim") if getattr(args, k) is not None}
    cases = [dict(c, **flags) for c in harness.cases(SPEC, args, device)]
    peers = harness.spec_peers(SPEC, all_candidates=args.all_candidates or device == "cpu") + EXTRAS
    results = harness.measure(SPEC, cases, problem_of(harness.DTYPES[args.dtype], device), peers, work=work)
    rows = [{"peer": r.peer, "mode": r.pass_, "ms": r.ms, "TFLOP/s": r.tflops, "GB/s": r.gbps,
             "peak_extra_MiB": r.mib, **r.case, "dtype": args.dtype} for r in results]
    chart = harness.bar_chart([(r["peer"], r["mode"], r["ms"]) for r in rows], ylabel="ms (lower is better)",
                              title=f"patch embedding, median ms, {harness.device_name()}")
    harness.write(NAME, rows,
                  ["peer", "mode", "ms", "TFLOP/s", "GB/s", "peak_extra_MiB"], results, chart=chart, device=device)


def interpreter_check() -> None:
    """Tiny fp32 check of the Triton kernels against the reference (no timing)."""
    torch.manual_seed(0)
    for b, c, h, w, p, e in [(2, 3, 16, 20, 4, 32), (1, 1, 10, 15, 5, 24)]:
        images = torch.randn(b, c, h, w, requires_grad=True)
        weight = torch.randn(e, c, p, p, requires_grad=True)
        bias = torch.randn(e, requires_grad=True)
        pos = torch.randn((h // p) * (w // p), e, requires_grad=True)
        inputs = (images, weight, bias, pos)
        outs = [fn(*inputs) for fn in (lambda *a: aimkern.patch_embed(*a, backend="triton"), patch_embed_reference)]
        g = torch.randn_like(outs[0])
        grads = [torch.autograd.grad(o, inputs, g) for o in outs]
        err = max([(outs[0] - outs[1]).abs().max().item()] + [(x - y).abs().max().item() for x, y in zip(*grads)])
        print(f"  B={b} C={c} H={h} W={w} P={p} E={e}: max |triton - reference| over output and gradients {err:.2e}")
        assert err < 1e-3, "patch_embed: Triton kernel disagrees with the reference"
    print("interpreter check passed")


def main() -> None:
    ap = harness.parser(__doc__)
    for flag in ("batch", "img", "patch", "dim"):
        ap.add_argument(f"--{flag}", type=int, default=None, help="overrides the spec's shape")
    args = ap.parse_args()
    if not has_cuda():
        no_cuda_notice(NAME)
        interpreter_check()
        harness.cpu_notice(NAME)
    run(args)


if __name__ == "__main__":
    main()
