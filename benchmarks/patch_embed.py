"""Patch embedding: aimkern.patch_embed against nn.Conv2d, unfold + nn.Linear and torch.compile of each.

    python benchmarks/patch_embed.py [--batch 256] [--img 224] [--patch 16] [--dim 768] [--dtype bf16]

Forward and forward+backward (weight, bias and pos_embed gradients; images are data) in the same run:
median ms (triton.testing.do_bench), TFLOP/s of the patch GEMM(s), GB/s over the bytes that must move
(images read, tokens written; in the backward images and dOut read again) and peak extra memory.
Table on stdout, JSON and PNG under $AIMKERN_BENCH_OUT or benchmarks/out/. Without CUDA it measures
nothing and runs a tiny correctness check under Triton's interpreter instead.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before aimkern's kernels are defined

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch.nn.functional as F  # noqa: E402
from common import has_cuda, no_cuda_notice, peak_extra_mib, time_ms, try_run, write_report  # noqa: E402

import aimkern  # noqa: E402
from aimkern.reference.patch_embed import patch_embed_reference, patchify  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def conv2d_peer(images, weight, bias, pos):
    return F.conv2d(images, weight, bias, stride=weight.shape[-1]).flatten(2).transpose(1, 2) + pos


def unfold_linear_peer(images, weight, bias, pos):
    x = patchify(images, weight.shape[-1], order="cpq")  # the unfold copy
    return F.linear(x, weight.reshape(weight.shape[0], -1), bias) + pos


def aimkern_op(images, weight, bias, pos):
    return aimkern.patch_embed(images, weight, bias, pos, backend="triton")


def measure(args) -> list[dict]:
    dtype = DTYPES[args.dtype]
    b, c, s, p, e = args.batch, 3, args.img, args.patch, args.dim
    n, k = (s // p) ** 2, 3 * p * p
    images = torch.randn(b, c, s, s, device="cuda", dtype=dtype)
    weight = (torch.randn(e, c, p, p, device="cuda") * k**-0.5).to(dtype).requires_grad_()
    bias = torch.zeros(e, device="cuda", dtype=dtype, requires_grad=True)
    pos = (torch.randn(1, n, e, device="cuda") * 0.02).to(dtype).requires_grad_()
    params = (weight, bias, pos)
    grad = torch.randn(b, n, e, device="cuda", dtype=dtype)
    itemsize = images.element_size()
    gemm_flop = 2.0 * b * n * k * e
    once = (images.numel() + grad.numel()) * itemsize  # images read + tokens written (or dOut read)
    moved = {"fwd": once, "fwd+bwd": 2 * once}
    flops = {"fwd": gemm_flop, "fwd+bwd": 2 * gemm_flop}  # forward GEMM + dW GEMM (no dImages)

    peers = {
        "aimkern": aimkern_op,
        "nn.Conv2d+flatten+add": conv2d_peer,
        "unfold+nn.Linear+add": unfold_linear_peer,
        "compile(Conv2d)": torch.compile(conv2d_peer),
        "compile(unfold+Linear)": torch.compile(unfold_linear_peer),
    }
    rows = []
    for name, fn in peers.items():
        run = {
            "fwd": lambda fn=fn: fn(images, *params),
            "fwd+bwd": lambda fn=fn: torch.autograd.grad(fn(images, *params), params, grad),
        }
        for mode, call in run.items():
            print(f"{name} {mode} ...", flush=True)
            ms = try_run(lambda call=call: time_ms(call))
            mib = try_run(lambda call=call: peak_extra_mib(call)) if ms is not None else None
            rows.append({
                "peer": name, "mode": mode, "ms": ms,
                "TFLOP/s": flops[mode] / ms / 1e9 if ms else None,
                "GB/s": moved[mode] / ms / 1e6 if ms else None,
                "peak_extra_MiB": mib,
            })
    return rows


def chart(rows):
    def draw(ax):
        modes = ["fwd", "fwd+bwd"]
        names = list(dict.fromkeys(r["peer"] for r in rows))
        width = 0.8 / len(modes)
        for i, mode in enumerate(modes):
            ys = [next((r["ms"] or 0.0) for r in rows if r["peer"] == nm and r["mode"] == mode) for nm in names]
            ax.bar([x + i * width for x in range(len(names))], ys, width, label=mode)
        ax.set_xticks([x + width / 2 for x in range(len(names))], names, rotation=15)
        ax.set_ylabel("ms (lower is better)")
        ax.set_title("patch embedding, median ms")
        ax.legend()

    return draw


def interpreter_check() -> None:
    """Tiny fp32 check of the Triton kernels against the reference (no timing)."""
    torch.manual_seed(0)
    for b, c, h, w, p, e in [(2, 3, 16, 20, 4, 32), (1, 1, 10, 15, 5, 24)]:
        images = torch.randn(b, c, h, w, requires_grad=True)
        weight = torch.randn(e, c, p, p, requires_grad=True)
        bias = torch.randn(e, requires_grad=True)
        pos = torch.randn((h // p) * (w // p), e, requires_grad=True)
        inputs = (images, weight, bias, pos)
        outs = [fn(*inputs) for fn in (aimkern_op, patch_embed_reference)]
        g = torch.randn_like(outs[0])
        grads = [torch.autograd.grad(o, inputs, g) for o in outs]
        err = max([(outs[0] - outs[1]).abs().max().item()] + [(x - y).abs().max().item() for x, y in zip(*grads)])
        print(f"  B={b} C={c} H={h} W={w} P={p} E={e}: max |triton - reference| over output and gradients {err:.2e}")
        assert err < 1e-3, "patch_embed: Triton kernel disagrees with the reference"
    print("interpreter check passed")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--img", type=int, default=224)
    ap.add_argument("--patch", type=int, default=16)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    args = ap.parse_args()
    if not has_cuda():
        no_cuda_notice("patch_embed")
        interpreter_check()
        return
    rows = measure(args)
    for r in rows:
        r.update(batch=args.batch, img=args.img, patch=args.patch, dim=args.dim, dtype=args.dtype)
    write_report(
        "patch_embed", rows, ["peer", "mode", "ms", "TFLOP/s", "GB/s", "peak_extra_MiB"],
        chart=chart(rows),
    )


if __name__ == "__main__":
    main()
