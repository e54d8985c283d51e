"""The Triton path of ``aimkern.linear_cross_entropy``: linear head + cross-entropy without the (tokens, V) logits.

Mirrors ``torch.nn.functional.linear_cross_entropy`` (torch >= 2.13) and adds z-loss. The custom ops (typed
arguments: ops/_custom_op.py) + autograd over the launchers of ops/cross_entropy_launch.py, and the entry
``linear_cross_entropy_triton`` (checked inputs in, as ``aimkern.functional`` and dispatch call it).

Two Triton paths:

* The loss will be differentiated (grad mode on, an input that requires grad, reduction "mean" or "sum"):
  ``aimkern::linear_cross_entropy_fwd_grad`` computes the reduced loss *and* its gradients in the forward,
  chunk by chunk (Liger's plan): each chunk's logits GEMM runs once, its logits become dlogits in place,
  and two GEMMs give d input and d weight. 3 GEMM-equivalents in all. The saved gradients are those of
  the per-token sum; the autograd backward multiplies them by the incoming gradient and "mean"'s 1 / count
  in fp32 (``aimkern::linear_cross_entropy_scale``), so neither a GradScaler's 65536 (past fp16's range)
  nor 1 / 65536 (fp16 dlogits would underflow) meets fp16 arithmetic. It has no formula for the gradient
  of the gradients: double backward (create_graph=True) raises.
* Otherwise (no grad, or reduction "none", whose per-token upstream gradient is unknown in the forward):
  ``aimkern::linear_cross_entropy_fwd`` returns the per-token loss (fp32, 0 where ignored) and the per-token
  logsumexp; the reduction is plain torch on that (T,) vector, so its gradient reaches
  ``aimkern::linear_cross_entropy_bwd`` as per-token scales (often a stride-0 expanded view, read with its
  stride), which recomputes the logits tile by tile (4 GEMM-equivalents with the forward; 1 without grad).

The launchers live in ops/cross_entropy_launch.py; the public entry points (the custom ops run them; the
compile gate drives them on meta tensors) are re-exported here: ``launch_forward``, ``launch_backward``,
``launch_forward_with_grad`` and ``launch_scale``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ._custom_op import TypedOp
from ._launch import LaunchPolicy, check_interpretable_dtype, current_policy
from .cross_entropy_launch import (  # noqa: F401  (re-exported: the compile gate drives them)
    launch_backward, launch_forward, launch_forward_with_grad, launch_scale, token_losses,
)

OP = "linear_cross_entropy"
REDUCTIONS = ("mean", "sum", "none")


@dataclass(frozen=True)
class CrossEntropyParams:
    """The options of one linear_cross_entropy call (the public keyword arguments, one field each)."""

    reduction: str = "mean"  # "mean" over non-ignored tokens, "sum", or "none" (per token)
    ignore_index: int = -100  # targets equal to this contribute nothing
    label_smoothing: float = 0.0  # in [0, 1], as in F.cross_entropy
    z_loss: float = 0.0  # weight of logsumexp(logits) ** 2, averaged like the loss


# ------------------------------------------------------------------------------ custom ops + autograd
# Custom ops: opaque to torch.compile (no graph break), fake implementations give the output shapes. Their
# scalars (ops/_custom_op.py): the call's CrossEntropyParams whole (the per-token ops ignore ``reduction``;
# the forward-with-gradient op reads "mean" / "sum" from it), the autotune choice of the LaunchPolicy current
# at the forward (the backward ops get the same), and which gradients a backward computes.
_FWD_SCALARS = (CrossEntropyParams, ("autotune", bool))
_GRAD_SCALARS = _FWD_SCALARS + (("need_dx", bool), ("need_dw", bool), ("need_db", bool))


def _lce_fwd(x, w, b, tgt, params: CrossEntropyParams, autotune: bool) -> tuple:
    """x (T, E), w (V, E), b (V,) or None, tgt (T,) int64 of any stride -> (per-token loss (T,) fp32,
    lse (T,) fp32)."""
    t = x.shape[0]
    if t == 0:
        empty = torch.empty((0,), device=x.device, dtype=torch.float32)
        return empty, empty.clone()
    lse, tgt_logit, logit_sum = launch_forward(x, w, b, tgt, params, LaunchPolicy(autotune=autotune))
    return token_losses(lse, tgt_logit, logit_sum, tgt, w.shape[0], params), lse.contiguous()


def _lce_fwd_fake(x, w, b, tgt, params, autotune):
    t = x.shape[0]
    return x.new_empty((t,), dtype=torch.float32), x.new_empty((t,), dtype=torch.float32)


def _lce_bwd(grad, x, w, b, tgt, lse, params: CrossEntropyParams, autotune: bool, need_dx: bool, need_dw: bool,
             need_db: bool) -> tuple:
    """grad (T,) per-token (any stride) -> (dx like x, dW like w, db like b); an output the call does not
    ask for is an empty (0,) tensor."""
    need_db = need_db and b is not None
    t, e = x.shape
    v = w.shape[0]
    if t == 0:
        dx = x.new_zeros((t, e)) if need_dx else None
        dw32 = x.new_zeros((v, e), dtype=torch.float32) if need_dw else None
        db32 = x.new_zeros((v,), dtype=torch.float32) if need_db else None
    else:
        dx, dw32, db32 = launch_backward(grad, x, w, b, tgt, lse, params, need_dx, need_dw, need_db,
                                         LaunchPolicy(autotune=autotune))
    none = x.new_empty((0,))
    return (
        dx if need_dx else none,
        dw32.to(w.dtype) if need_dw else none.clone(),
        db32.to(b.dtype) if need_db else none.clone(),
    )


def _lce_bwd_fake(grad, x, w, b, tgt, lse, params, autotune, need_dx, need_dw, need_db):
    def out(need, like):
        return torch.empty_like(like) if need and like is not None else x.new_empty((0,))

    return out(need_dx, x), out(need_dw, w), out(need_db, b)


lce_fwd = TypedOp("linear_cross_entropy_fwd", ("x", "w", "b?", "tgt"), _FWD_SCALARS, "(Tensor, Tensor)",
                  _lce_fwd, _lce_fwd_fake)
lce_bwd = TypedOp("linear_cross_entropy_bwd", ("grad", "x", "w", "b?", "tgt", "lse"), _GRAD_SCALARS,
                  "(Tensor, Tensor, Tensor)", _lce_bwd, _lce_bwd_fake)


def _setup_context(ctx, x, w, b, tgt, params, autotune, output):
    _, lse = output
    ctx.save_for_backward(x, w, b, tgt, lse)
    ctx.scalars = (params, autotune)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_loss, _grad_lse):
    x, w, b, tgt, lse = ctx.saved_tensors
    need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
    need_db = need_db and b is not None
    dx, dw, db = lce_bwd(grad_loss, x, w, b, tgt, lse, *ctx.scalars, need_dx, need_dw, need_db)
    return dx if need_dx else None, dw if need_dw else None, db if need_db else None, None  # x w b tgt


lce_fwd.register_autograd(_backward, setup_context=_setup_context)


def _lce_fwd_grad(x, w, b, tgt, params: CrossEntropyParams, autotune: bool, need_dx: bool, need_dw: bool,
                  need_db: bool) -> tuple:
    """-> (reduced loss 0-d fp32, dx like x, dW32 (V, E) fp32, db32 (V,) fp32, grad_scale 0-d fp32): the
    gradients of the per-token sum, and the factor that turns them into the call's reduction's (1 / count
    for "mean", 1 for "sum"); a gradient the call does not ask for is an empty (0,) tensor."""
    mean = params.reduction == "mean"
    t, e = x.shape
    v = w.shape[0]
    need_db = need_db and b is not None
    if t == 0:
        loss = x.new_full((), float("nan") if mean else 0.0, dtype=torch.float32)
        dx = x.new_zeros((0, e)) if need_dx else None
        dw32 = x.new_zeros((v, e), dtype=torch.float32) if need_dw else None
        db32 = x.new_zeros((v,), dtype=torch.float32) if need_db else None
        scale = x.new_zeros((), dtype=torch.float32)
    else:
        loss, dx, dw32, db32, scale = launch_forward_with_grad(x, w, b, tgt, params, need_dx, need_dw, need_db,
                                                               LaunchPolicy(autotune=autotune))
    none = x.new_empty((0,), dtype=torch.float32)
    return (loss, dx if need_dx else x.new_empty((0,)), dw32 if need_dw else none,
            db32 if need_db else none.clone(), scale)


def _lce_fwd_grad_fake(x, w, b, tgt, params, autotune, need_dx, need_dw, need_db):
    t, e = x.shape
    v = w.shape[0]
    f32 = dict(dtype=torch.float32)
    return (x.new_empty((), **f32), x.new_empty((t, e)) if need_dx else x.new_empty((0,)),
            x.new_empty((v, e), **f32) if need_dw else x.new_empty((0,), **f32),
            x.new_empty((v,), **f32) if need_db and b is not None else x.new_empty((0,), **f32),
            x.new_empty((), **f32))


def _lce_scale(src, grad, scale, dtype: torch.dtype, autotune: bool) -> torch.Tensor:
    """src (any shape) * (grad * scale), grad and scale 0-d, computed in fp32 -> src's shape in ``dtype``."""
    return launch_scale(src, grad, scale, dtype, LaunchPolicy(autotune=autotune))


