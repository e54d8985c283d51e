"""The Triton path of ``aimkern.patch_embed``: patchify + linear projection + bias + position embedding.

The Triton launchers (kernels/patch_embed.py), their custom ops (``aimkern::patch_embed_fwd``,
``aimkern::patch_embed_bwd_params``, ``aimkern::patch_embed_bwd_images``; typed arguments:
ops/_custom_op.py), the autograd formula and the entry ``patch_embed_triton``:

    out     = patches(images) @ W^T + bias + pos   patches: (B*N, K) gathered in-kernel, never stored
    dW      = dOut^T @ patches                     fp32 partials per slice, summed in a fixed order
    d(pos)  = dOut summed over the batch           in the same pass over dOut as dW
    db      = d(pos) summed over the tokens
    dImages = dOut @ W scattered back to NCHW      only when images require grad (never for uint8 images)

uint8 images carry their normalization in the params (``PatchEmbedParams.input_scale`` / ``input_shift``):
the forward and dW kernels read the uint8 pixels and compute each GEMM input as
``x * scale[c] + shift[c]`` in fp32, cast to the weight's dtype, in registers (no normalized copy).

Public launcher entry points (the custom ops run them; the compile gate drives them on meta tensors):
``launch_forward``, ``launch_backward_params`` and ``launch_backward_images``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from ._channel_affine import device_affine
from ._custom_op import TypedOp
from ._launch import (
    LaunchPolicy, cdiv, check_interpretable_dtype, current_policy, fixed_config, interpreting, kernels, launch,
    sm_count,
)

OP = "patch_embed"


@dataclass(frozen=True)
class PatchEmbedParams:
    """The options of one patch_embed call.

    input_scale, input_shift: None (float images, taken as they are), or C floats each (uint8 images): the
        GEMM's input value of pixel x of channel c is ``x * scale[c] + shift[c]``, with scale and shift
        rounded to float32 and the product and sum computed in fp32, then cast to the weight's dtype.
        ``aimkern.data.decode.pixel_affine(C)`` gives the model's ``(x / 255 - mean) / std``.
    """

    input_scale: Optional[Tuple[float, ...]] = None
    input_shift: Optional[Tuple[float, ...]] = None

    @property
    def normalizes(self) -> bool:
        return self.input_scale is not None


def _geometry(images: torch.Tensor, weight: torch.Tensor):
    """(B, C, P, GW, N, E, K) of one call."""
    b, c, h, w = images.shape
    e, _, p, _ = weight.shape
    return b, c, p, w // p, (h // p) * (w // p), e, c * p * p


def _affine(params: PatchEmbedParams, device: torch.device, out: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The (C,) float32 scale and shift the kernels read (``out`` stands in for both where the call has
    none: NORMALIZE=False never reads them)."""
    return device_affine(params.input_scale, params.input_shift, device, out)


def launch_forward(images, weight, bias, pos_embed, policy: LaunchPolicy,
                   params: PatchEmbedParams = PatchEmbedParams()) -> torch.Tensor:
    """images (B, C, H, W) float in weight's dtype, or uint8 with ``params``' affine; weight (E, C, P, P),
    bias (E,) or None, pos_embed (N, E) / (1, N, E) or None, any strides (each read through them, stride 0
    included) -> (B, N, E) in weight's dtype."""
    b, _, p, gw, n, e, k = _geometry(images, weight)
    m = b * n
    out = torch.empty((b, n, e), device=images.device, dtype=weight.dtype)
    if m == 0:
        return out
    pos = pos_embed.reshape(n, e) if pos_embed is not None else None
    scale, shift = _affine(params, images.device, out)
    launch(
        kernels("patch_embed").forward(m * e * k, weight.element_size() == 2),
        lambda META: (cdiv(e, META["BLOCK_E"]) * cdiv(m, META["BLOCK_M"]),),
        (images, weight, bias if bias is not None else out, pos if pos is not None else out, out, scale, shift,
         m, n, gw, e, k,
         *images.stride(), *weight.stride(), *(pos.stride() if pos is not None else (0, 0)),
         bias.stride(0) if bias is not None else 0),
        dtype=weight.dtype, policy=policy, P=p, HAS_BIAS=bias is not None, HAS_POS=pos is not None,
        NORMALIZE=params.normalizes,
    )
    return out


