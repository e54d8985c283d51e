"""The spec of ``aimkern.patch_embed``.

Candidates:

    triton         aimkern's fused patchify + GEMM + bias + position add (one dtype for images and weight)
    conv2d         F.conv2d(stride=P) + flatten + transpose + position add (cuDNN on a GPU)
    unfold-linear  patchify + F.linear + position add: the reference
"""
from __future__ import annotations

import importlib
from typing import Optional

import torch
import torch.nn.functional as F

from ...reference.patch_embed import patch_embed_reference
from .._boundary import encode
from .._checks import interpreter_dtype_problem
from .._launch import LaunchPolicy, interpreting
from ..spec import Candidate, OpSpec, Problem, Tolerance, add_spec
from .common import GATE_DTYPES, gate_dtypes, meta, pow2, problem, randn

# The module, not the function: aimkern.ops binds the name 'patch_embed' to the public op where they share it.
op = importlib.import_module("aimkern.ops.patch_embed")

# Benchmark shapes and peers (benchmarks/patch_embed.py through benchmarks/harness.py): ViT-B/16's stem;
# peers map a label to a candidate, or "backend=triton" for the public op forced onto aimkern's path.
BENCH = {
    "shapes": [dict(batch=256, img=224, patch=16, dim=768)],
    "cpu": [dict(batch=2, img=32, patch=16, dim=64)],
    "peers": {"aimkern": "backend=triton", "nn.Conv2d+flatten+add": "conv2d", "unfold+nn.Linear+add": "unfold-linear"},
}


def _triton_unsupported(problem: Problem) -> Optional[str]:
    if problem.device_type == "cpu" and not interpreting():
        return "Triton on CPU tensors needs its interpreter (TRITON_INTERPRET=1)"
    if problem.dtype not in ("float16", "bfloat16", "float32"):
        return f"{problem.dtype} is not a kernel dtype"
    wrong = interpreter_dtype_problem(problem.dtype, problem.device_type)
    if wrong:
        return wrong
    for i, name in ((1, "weight"), (2, "bias")):
        if problem.shapes[i] is not None and problem.dtype_of(i) != problem.dtype_of(0):
            return f"the fused GEMM needs {name} in the images' dtype"
    return None


def _triton(images, weight, bias=None, pos_embed=None):
    return op._patch_embed_triton(images, weight, bias, pos_embed)


def _conv2d(images, weight, bias=None, pos_embed=None):
    out = F.conv2d(images, weight, bias, stride=weight.shape[-1]).flatten(2).transpose(1, 2)
    if pos_embed is not None:
        out = out + pos_embed.reshape(1, -1, weight.shape[0]).to(out.dtype)
    return out


def _conv_unsupported(problem: Problem) -> Optional[str]:
    dtypes = {problem.dtype_of(i) for i in range(3) if problem.shapes[i] is not None}
    return None if len(dtypes) == 1 else "conv2d needs one dtype for images, weight and bias"


def mask_kind(problem: Problem) -> str:
    parts = [n for n, i in (("bias", 2), ("pos", 3)) if problem.shapes[i] is not None]
    return "+".join(parts) or "plain"


def band(problem: Problem) -> str:
    b, c, h, w = problem.shapes[0]
    e, _, p, _ = problem.shapes[1]
    return f"b<={pow2(b)}|c{c}|{h}x{w}|p{p}|e{e}"


