"""The spec of ``aimkern.next_patch_pixel_loss``.

Candidates:

    triton     aimkern's fused kernel (one read of pred and images forward, one backward; images are data)
    reference  patchify + per-patch normalization + shift + masked MSE in PyTorch
"""
from __future__ import annotations

import importlib
from typing import Optional

import torch

from ...reference.pixel_loss import next_patch_pixel_loss_reference
from .._boundary import encode
from .._launch import LaunchPolicy, interpreting
from ..spec import Candidate, OpSpec, Problem, Tolerance, add_spec
from .common import GATE_DTYPES, gate_dtypes, meta, pow2, problem, randint, randn, seq_band

# The module, not the function: aimkern.ops binds the name 'pixel_loss' to the public op where they share it.
op = importlib.import_module("aimkern.ops.pixel_loss")

# Benchmark shapes and peers (benchmarks/pixel_loss.py through benchmarks/harness.py): AIM's setting at
# 224 px; peers map a label to a candidate, or "backend=triton" for the public op on aimkern's path.
BENCH = {
    "shapes": [dict(batch=256, img=224, patch=16)],
    "cpu": [dict(batch=2, img=32, patch=16)],
    "peers": {"aimkern": "backend=triton", "reference (eager)": "reference"},
}


def _triton_unsupported(problem: Problem) -> Optional[str]:
    if problem.device_type == "cpu" and not interpreting():
        return "Triton on CPU tensors needs its interpreter (TRITON_INTERPRET=1)"
    for i, name in ((0, "pred"), (1, "images")):
        if problem.dtype_of(i) not in (torch.float16, torch.bfloat16, torch.float32):
            return f"{name} in {problem.dtype_of(i)} is not a kernel dtype"
    if problem.requires_grad[1]:
        return "treats images as data (no gradient); the images require grad"
    return None


def _triton(pred, images, *, prefix_len=None, **options):
    return op._pixel_loss_triton(pred, images, prefix_len, op.PixelLossParams(**options))


def _reference(pred, images, *, prefix_len=None, **options):
    return next_patch_pixel_loss_reference(pred, images, prefix_len=prefix_len, **options)


def mask_kind(problem: Problem) -> str:
    kind = f"offset{problem.option('offset', 1)}" + ("+prefix" if problem.shapes[2] is not None else "")
    return kind + ("" if problem.option("norm_pix", True) else "+raw")


def band(problem: Problem) -> str:
    b, n, d = problem.shapes[0]
    return f"b<={pow2(b)}|n{seq_band(n)}|d{d}|c{problem.shapes[1][1]}"


def small_problem(problem: Problem) -> Problem:
    """Two images of at most 3 x 5 patches, the same patch size, channels and options."""
    b, c, h, w = problem.shapes[1]
    p = problem.option("patch_size")
    h2, w2 = min(h, 3 * p), min(w, 5 * p)
    b2 = min(b, 2)
    n2 = (h2 // p) * (w2 // p)
    return problem.with_(shapes=((b2, n2, problem.shapes[0][2]), (b2, c, h2, w2),
                                 (b2,) if problem.shapes[2] is not None else None))


def make_inputs(problem: Problem, gen: torch.Generator) -> tuple:
    n = problem.shapes[0][1]
    return randn(problem, 0, gen), randn(problem, 1, gen), randint(problem, 2, 0, n + 1, gen)


def _call_layout(tensors: tuple, options: dict) -> tuple:
    pred, images, prefix = tensors
    return (pred, images), dict(options, prefix_len=prefix)


def gate_problems(subset: str):
    """(label, thunk) pairs driving the pixel-loss launchers on meta tensors: AIM's 224 px / P = 16 batch of
    64, each dtype, with and without a prefix and norm_pix; forward and backward."""
    for dname in gate_dtypes(subset):
        dtype = GATE_DTYPES[dname]
        for prefix in (True, False) if dname == "bf16" else (True,):
            for norm_pix in (True, False) if dname == "bf16" else (True,):
                def run(dtype=dtype, prefix=prefix, norm_pix=norm_pix):
                    pred, images = meta(64, 196, 768, dtype=dtype), meta(64, 3, 224, 224, dtype=dtype)
                    pre = meta(64, dtype=torch.int32) if prefix else None
                    params = op.PixelLossParams(patch_size=16, norm_pix=norm_pix)
                    policy = LaunchPolicy()
                    op.launch_forward(pred, images, pre, params, policy)
                    op.launch_backward(pred, images, pre, meta(1, dtype=torch.float32), params, policy)

                yield f"pixel_loss {dname} prefix={prefix} norm_pix={norm_pix}", run


# ---------------------------------------------------------------------------------- contract tests
def _problem(dtype: str, b: int, c: int, h: int, w: int, p: int, prefix: bool, grad: bool, **options) -> Problem:
    opts = dict(patch_size=p, offset=1, norm_pix=True, eps=1e-6)
    opts.update(options)
    n = (h // p) * (w // p)
    return problem("next_patch_pixel_loss", dtype, ((b, n, p * p * c), (b, c, h, w), (b,) if prefix else None),
                   opts, (grad, False, False), (None, None, "int32"))


def examples(dtype: str) -> list:
    """P = 4 and 5, C = 1 and 3, non-square images, offsets 0 to 3, prefixes, raw and normalized targets."""
    return [
        _problem(dtype, 2, 3, 12, 20, 4, True, True, offset=2),
        _problem(dtype, 2, 1, 10, 15, 5, False, True, norm_pix=False),
        _problem(dtype, 1, 3, 8, 12, 4, True, True, offset=0, eps=0.5),
        _problem(dtype, 2, 3, 8, 8, 4, False, False, offset=3),
    ]


def empty_batch(dtype: str) -> Problem:
    return _problem(dtype, 0, 3, 8, 12, 4, False, True)


def custom_ops() -> list:
    """opcheck samples of the pixel-loss forward (with a prefix) and backward."""
    gen = torch.Generator().manual_seed(0)
    pred, images = torch.randn(2, 6, 48, generator=gen), torch.rand(2, 3, 8, 12, generator=gen)
    prefix = torch.tensor([1, 4], dtype=torch.int32)
    call = encode(op.PixelLossCall(params=op.PixelLossParams(patch_size=4, offset=1), policy=LaunchPolicy(autotune=False)))
    return [
        ("next_patch_pixel_loss_fwd", torch.ops.aimkern.next_patch_pixel_loss_fwd,
         (pred.clone().requires_grad_(), images, prefix, call)),
        ("next_patch_pixel_loss_bwd", torch.ops.aimkern.next_patch_pixel_loss_bwd,
         (torch.tensor(1.5), pred, images, prefix, call)),
    ]


SPEC = add_spec(OpSpec(
    name="next_patch_pixel_loss",
    tensor_args=("pred", "images", "prefix_len"),
    grad_args=("pred", "images"),
    reference=_reference,
    candidates=[
        Candidate("triton", _triton, "aimkern", _triton_unsupported, interpreted=True),
        Candidate("reference", _reference, "torch"),
    ],
    make_inputs=make_inputs,
    small_problem=small_problem,
    mask_kind=mask_kind,
    band=band,
    call_layout=_call_layout,
    tolerance=Tolerance(factor=2.0, atol={"float32": 1e-5, "float16": 1e-4, "bfloat16": 1e-3}),
    bench=BENCH,
    gate_problems=gate_problems,
    family="pixel_loss",
    custom_ops=custom_ops,
    examples=examples,
    empty_batch=empty_batch,
))
