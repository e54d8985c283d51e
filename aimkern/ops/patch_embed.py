"""`aimkern.patch_embed`: patchify + linear projection + bias + position embedding, raster order.

Backend dispatch, input checks, the Triton launchers (kernels/patch_embed.py), their custom-op
registration (``aimkern::patch_embed_fwd``, ``aimkern::patch_embed_bwd_params``,
``aimkern::patch_embed_bwd_images``) and the autograd formula:

    out     = patches(images) @ W^T + bias + pos   patches: (B*N, K) gathered in-kernel, never stored
    dW      = dOut^T @ patches                     fp32 partials per slice, summed in a fixed order
    d(pos)  = dOut summed over the batch           in the same pass over dOut as dW
    db      = d(pos) summed over the tokens
    dImages = dOut @ W scattered back to NCHW      only when images require grad

The custom ops take their non-tensor arguments as one str, the encoded ``PatchEmbedCall`` (the
``LaunchPolicy`` of the forward, which gradients to compute; ops/_boundary.py). Public launcher entry
points (the custom ops run them; the compile gate drives them on meta tensors): ``launch_forward``,
``launch_backward_params`` and ``launch_backward_images``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..reference.patch_embed import patch_embed_reference
from ._checks import (
    autocast_inputs, check_backend_name, check_float_dtype, check_interpretable_dtype, check_same_device,
    check_tensor, measured_auto, resolve_backend, run_dispatched,
)
from ._boundary import crosses_boundary, decode, encode
from ._launch import LaunchPolicy, cdiv, current_policy, fixed_config, interpreting, kernels, launch, sm_count

OP = "patch_embed"


def _check_inputs(images, weight, bias, pos_embed, backend: str) -> None:
    check_tensor(images, "images", OP, ndim=4)
    check_tensor(weight, "weight", OP, ndim=4)
    b, c, h, w = images.shape
    e, wc, p, p2 = weight.shape
    if p != p2:
        raise ValueError(f"{OP}: weight must be (E, C, P, P) with square patches, got {tuple(weight.shape)}")
    if wc != c:
        raise ValueError(f"{OP}: weight has {wc} input channels but images have C={c}")
    if h % p or w % p or h == 0 or w == 0:
        raise ValueError(f"{OP}: image height and width must be positive multiples of P={p}, got H={h}, W={w}")
    n = (h // p) * (w // p)
    if bias is not None:
        check_tensor(bias, "bias", OP, ndim=1)
        if bias.shape != (e,):
            raise ValueError(f"{OP}: bias must have shape (E,) = ({e},), got {tuple(bias.shape)}")
    if pos_embed is not None:
        check_tensor(pos_embed, "pos_embed", OP)
        if tuple(pos_embed.shape) not in ((n, e), (1, n, e)):
            raise ValueError(
                f"{OP}: pos_embed must have shape (N, E) or (1, N, E) = (1, {n}, {e}), got {tuple(pos_embed.shape)}"
            )
    check_same_device((("images", images), ("weight", weight), ("bias", bias), ("pos_embed", pos_embed)), OP)
    for name, t in (("images", images), ("weight", weight), ("bias", bias), ("pos_embed", pos_embed)):
        if t is not None:
            check_float_dtype(t, name, OP, backend)
    if backend == "reference":  # one GEMM in one dtype (F.linear's rule), said with the argument's name
        for name, t in (("weight", weight), ("bias", bias)):
            if t is not None and t.dtype != images.dtype:
                raise TypeError(f"{OP}: {name} must have images' dtype {images.dtype} on the reference backend, "
                                f"got {t.dtype}")


def _geometry(images: torch.Tensor, weight: torch.Tensor):
    """(B, C, P, GW, N, E, K) of one call."""
    b, c, h, w = images.shape
    e, _, p, _ = weight.shape
    return b, c, p, w // p, (h // p) * (w // p), e, c * p * p


def launch_forward(images, weight, bias, pos_embed, policy: LaunchPolicy) -> torch.Tensor:
    """images (B, C, H, W), weight (E, C, P, P), bias (E,) or None, pos_embed (N, E) / (1, N, E) or None,
    any strides (each read through them, stride 0 included) -> (B, N, E) in images' dtype."""
    b, _, p, gw, n, e, k = _geometry(images, weight)
    m = b * n
    out = torch.empty((b, n, e), device=images.device, dtype=images.dtype)
    if m == 0:
        return out
    pos = pos_embed.reshape(n, e) if pos_embed is not None else None
    launch(
        kernels("patch_embed").forward(m * e * k, images.element_size() == 2),
        lambda META: (cdiv(e, META["BLOCK_E"]) * cdiv(m, META["BLOCK_M"]),),
        (images, weight, bias if bias is not None else out, pos if pos is not None else out, out,
         m, n, gw, e, k,
         *images.stride(), *weight.stride(), *(pos.stride() if pos is not None else (0, 0)),
         bias.stride(0) if bias is not None else 0),
        dtype=images.dtype, policy=policy, P=p, HAS_BIAS=bias is not None, HAS_POS=pos is not None,
    )
    return out