def small_problem(problem: Problem) -> Problem:
    """Two images of at most 3 x 4 patches, the same channels, patch size and embedding width."""
    b, c, h, w = problem.shapes[0]
    e, _, p, _ = problem.shapes[1]
    h2, w2 = min(h, 3 * p), min(w, 4 * p)
    shapes = list(problem.shapes)
    shapes[0] = (min(b, 2), c, h2, w2)
    if shapes[3] is not None:
        n2 = (h2 // p) * (w2 // p)
        shapes[3] = (n2, e) if len(shapes[3]) == 2 else (1, n2, e)
    return problem.with_(shapes=tuple(shapes))


def make_inputs(problem: Problem, gen: torch.Generator) -> tuple:
    fan_in = problem.shapes[1][1] * problem.shapes[1][2] * problem.shapes[1][3]
    return (randn(problem, 0, gen), randn(problem, 1, gen, fan_in**-0.5), randn(problem, 2, gen),
            randn(problem, 3, gen))


def gate_problems(subset: str):
    """(label, thunk) pairs driving the patch-embed launchers on meta tensors: ViT-B/16 at batch 256 (the
    autotuned big GEMMs) and a small problem (the fixed small tiles), each dtype, with and without bias, and
    every subset of the parameter gradients."""
    shapes = {"vit-b16 x256": (256, 224, 16, 768), "small": (2, 32, 4, 40)}
    for dname in gate_dtypes(subset):
        dtype = GATE_DTYPES[dname]
        for sname, (b, img, p, e) in shapes.items():
            for bias in (True, False) if dname == "bf16" else (True,):
                def run(dtype=dtype, b=b, img=img, p=p, e=e, bias=bias):
                    images = meta(b, 3, img, img, dtype=dtype)
                    weight = meta(e, 3, p, p, dtype=dtype)
                    n = (img // p) ** 2
                    policy = LaunchPolicy()
                    out = op.launch_forward(images, weight, meta(e, dtype=dtype) if bias else None,
                                            meta(n, e, dtype=dtype), policy)
                    op.launch_backward_params(out, images, weight, True, True, policy)
                    op.launch_backward_params(out, images, weight, True, False, policy)
                    op.launch_backward_params(out, images, weight, False, True, policy)
                    op.launch_backward_images(out, weight, images, policy)

                yield f"patch_embed {dname} {sname} bias={bias}", run


# ---------------------------------------------------------------------------------- contract tests
def _problem(dtype: str, b: int, c: int, h: int, w: int, p: int, e: int, bias: bool, pos, images_grad: bool) -> Problem:
    n = (h // p) * (w // p)
    pos_shape = None if pos is None else ((1, n, e) if pos == "1NE" else (n, e))
    return problem("patch_embed", dtype, ((b, c, h, w), (e, c, p, p), (e,) if bias else None, pos_shape), {},
                   (images_grad, True, bias, pos is not None), (None, None, None, None))


def examples(dtype: str) -> list:
    """K = C*P*P not a power of two, P = 5, H != W, B = 3 (an image chunk of the dW kernel loops), each
    optional part on and off, images with and without a gradient."""
    return [
        _problem(dtype, 2, 3, 12, 20, 4, 40, True, "1NE", True),
        _problem(dtype, 3, 1, 10, 15, 5, 24, False, "NE", False),
        _problem(dtype, 1, 4, 8, 8, 4, 16, True, None, True),
    ]


def empty_batch(dtype: str) -> Problem:
    return _problem(dtype, 0, 3, 8, 12, 4, 16, True, "1NE", True)


def custom_ops() -> list:
    """opcheck samples of the three patch-embed ops: forward with bias and position, each backward."""
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, 8, 12, generator=gen)
    weight = torch.randn(16, 3, 4, 4, generator=gen) * 0.2
    bias, pos = torch.randn(16, generator=gen), torch.randn(1, 6, 16, generator=gen)
    grad = torch.randn(2, 6, 16, generator=gen)
    policy = LaunchPolicy(autotune=False)
    fwd = encode(op.PatchEmbedCall(policy=policy))
    leaves = tuple(t.clone().requires_grad_() for t in (images, weight, bias, pos))
    out = [("patch_embed_fwd", torch.ops.aimkern.patch_embed_fwd, (*leaves, fwd))]
    for want_weight, want_pos in ((True, True), (True, False), (False, True)):
        call = encode(op.PatchEmbedCall(policy=policy, want_weight=want_weight, want_pos=want_pos))
        out.append((f"patch_embed_bwd_params w={want_weight} pos={want_pos}", torch.ops.aimkern.patch_embed_bwd_params,
                    (grad, images, weight, call)))
    out.append(("patch_embed_bwd_images", torch.ops.aimkern.patch_embed_bwd_images, (grad, weight, images, fwd)))
    return out


SPEC = add_spec(OpSpec(
    name="patch_embed",
    tensor_args=("images", "weight", "bias", "pos_embed"),
    grad_args=("images", "weight", "bias", "pos_embed"),
    reference=patch_embed_reference,
    candidates=[
        Candidate("triton", _triton, "aimkern", _triton_unsupported, interpreted=True),
        Candidate("conv2d", _conv2d, "torch", _conv_unsupported),
        Candidate("unfold-linear", patch_embed_reference, "torch"),
    ],
    make_inputs=make_inputs,
    small_problem=small_problem,
    mask_kind=mask_kind,
    band=band,
    tolerance=Tolerance(factor=2.0, atol={"float32": 1e-5, "float16": 2e-3, "bfloat16": 1.6e-2}),
    bench=BENCH,
    gate_problems=gate_problems,
    family="patch_embed",
    custom_ops=custom_ops,
    examples=examples,
    empty_batch=empty_batch,
))
