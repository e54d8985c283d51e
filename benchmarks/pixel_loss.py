"""Next-patch pixel loss: aimkern.next_patch_pixel_loss against the PyTorch reference and torch.compile of it.

    python benchmarks/pixel_loss.py [--batch 256] [--img 224] [--patch 16] [--dtype bf16]

Forward and forward+backward (d(pred); images are data) in the same run, AIM's setting: norm_pix, a
per-sample prefix, offset 1. Median ms (triton.testing.do_bench), GB/s over the bytes the op must move
(pred and images read once; in fwd+bwd also d(pred) written once), that as a share of the 4.2 TB/s copy
ceiling, and peak extra memory. Table on stdout, JSON and PNG under $AIMKERN_BENCH_OUT or benchmarks/out/.
Without CUDA it measures nothing and runs a tiny correctness check under Triton's interpreter instead.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before aimkern's kernels are defined

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
    COPY_CEILING_GBPS,
    has_cuda,
    no_cuda_notice,
    peak_extra_mib,
    time_ms,
    try_run,
    write_report,
)

import aimkern  # noqa: E402
from aimkern.reference.pixel_loss import next_patch_pixel_loss_reference  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def aimkern_op(pred, images, prefix, patch_size):
    return aimkern.next_patch_pixel_loss(pred, images, patch_size=patch_size, prefix_len=prefix, backend="triton")


def reference_peer(pred, images, prefix, patch_size):
    return next_patch_pixel_loss_reference(pred, images, patch_size=patch_size, prefix_len=prefix)


def measure(args) -> list[dict]:
    dtype = DTYPES[args.dtype]
    b, c, s, p = args.batch, 3, args.img, args.patch
    n, d = (s // p) ** 2, 3 * p * p
    images = torch.rand(b, c, s, s, device="cuda", dtype=dtype)
    pred = torch.randn(b, n, d, device="cuda", dtype=dtype, requires_grad=True)
    prefix = torch.randint(0, n, (b,), device="cuda", dtype=torch.int32)  # AIM: a random prefix per image
    nbytes = pred.numel() * pred.element_size() + images.numel() * images.element_size()
    moved = {"fwd": nbytes, "fwd+bwd": nbytes + pred.numel() * pred.element_size()}
    peers = {
        "aimkern": aimkern_op,
        "reference (eager)": reference_peer,
        "compile(reference)": torch.compile(reference_peer),
    }
    rows = []
    for name, fn in peers.items():
        run = {
            "fwd": lambda fn=fn: fn(pred, images, prefix, p),
            "fwd+bwd": lambda fn=fn: torch.autograd.grad(fn(pred, images, prefix, p), pred),
        }
        for mode, call in run.items():
            print(f"{name} {mode} ...", flush=True)
            ms = try_run(lambda call=call: time_ms(call))
            mib = try_run(lambda call=call: peak_extra_mib(call)) if ms is not None else None
            gbps = moved[mode] / ms / 1e6 if ms else None
            rows.append({
                "peer": name, "mode": mode, "ms": ms, "GB/s": gbps,
                "%copy": 100.0 * gbps / COPY_CEILING_GBPS if gbps else None,
                "peak_extra_MiB": mib,
            })
    return rows


def chart(rows):
    def draw(ax):
        modes = ["fwd", "fwd+bwd"]
        names = list(dict.fromkeys(r["peer"] for r in rows))
        width = 0.8 / len(modes)
        for i, mode in enumerate(modes):
            ys = [next((r["GB/s"] or 0.0) for r in rows if r["peer"] == nm and r["mode"] == mode) for nm in names]
            ax.bar([x + i * width for x in range(len(names))], ys, width, label=mode)
        ax.axhline(COPY_CEILING_GBPS, color="gray", linestyle="--", label="copy ceiling")
        ax.set_xticks([x + width / 2 for x in range(len(names))], names)
        ax.set_ylabel("GB/s over the bytes that must move (higher is better)")
        ax.set_title("next-patch pixel loss")
        ax.legend()

    return draw


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
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--img", type=int, default=224)
    ap.add_argument("--patch", type=int, default=16)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    args = ap.parse_args()
    if not has_cuda():
        no_cuda_notice("pixel_loss")
        interpreter_check()
        return
    rows = measure(args)
    for r in rows:
        r.update(batch=args.batch, img=args.img, patch=args.patch, dtype=args.dtype)
    write_report(
        "pixel_loss", rows, ["peer", "mode", "ms", "GB/s", "%copy", "peak_extra_MiB"],
        chart=chart(rows),
    )


if __name__ == "__main__":
    main()