def _lce_scale_fake(src, grad, scale, dtype, autotune):
    return src.new_empty(src.shape, dtype=dtype)


lce_fwd_grad = TypedOp("linear_cross_entropy_fwd_grad", ("x", "w", "b?", "tgt"), _GRAD_SCALARS,
                       "(Tensor, Tensor, Tensor, Tensor, Tensor)", _lce_fwd_grad, _lce_fwd_grad_fake)
lce_scale = TypedOp("linear_cross_entropy_scale", ("src", "grad", "scale"), (("dtype", torch.dtype),
                    ("autotune", bool)), "Tensor", _lce_scale, _lce_scale_fake)


def _setup_context_grad(ctx, x, w, b, tgt, params, autotune, need_dx, need_dw, need_db, output):
    _, dx, dw32, db32, scale = output
    ctx.save_for_backward(dx, dw32, db32, scale)
    ctx.autotune = autotune
    ctx.dtypes = (x.dtype, w.dtype, b.dtype if b is not None else None)
    ctx.mark_non_differentiable(dx, dw32, db32, scale)


def _backward_grad(ctx, grad_loss, _gdx, _gdw, _gdb, _gscale):
    if torch.is_grad_enabled():  # autograd runs a backward formula with grad mode on only for create_graph
        raise RuntimeError(
            f"{OP}: double backward (create_graph=True) is not supported: with reduction 'mean' or 'sum' the "
            "Triton path computes the gradients in the forward and has no formula for their gradient; use "
            "backend='reference' for higher-order gradients"
        )
    dx, dw32, db32, scale = ctx.saved_tensors
    need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
    x_dtype, w_dtype, b_dtype = ctx.dtypes
    # The incoming gradient (a GradScaler's 65536 does not fit fp16) and the reduction's factor multiply
    # the saved gradients in fp32, cast once.

    def scaled(g, dtype):
        return lce_scale(g, grad_loss, scale, dtype, ctx.autotune)

    return (
        scaled(dx, x_dtype) if need_dx else None,
        scaled(dw32, w_dtype) if need_dw else None,
        scaled(db32, b_dtype) if need_db and b_dtype is not None else None,
        None,  # tgt
    )


