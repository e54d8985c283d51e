"""The spec of ``aimkern.patch_embed``: checks, candidates, key parts, tolerance.

Candidates (each ``fn(images, weight, bias, pos_embed, params)``, params a PatchEmbedParams):

    triton         aimkern's fused patchify + GEMM + bias + position add (one dtype for images and weight,
                   or uint8 images normalized in its kernels)
    conv2d         F.conv2d(stride=P) + flatten + transpose + position add (cuDNN on a GPU; float images)
    unfold-linear  (normalize +) patchify + F.linear + position add: the reference

uint8 images: the call's floating dtype (``Problem.dtype``, the dispatch key's) is the weight's; the
problem records uint8 for the images (``Problem.dtypes``) and the mask kind says "uint8".
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..checks import check_float_dtype, check_same_device, check_tensor
from ..ops.patch_embed import PatchEmbedParams, patch_embed_triton
from ..reference.patch_embed import patch_embed_reference
from .common import DOT_TOLERANCE, autotune_min_macs, channel_values, kernel_unsupported, pow2, randint, randn
from .opspec import Candidate, OpSpec, Problem, add_spec

NAME = "patch_embed"


def check_params(images: torch.Tensor, params: PatchEmbedParams, op: str) -> PatchEmbedParams:
    """``params`` with its affine as tuples of floats; uint8 images need it, float images take none."""
    c = images.shape[1]
    scale = channel_values(params.input_scale, "input_scale", c, op)
    shift = channel_values(params.input_shift, "input_shift", c, op)
    if (scale is None) != (shift is None):
        raise ValueError(f"{op}: input_scale and input_shift go together: give both or neither")
    if images.dtype == torch.uint8:
        if scale is None:
            raise ValueError(f"{op}: uint8 images need input_scale and input_shift (C floats each: the GEMM's "
                             "input is x * input_scale[c] + input_shift[c]; aimkern.data.decode.pixel_affine(C) "
                             "gives (x / 255 - mean) / std, and (1.0,) * C, (0.0,) * C the raw values)")
    elif images.is_floating_point() and scale is not None:
        raise ValueError(f"{op}: input_scale / input_shift normalize uint8 images; {images.dtype} images are "
                         "taken as they are (normalize them first, or pass the uint8 pixels)")
    return PatchEmbedParams(input_scale=scale, input_shift=shift)


def check(tensors: tuple, params: PatchEmbedParams, backend: str, op: str = NAME) -> tuple:
    """((images (B, C, H, W) float or uint8, weight (E, C, P, P), bias (E,) or None, pos_embed (N, E) /
    (1, N, E) or None), params), checked; the params' affine normalized to tuples of floats."""
    images, weight, bias, pos_embed = tensors
    check_tensor(images, "images", op, ndim=4)
    check_tensor(weight, "weight", op, ndim=4)
    b, c, h, w = images.shape
    e, wc, p, p2 = weight.shape
    if p != p2:
        raise ValueError(f"{op}: weight must be (E, C, P, P) with square patches, got {tuple(weight.shape)}")
    if wc != c:
        raise ValueError(f"{op}: weight has {wc} input channels but images have C={c}")
    if h % p or w % p or h == 0 or w == 0:
        raise ValueError(f"{op}: image height and width must be positive multiples of P={p}, got H={h}, W={w}")
    n = (h // p) * (w // p)
    if bias is not None:
        check_tensor(bias, "bias", op, ndim=1)
        if bias.shape != (e,):
            raise ValueError(f"{op}: bias must have shape (E,) = ({e},), got {tuple(bias.shape)}")
    if pos_embed is not None:
        check_tensor(pos_embed, "pos_embed", op)
        if tuple(pos_embed.shape) not in ((n, e), (1, n, e)):
            raise ValueError(
                f"{op}: pos_embed must have shape (N, E) or (1, N, E) = (1, {n}, {e}), got {tuple(pos_embed.shape)}"
            )
    check_same_device((("images", images), ("weight", weight), ("bias", bias), ("pos_embed", pos_embed)), op)
    uint8 = images.dtype == torch.uint8
    for name, t in (("images", images), ("weight", weight), ("bias", bias), ("pos_embed", pos_embed)):
        if t is not None and not (uint8 and name == "images"):
            check_float_dtype(t, name, op, backend)
    params = check_params(images, params, op)
    if backend == "reference":  # one GEMM in one dtype (F.linear's rule), said with the argument's name
        compute, whose = (weight.dtype, "the weight's") if uint8 else (images.dtype, "images'")
        for name, t in (("weight", weight), ("bias", bias)):
            if t is not None and t.dtype != compute:
                raise TypeError(f"{op}: {name} must have {whose} dtype {compute} on the reference backend, "
                                f"got {t.dtype}")
    return tensors, params


def compute_dtype(tensors: tuple) -> torch.dtype:
    """The call's floating dtype: the images', or the weight's for uint8 images."""
    return tensors[1].dtype if tensors[0].dtype == torch.uint8 else tensors[0].dtype


def reference(images, weight, bias, pos_embed, params: PatchEmbedParams) -> torch.Tensor:
    return patch_embed_reference(images, weight, bias, pos_embed, params.input_scale, params.input_shift)


def _triton_unsupported(problem: Problem) -> Optional[str]:
    wrong = kernel_unsupported(problem)
    if wrong:
        return wrong
    if problem.dtype_of(0) not in (torch.uint8, problem.torch_dtype):
        return f"images in {problem.dtype_of(0)} are neither uint8 nor the weight's dtype"
    for i, name in ((1, "weight"), (2, "bias")):
        if problem.shapes[i] is not None and problem.dtype_of(i) != problem.torch_dtype:
            return f"the fused GEMM needs {name} in the call's dtype {problem.dtype}"
    return None


def _conv2d(images, weight, bias, pos_embed, params: PatchEmbedParams) -> torch.Tensor:
    out = F.conv2d(images, weight, bias, stride=weight.shape[-1]).flatten(2).transpose(1, 2)
    if pos_embed is not None:
        out = out + pos_embed.reshape(1, -1, weight.shape[0]).to(out.dtype)
    return out


def _conv_unsupported(problem: Problem) -> Optional[str]:
    if problem.dtype_of(0) == torch.uint8:
        return "conv2d takes float images (uint8 ones would need a normalized copy first)"
    dtypes = {problem.dtype_of(i) for i in range(3) if problem.shapes[i] is not None}
    return None if len(dtypes) == 1 else "conv2d needs one dtype for images, weight and bias"


def mask_kind(problem: Problem) -> str:
    parts = [n for n, i in (("bias", 2), ("pos", 3)) if problem.shapes[i] is not None]
    if problem.dtype_of(0) == torch.uint8:  # the candidates that apply differ: never one key with float images
        parts.append("uint8")
    return "+".join(parts) or "plain"


def shape_band(problem: Problem) -> str:
    b, c, h, w = problem.shapes[0]
    e, _, p, _ = problem.shapes[1]
    return f"b<={pow2(b)}|c{c}|{h}x{w}|p{p}|e{e}"


def small_problem(problem: Problem) -> Problem:
    """The same channels, patch size and embedding width. Where the real GEMM (B x tokens x E x C P P) is
    large enough to be autotuned, whole images, as few as reach that size (the large configs run); else two
    images of at most 3 x 4 patches (the small fixed config, as the real call)."""
    b, c, h, w = problem.shapes[0]
    e, _, p, _ = problem.shapes[1]
    per_image = (h // p) * (w // p) * e * c * p * p
    shapes = list(problem.shapes)
    least = autotune_min_macs(problem.torch_dtype.itemsize == 2)
    if least is not None and per_image and b * per_image >= least:
        shapes[0] = (min(b, -(-least // per_image)), c, h, w)
        return problem.with_(shapes=tuple(shapes))
    h2, w2 = min(h, 3 * p), min(w, 4 * p)
    shapes[0] = (min(b, 2), c, h2, w2)
    if shapes[3] is not None:
        n2 = (h2 // p) * (w2 // p)
        shapes[3] = (n2, e) if len(shapes[3]) == 2 else (1, n2, e)
    return problem.with_(shapes=tuple(shapes))


def make_inputs(problem: Problem, gen: torch.Generator) -> tuple:
    """Normal floats (the weight times K**-0.5); uint8 images uniform in [0, 255] (under the params'
    affine they then spread like normalized pixels)."""
    fan_in = problem.shapes[1][1] * problem.shapes[1][2] * problem.shapes[1][3]
    images = randint(problem, 0, 0, 256, gen) if problem.dtype_of(0) == torch.uint8 else randn(problem, 0, gen)
    return (images, randn(problem, 1, gen, fan_in**-0.5), randn(problem, 2, gen), randn(problem, 3, gen))


SPEC = add_spec(OpSpec(
    name=NAME,
    tensor_args=("images", "weight", "bias", "pos_embed"),
    positional=4,
    params_type=PatchEmbedParams,
    compute_dtype=compute_dtype,
    check=check,
    reference=reference,
    triton=patch_embed_triton,
    candidates=[
        Candidate("triton", patch_embed_triton, "aimkern", _triton_unsupported, interpreted=True),
        Candidate("conv2d", _conv2d, "torch", _conv_unsupported),
        Candidate("unfold-linear", reference, "torch"),
    ],
    make_inputs=make_inputs,
    small_problem=small_problem,
    mask_kind=mask_kind,
    shape_band=shape_band,
    autocast=(0, 1, 2, 3),
    tolerance=DOT_TOLERANCE,
))