def launch_backward_params(grad, images, weight, want_weight: bool, want_pos: bool, policy: LaunchPolicy):
    """(dW in weight's dtype or an empty tensor, d(pos) as fp32 (N, E) or an empty tensor)."""
    b, _, p, gw, n, e, k = _geometry(images, weight)
    dw = weight.new_empty(0)
    dpos = grad.new_empty(0, dtype=torch.float32)
    if b == 0:  # no tokens: the gradients are exactly zero
        dw = weight.new_zeros(weight.shape) if want_weight else dw
        dpos = grad.new_zeros((n, e), dtype=torch.float32) if want_pos else dpos
    if b == 0 or not (want_weight or want_pos):
        return dw, dpos
    kern = kernels("patch_embed")
    choice = kern.backward_params(images.element_size() == 2)
    tiles = fixed_config(choice, policy).kwargs
    split = kern.dw_slicing(b, n, e, k, want_weight, tiles, sm_count(images.device), interpreting())
    slices = split["n_blocks"] * split["b_chunks"]
    dw_part = grad.new_empty((slices, e, k) if want_weight else (0,), dtype=torch.float32)
    dpos_part = grad.new_empty((split["b_chunks"], n, e) if want_pos else (0,), dtype=torch.float32)
    k_tiles = cdiv(k, tiles["BLOCK_K"]) if want_weight else 1
    launch(
        choice, lambda META: (cdiv(e, META["BLOCK_E"]) * k_tiles, slices),
        (grad, images, dw_part, dpos_part,
         b, n, gw, e, k, split["b_per_slice"], split["n_blocks"],
         *grad.stride(), *images.stride()),
        dtype=images.dtype, policy=policy, P=p, WANT_W=want_weight, WANT_POS=want_pos,
    )
    # Fixed-order sums of the per-slice partials: deterministic, and tiny next to the GEMM.
    if want_weight:
        dw = dw_part.sum(0).reshape(weight.shape).to(weight.dtype)
    if want_pos:
        dpos = dpos_part.sum(0)
    return dw, dpos


def launch_backward_images(grad, weight, images, policy: LaunchPolicy) -> torch.Tensor:
    """grad (B, N, E) any strides -> d(images) (B, C, H, W) contiguous, in images' dtype."""
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
@crosses_boundary
@dataclass(frozen=True)
class PatchEmbedCall:
    """The non-tensor argument of the patch-embed custom ops, encoded into one str (ops/_boundary.py).

    policy: the LaunchPolicy current at the forward (the backward ops get the same).
    want_weight, want_pos: which parameter gradients ``patch_embed_bwd_params`` computes (d(pos) also
            gives d(bias)).
    """

    policy: LaunchPolicy
    want_weight: bool = False
    want_pos: bool = False


@torch.library.custom_op("aimkern::patch_embed_fwd", mutates_args=())
def _patch_embed_fwd(
    images: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], pos_embed: Optional[torch.Tensor],
    call: str,
) -> torch.Tensor:
    return launch_forward(images, weight, bias, pos_embed, decode(call).policy)


@_patch_embed_fwd.register_fake
def _(images, weight, bias, pos_embed, call):
    b, _, _, _, n, e, _ = _geometry(images, weight)
    return images.new_empty((b, n, e))