def launch_backward_params(grad, images, weight, want_weight: bool, want_pos: bool, policy: LaunchPolicy,
                           params: PatchEmbedParams = PatchEmbedParams()):
    """(dW in weight's dtype or an empty tensor, d(pos) as fp32 (N, E) or an empty tensor); uint8 images are
    normalized again as the forward did (``params``)."""
    b, _, p, gw, n, e, k = _geometry(images, weight)
    dw = weight.new_empty(0)
    dpos = grad.new_empty(0, dtype=torch.float32)
    if b == 0:  # no tokens: the gradients are exactly zero
        dw = weight.new_zeros(weight.shape) if want_weight else dw
        dpos = grad.new_zeros((n, e), dtype=torch.float32) if want_pos else dpos
    if b == 0 or not (want_weight or want_pos):
        return dw, dpos
    kern = kernels("patch_embed")
    choice = kern.backward_params(weight.element_size() == 2)
    tiles = fixed_config(choice, policy).kwargs
    split = kern.dw_slicing(b, n, e, k, want_weight, tiles, sm_count(images.device), interpreting())
    slices = split["n_blocks"] * split["b_chunks"]
    dw_part = grad.new_empty((slices, e, k) if want_weight else (0,), dtype=torch.float32)
    dpos_part = grad.new_empty((split["b_chunks"], n, e) if want_pos else (0,), dtype=torch.float32)
    k_tiles = cdiv(k, tiles["BLOCK_K"]) if want_weight else 1
    scale, shift = _affine(params, images.device, dpos_part)
    launch(
        choice, lambda META: (cdiv(e, META["BLOCK_E"]) * k_tiles, slices),
        (grad, images, dw_part, dpos_part, scale, shift,
         b, n, gw, e, k, split["b_per_slice"], split["n_blocks"],
         *grad.stride(), *images.stride()),
        dtype=weight.dtype, policy=policy, P=p, WANT_W=want_weight, WANT_POS=want_pos,
        NORMALIZE=params.normalizes,
    )
    # Fixed-order sums of the per-slice partials: deterministic, and tiny next to the GEMM.
    if want_weight:
        dw = dw_part.sum(0).reshape(weight.shape).to(weight.dtype)
    if want_pos:
        dpos = dpos_part.sum(0)
    return dw, dpos


def launch_backward_images(grad, weight, images, policy: LaunchPolicy) -> torch.Tensor:
    """grad (B, N, E) any strides -> d(images) (B, C, H, W) contiguous, in images' dtype (float images only:
    integer images have no gradient)."""
    b, _, p, gw, n, e, k = _geometry(images, weight)
    m = b * n
    dx = torch.empty(images.shape, device=images.device, dtype=images.dtype)
    if m == 0:
        return dx
    launch(
        kernels("patch_embed").backward_images(m * e * k, images.element_size() == 2),
        lambda META: (cdiv(k, META["BLOCK_K"]) * cdiv(m, META["BLOCK_M"]),),
        (grad, weight, dx, m, n, gw, e, k, *grad.stride(), *weight.stride(), *dx.stride()),
        dtype=images.dtype, policy=policy, P=p,
    )
    return dx


# ------------------------------------------------------------------------------ custom ops + autograd
# Scalars (ops/_custom_op.py): the params (uint8 images' affine), the autotune choice of the LaunchPolicy
# current at the forward (the backward ops get the same), and which parameter gradients
# ``patch_embed_bwd_params`` computes (d(pos) also gives d(bias)).
def _fwd(images, weight, bias, pos_embed, params: PatchEmbedParams, autotune: bool) -> torch.Tensor:
    return launch_forward(images, weight, bias, pos_embed, LaunchPolicy(autotune=autotune), params)


def _fwd_fake(images, weight, bias, pos_embed, params, autotune):
    b, _, _, _, n, e, _ = _geometry(images, weight)
    return weight.new_empty((b, n, e))