lce_fwd_grad.register_autograd(_backward_grad, setup_context=_setup_context_grad)


def _wants_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def linear_cross_entropy_triton(input, weight, target, bias, params: CrossEntropyParams) -> torch.Tensor:
    """The Triton path on checked inputs (input (..., E), weight (V, E), target (...), bias (V,) or None)."""
    check_interpretable_dtype(input, OP)
    x = input.reshape(-1, input.shape[-1])
    tgt = target.reshape(-1).to(torch.int64)  # a view when it can be: the kernels read tgt through its stride
    autotune = current_policy().autotune
    if params.reduction != "none" and _wants_grad(x, weight, bias):
        # The loss will be differentiated: compute the gradients now, with the logits (3 GEMM-equivalents).
        loss, *_ = lce_fwd_grad(x, weight, bias, tgt, params, autotune, x.requires_grad, weight.requires_grad,
                                bias is not None and bias.requires_grad)
        return loss
    loss, _ = lce_fwd(x, weight, bias, tgt, params, autotune)
    if params.reduction == "none":
        return loss.reshape(target.shape)
    if params.reduction == "sum":
        return loss.sum()
    # Like F.cross_entropy: the mean over non-ignored tokens, NaN (0 / 0) when all are ignored.
    return loss.sum() / (tgt != params.ignore_index).sum()