@torch.library.custom_op("aimkern::patch_embed_bwd_params", mutates_args=())
def _patch_embed_bwd_params(
    grad: torch.Tensor, images: torch.Tensor, weight: torch.Tensor, call: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (dW like weight, d(pos) (N, E) fp32); one the call does not want is an empty (0,) tensor."""
    c = decode(call)
    return launch_backward_params(grad, images, weight, c.want_weight, c.want_pos, c.policy)


@_patch_embed_bwd_params.register_fake
def _(grad, images, weight, call):
    c = decode(call)
    _, _, _, _, n, e, _ = _geometry(images, weight)
    dw = weight.new_empty(weight.shape) if c.want_weight else weight.new_empty(0)
    dpos = grad.new_empty((n, e) if c.want_pos else (0,), dtype=torch.float32)
    return dw, dpos


@torch.library.custom_op("aimkern::patch_embed_bwd_images", mutates_args=())
def _patch_embed_bwd_images(grad: torch.Tensor, weight: torch.Tensor, images: torch.Tensor, call: str) -> torch.Tensor:
    return launch_backward_images(grad, weight, images, decode(call).policy)


@_patch_embed_bwd_images.register_fake
def _(grad, weight, images, call):
    return torch.empty(images.shape, device=images.device, dtype=images.dtype)


def _setup_context(ctx, inputs, output):
    images, weight, bias, pos_embed, call = inputs
    ctx.save_for_backward(images, weight)
    ctx.call = call
    ctx.bias_dtype = bias.dtype if bias is not None else None
    ctx.pos_meta = (tuple(pos_embed.shape), pos_embed.dtype) if pos_embed is not None else None


def _backward(ctx, grad):
    images, weight = ctx.saved_tensors
    need_x, need_w, need_b, need_pos, _ = ctx.needs_input_grad
    policy = decode(ctx.call).policy
    dx = dw = db = dpos = None
    if need_w or need_b or need_pos:
        call = PatchEmbedCall(policy=policy, want_weight=need_w, want_pos=need_b or need_pos)
        dw, dpos32 = _patch_embed_bwd_params(grad, images, weight, encode(call))
        dw = dw if need_w else None
        if need_b:
            db = dpos32.sum(0).to(ctx.bias_dtype)  # db = dOut summed over batch and tokens
        if need_pos:
            shape, dtype = ctx.pos_meta
            dpos = dpos32.reshape(shape).to(dtype)
    if need_x:
        dx = _patch_embed_bwd_images(grad, weight, images, encode(PatchEmbedCall(policy=policy)))
    return dx, dw, db, dpos, None  # images, weight, bias, pos_embed, call


_patch_embed_fwd.register_autograd(_backward, setup_context=_setup_context)


def _patch_embed_triton(images, weight, bias, pos_embed) -> torch.Tensor:
    check_interpretable_dtype(images, OP)
    # The fused GEMM multiplies images by weight in one dtype (as F.linear would require).
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.dtype != images.dtype:
            raise TypeError(
                f"{OP}: {name} must have the images' dtype {images.dtype} for backend='triton', got {t.dtype}"
            )
    return _patch_embed_fwd(images, weight, bias, pos_embed, encode(PatchEmbedCall(policy=current_policy())))


def patch_embed(
    images: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    pos_embed: Optional[torch.Tensor] = None,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Fused patch embedding, equal to ``conv2d(images, weight, bias, stride=P).flatten(2).transpose(1, 2) + pos_embed``.

    Args:
        images: (B, C, H, W), H and W multiples of P.
        weight: (E, C, P, P), exactly ``nn.Conv2d(C, E, P, stride=P).weight``.
        bias: (E,) or None.
        pos_embed: (N, E) or (1, N, E) with N = (H // P) * (W // P), or None.
        backend: "auto" (the fastest correct path, measured on first use: aimkern.dispatch), "triton" or
            "reference".

    Returns:
        (B, N, E) tokens in raster order, in the dtype of ``images @ weight``.
    """
    check_tensor(images, "images", OP)
    images, weight, bias, pos_embed = autocast_inputs(images, weight, bias, pos_embed)
    check_backend_name(backend, OP)
    if measured_auto(backend):  # aimkern.dispatch chooses; inputs checked as for the reference
        _check_inputs(images, weight, bias, pos_embed, "reference")
        return run_dispatched(OP, (images, weight, bias, pos_embed), {}, images.dtype)
    be = resolve_backend(backend, images, OP)
    _check_inputs(images, weight, bias, pos_embed, be)
    if be == "reference":
        return patch_embed_reference(images, weight, bias, pos_embed)
    return _patch_embed_triton(images, weight, bias, pos_embed)