def _bwd_params(grad, images, weight, params: PatchEmbedParams, autotune: bool, want_weight: bool,
                want_pos: bool) -> tuple:
    """-> (dW like weight, d(pos) (N, E) fp32); one the call does not want is an empty (0,) tensor."""
    return launch_backward_params(grad, images, weight, want_weight, want_pos, LaunchPolicy(autotune=autotune),
                                  params)


def _bwd_params_fake(grad, images, weight, params, autotune, want_weight, want_pos):
    _, _, _, _, n, e, _ = _geometry(images, weight)
    dw = weight.new_empty(weight.shape) if want_weight else weight.new_empty(0)
    dpos = grad.new_empty((n, e) if want_pos else (0,), dtype=torch.float32)
    return dw, dpos


def _bwd_images(grad, weight, images, autotune: bool) -> torch.Tensor:
    return launch_backward_images(grad, weight, images, LaunchPolicy(autotune=autotune))


def _bwd_images_fake(grad, weight, images, autotune):
    return torch.empty(images.shape, device=images.device, dtype=images.dtype)


_AUTOTUNE = (("autotune", bool),)
patch_embed_fwd = TypedOp("patch_embed_fwd", ("images", "weight", "bias?", "pos_embed?"),
                          (PatchEmbedParams,) + _AUTOTUNE, "Tensor", _fwd, _fwd_fake)
patch_embed_bwd_params = TypedOp("patch_embed_bwd_params", ("grad", "images", "weight"),
                                 (PatchEmbedParams,) + _AUTOTUNE + (("want_weight", bool), ("want_pos", bool)),
                                 "(Tensor, Tensor)", _bwd_params, _bwd_params_fake)
patch_embed_bwd_images = TypedOp("patch_embed_bwd_images", ("grad", "weight", "images"), _AUTOTUNE, "Tensor",
                                 _bwd_images, _bwd_images_fake)


def _setup_context(ctx, images, weight, bias, pos_embed, params, autotune, output):
    ctx.save_for_backward(images, weight)  # uint8 images: a quarter of the float copy they replace
    ctx.params, ctx.autotune = params, autotune
    ctx.bias_dtype = bias.dtype if bias is not None else None
    ctx.pos_meta = (tuple(pos_embed.shape), pos_embed.dtype) if pos_embed is not None else None


def _backward(ctx, grad):
    images, weight = ctx.saved_tensors
    need_x, need_w, need_b, need_pos = ctx.needs_input_grad[:4]
    dx = dw = db = dpos = None
    if need_w or need_b or need_pos:
        dw, dpos32 = patch_embed_bwd_params(grad, images, weight, ctx.params, ctx.autotune, need_w,
                                            need_b or need_pos)
        dw = dw if need_w else None
        if need_b:
            db = dpos32.sum(0).to(ctx.bias_dtype)  # db = dOut summed over batch and tokens
        if need_pos:
            shape, dtype = ctx.pos_meta
            dpos = dpos32.reshape(shape).to(dtype)
    if need_x:  # (integer images never require grad)
        dx = patch_embed_bwd_images(grad, weight, images, ctx.autotune)
    return dx, dw, db, dpos  # images, weight, bias, pos_embed


patch_embed_fwd.register_autograd(_backward, setup_context=_setup_context)


def patch_embed_triton(images, weight, bias, pos_embed, params: PatchEmbedParams) -> torch.Tensor:
    """The Triton path on checked inputs (images (B, C, H, W) float, or uint8 with ``params``' affine;
    weight (E, C, P, P), bias, pos_embed) -> (B, N, E) in weight's dtype."""
    check_interpretable_dtype(weight, OP)
    # The fused GEMM multiplies images by weight in one dtype (as F.linear would require); uint8 images are
    # converted to the weight's dtype in registers.
    compute = weight.dtype if images.dtype == torch.uint8 else images.dtype
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.dtype != compute:
            what = "the weight's" if images.dtype == torch.uint8 else "the images'"
            raise TypeError(f"{OP}: {name} must have {what} dtype {compute} for backend='triton', got {t.dtype}")
    return patch_embed_fwd(images, weight, bias, pos_embed, params, current_policy().autotune)
