"""`aimkern.linear_cross_entropy`: linear head + cross-entropy without the (tokens, V) logits.

Mirrors ``torch.nn.functional.linear_cross_entropy`` (torch >= 2.13) and adds z-loss. Backend dispatch,
input checks, the Triton launchers (kernels/cross_entropy.py) and their custom-op + autograd registration.
The custom ops take their non-tensor arguments as one str, the encoded ``CrossEntropyCall``
(``CrossEntropyParams`` whole, the ``LaunchPolicy``, which gradients to compute; ops/_boundary.py).

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

from dataclasses import dataclass, replace
from typing import Optional

import torch

from ..reference.cross_entropy import linear_cross_entropy_reference
from ._checks import (
    autocast_inputs, can_inspect_values, check_backend_name, check_float_dtype, check_interpretable_dtype,
    check_same_device, check_tensor, measured_auto, resolve_backend, run_dispatched,
)
from ._boundary import crosses_boundary, decode, encode
from ._launch import LaunchPolicy, current_policy
from .cross_entropy_launch import (  # noqa: F401  (re-exported: the compile gate drives them)
    launch_backward, launch_forward, launch_forward_with_grad, launch_scale, token_losses,
)

OP = "linear_cross_entropy"
REDUCTIONS = ("mean", "sum", "none")


@crosses_boundary
@dataclass(frozen=True)
class CrossEntropyParams:
    """Non-tensor options of one linear_cross_entropy call."""

    reduction: str = "mean"  # "mean" over non-ignored tokens, "sum", or "none" (per token)
    ignore_index: int = -100  # targets equal to this contribute nothing
    label_smoothing: float = 0.0  # in [0, 1], as in F.cross_entropy
    z_loss: float = 0.0  # weight of logsumexp(logits) ** 2, averaged like the loss


def _check_inputs(input, weight, target, bias, params: CrossEntropyParams, backend: str) -> None:
    check_tensor(input, "input", OP, min_ndim=1)
    check_tensor(weight, "linear_weight", OP, ndim=2)
    check_tensor(target, "target", OP)
    e = input.shape[-1]
    v = weight.shape[0]
    if weight.shape[1] != e:
        raise ValueError(f"{OP}: linear_weight must be (V, E) with E={e} (input's last dim), got {tuple(weight.shape)}")
    if e < 1:  # refused on every backend (the reference would return ln V from zero logits)
        raise ValueError(f"{OP}: input's last dimension E must be >= 1 (a multiple of 8 is the fast case), got {e}")
    if v < 1:
        raise ValueError(f"{OP}: linear_weight must have at least one row (V >= 1)")
    if tuple(target.shape) != tuple(input.shape[:-1]):
        raise ValueError(f"{OP}: target must have shape {tuple(input.shape[:-1])} (input's leading dims), got {tuple(target.shape)}")
    if target.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise TypeError(f"{OP}: target must be an integer tensor of class ids, got {target.dtype}")
    if bias is not None:
        check_tensor(bias, "linear_bias", OP, ndim=1)
        if bias.shape != (v,):
            raise ValueError(f"{OP}: linear_bias must have shape (V,) = ({v},), got {tuple(bias.shape)}")
    check_same_device((("input", input), ("linear_weight", weight), ("target", target), ("linear_bias", bias)), OP)
    for name, t in (("input", input), ("linear_weight", weight), ("linear_bias", bias)):
        if t is not None:
            check_float_dtype(t, name, OP, backend)
    for name, t in (("linear_weight", weight), ("linear_bias", bias)):  # every backend: one GEMM dtype
        if t is not None and t.dtype != input.dtype:
            raise TypeError(f"{OP}: {name} must have input's dtype {input.dtype}, got {t.dtype}")
    if isinstance(params.ignore_index, bool) or not isinstance(params.ignore_index, int):
        raise TypeError(f"{OP}: ignore_index must be an int (a class id), got {params.ignore_index!r}")
    if params.reduction not in REDUCTIONS:
        raise ValueError(f"{OP}: reduction must be one of {REDUCTIONS}, got {params.reduction!r}")
    if not 0.0 <= params.label_smoothing <= 1.0:
        raise ValueError(f"{OP}: label_smoothing must be in [0, 1], got {params.label_smoothing}")
    if not 0.0 <= params.z_loss < float("inf"):  # as label_smoothing: NaN fails the comparison
        raise ValueError(f"{OP}: z_loss must be a finite float >= 0, got {params.z_loss}")
    # Target values are read only on the CPU, where it costs no device sync. On CUDA the check would be three
    # host syncs per call (every training step); there the kernels mark an out-of-range target instead, and
    # its token's loss is NaN (so a mean or sum is NaN): never a plausible-looking wrong loss.
    if target.device.type == "cpu" and can_inspect_values() and target.numel() > 0:
        kept = target[target != params.ignore_index]
        if kept.numel() > 0:
            lo, hi = int(kept.min()), int(kept.max())
            if lo < 0 or hi >= v:
                raise ValueError(
                    f"{OP}: target values must be in [0, V={v}) or equal ignore_index={params.ignore_index}, "
                    f"got min {lo} and max {hi}"
                )


# ------------------------------------------------------------------------------ custom ops + autograd
# Custom ops: opaque to torch.compile (no graph break), fake implementations give the output shapes. Each
# takes its non-tensor arguments as one str, the encoded ``CrossEntropyCall`` (ops/_boundary.py).
@crosses_boundary
@dataclass(frozen=True)
class CrossEntropyCall:
    """The non-tensor argument of the cross-entropy custom ops.

    params: the call's CrossEntropyParams, whole (the per-token ops ignore ``reduction``; the
            forward-with-gradient op reads "mean" / "sum" from it).
    policy: the LaunchPolicy current at the forward (the backward op gets the same).
    need_dx, need_dw, need_db: which gradients the backward / forward-with-gradient op computes.
    """

    params: CrossEntropyParams
    policy: LaunchPolicy
    need_dx: bool = False
    need_dw: bool = False
    need_db: bool = False


@torch.library.custom_op("aimkern::linear_cross_entropy_fwd", mutates_args=())
def _lce_fwd(
    x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], tgt: torch.Tensor, call: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x (T, E), w (V, E), b (V,) or None, tgt (T,) int64 of any stride -> (per-token loss (T,) fp32,
    lse (T,) fp32)."""
    c = decode(call)
    t = x.shape[0]
    if t == 0:
        empty = torch.empty((0,), device=x.device, dtype=torch.float32)
        return empty, empty.clone()
    lse, tgt_logit, logit_sum = launch_forward(x, w, b, tgt, c.params, c.policy)
    return token_losses(lse, tgt_logit, logit_sum, tgt, w.shape[0], c.params), lse.contiguous()


@_lce_fwd.register_fake
def _(x, w, b, tgt, call):
    t = x.shape[0]
    return x.new_empty((t,), dtype=torch.float32), x.new_empty((t,), dtype=torch.float32)


@torch.library.custom_op("aimkern::linear_cross_entropy_bwd", mutates_args=())
def _lce_bwd(
    grad: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], tgt: torch.Tensor,
    lse: torch.Tensor, call: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """grad (T,) per-token (any stride) -> (dx like x, dW like w, db like b); an output the call does not
    ask for is an empty (0,) tensor."""
    c = decode(call)
    need_db = c.need_db and b is not None
    t, e = x.shape
    v = w.shape[0]
    if t == 0:
        dx = x.new_zeros((t, e)) if c.need_dx else None
        dw32 = x.new_zeros((v, e), dtype=torch.float32) if c.need_dw else None
        db32 = x.new_zeros((v,), dtype=torch.float32) if need_db else None
    else:
        dx, dw32, db32 = launch_backward(grad, x, w, b, tgt, lse, c.params, c.need_dx, c.need_dw, need_db, c.policy)
    none = x.new_empty((0,))
    return (
        dx if c.need_dx else none,
        dw32.to(w.dtype) if c.need_dw else none.clone(),
        db32.to(b.dtype) if need_db else none.clone(),
    )


@_lce_bwd.register_fake
def _(grad, x, w, b, tgt, lse, call):
    c = decode(call)

    def out(need, like):
        return torch.empty_like(like) if need and like is not None else x.new_empty((0,))

    return out(c.need_dx, x), out(c.need_dw, w), out(c.need_db, b)


def _setup_context(ctx, inputs, output):
    x, w, b, tgt, call = inputs
    _, lse = output
    ctx.save_for_backward(x, w, b, tgt, lse)
    ctx.call = call
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_loss, _grad_lse):
    x, w, b, tgt, lse = ctx.saved_tensors
    need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
    need_db = need_db and b is not None
    call = replace(decode(ctx.call), need_dx=need_dx, need_dw=need_dw, need_db=need_db)
    dx, dw, db = torch.ops.aimkern.linear_cross_entropy_bwd(grad_loss, x, w, b, tgt, lse, encode(call))
    return dx if need_dx else None, dw if need_dw else None, db if need_db else None, None, None  # x w b tgt call


_lce_fwd.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("aimkern::linear_cross_entropy_fwd_grad", mutates_args=())
def _lce_fwd_grad(
    x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], tgt: torch.Tensor, call: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (reduced loss 0-d fp32, dx like x, dW32 (V, E) fp32, db32 (V,) fp32, grad_scale 0-d fp32): the
    gradients of the per-token sum, and the factor that turns them into the call's reduction's (1 / count
    for "mean", 1 for "sum"); a gradient the call does not ask for is an empty (0,) tensor."""
    c = decode(call)
    mean = c.params.reduction == "mean"
    t, e = x.shape
    v = w.shape[0]
    need_db = c.need_db and b is not None
    if t == 0:
        loss = x.new_full((), float("nan") if mean else 0.0, dtype=torch.float32)
        dx = x.new_zeros((0, e)) if c.need_dx else None
        dw32 = x.new_zeros((v, e), dtype=torch.float32) if c.need_dw else None
        db32 = x.new_zeros((v,), dtype=torch.float32) if need_db else None
        scale = x.new_zeros((), dtype=torch.float32)
    else:
        loss, dx, dw32, db32, scale = launch_forward_with_grad(x, w, b, tgt, c.params, c.need_dx, c.need_dw,
                                                               need_db, c.policy)
    none = x.new_empty((0,), dtype=torch.float32)
    return (loss, dx if c.need_dx else x.new_empty((0,)), dw32 if c.need_dw else none,
            db32 if need_db else none.clone(), scale)


@_lce_fwd_grad.register_fake
def _(x, w, b, tgt, call):
    c = decode(call)
    t, e = x.shape
    v = w.shape[0]
    f32 = dict(dtype=torch.float32)
    return (x.new_empty((), **f32), x.new_empty((t, e)) if c.need_dx else x.new_empty((0,)),
            x.new_empty((v, e), **f32) if c.need_dw else x.new_empty((0,), **f32),
            x.new_empty((v,), **f32) if c.need_db and b is not None else x.new_empty((0,), **f32),
            x.new_empty((), **f32))


@torch.library.custom_op("aimkern::linear_cross_entropy_scale", mutates_args=())
def _lce_scale(src: torch.Tensor, grad: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype,
               call: str) -> torch.Tensor:
    """src (any shape) * (grad * scale), grad and scale 0-d, computed in fp32 -> src's shape in ``dtype``."""
    return launch_scale(src, grad, scale, dtype, decode(call).policy)


@_lce_scale.register_fake
def _(src, grad, scale, dtype, call):
    return src.new_empty(src.shape, dtype=dtype)


def _setup_context_grad(ctx, inputs, output):
    x, w, b, _, call = inputs
    _, dx, dw32, db32, scale = output
    ctx.save_for_backward(dx, dw32, db32, scale)
    ctx.call = call
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
        return torch.ops.aimkern.linear_cross_entropy_scale(g, grad_loss, scale, dtype, ctx.call)

    return (
        scaled(dx, x_dtype) if need_dx else None,
        scaled(dw32, w_dtype) if need_dw else None,
        scaled(db32, b_dtype) if need_db and b_dtype is not None else None,
        None, None,  # tgt, call
    )


_lce_fwd_grad.register_autograd(_backward_grad, setup_context=_setup_context_grad)


def _wants_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _linear_cross_entropy_triton(input, weight, target, bias, params: CrossEntropyParams) -> torch.Tensor:
    check_interpretable_dtype(input, OP)
    x = input.reshape(-1, input.shape[-1])
    tgt = target.reshape(-1).to(torch.int64)  # a view when it can be: the kernels read tgt through its stride
    policy = current_policy()
    if params.reduction != "none" and _wants_grad(x, weight, bias):
        # The loss will be differentiated: compute the gradients now, with the logits (3 GEMM-equivalents).
        call = CrossEntropyCall(params=params, policy=policy, need_dx=x.requires_grad,
                                need_dw=weight.requires_grad, need_db=bias is not None and bias.requires_grad)
        loss, *_ = torch.ops.aimkern.linear_cross_entropy_fwd_grad(x, weight, bias, tgt, encode(call))
        return loss
    call = CrossEntropyCall(params=params, policy=policy)
    loss, _ = torch.ops.aimkern.linear_cross_entropy_fwd(x, weight, bias, tgt, encode(call))
    if params.reduction == "none":
        return loss.reshape(target.shape)
    if params.reduction == "sum":
        return loss.sum()
    # Like F.cross_entropy: the mean over non-ignored tokens, NaN (0 / 0) when all are ignored.
    return loss.sum() / (tgt != params.ignore_index).sum()


def linear_cross_entropy(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    target: torch.Tensor,
    *,
    linear_bias: Optional[torch.Tensor] = None,
    reduction: str = "mean",
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    backend: str = "auto",
) -> torch.Tensor:
    """Cross-entropy of ``F.linear(input, linear_weight, linear_bias)`` against ``target``, plus z-loss.

    Args:
        input: (..., E) hidden states.
        linear_weight: (V, E) head weight.  linear_bias: (V,) or None.
        target: (...) integer class ids in [0, V), or ignore_index.
        reduction: "mean" (over non-ignored tokens), "sum" or "none" (shape of target).
        ignore_index, label_smoothing: as in ``F.cross_entropy``.
        z_loss: weight of ``logsumexp(logits) ** 2``, averaged like the loss.
        backend: "auto" (the fastest correct path, measured on first use: aimkern.dispatch), "triton" or
            "reference".

    Returns:
        float32 loss (float64 for float64 inputs): a scalar, or target's shape for reduction="none".
    """
    params = CrossEntropyParams(reduction, ignore_index, float(label_smoothing), float(z_loss))
    check_tensor(input, "input", OP)
    input, linear_weight, linear_bias = autocast_inputs(input, linear_weight, linear_bias)
    check_backend_name(backend, OP)
    if measured_auto(backend):  # aimkern.dispatch chooses; inputs checked as for the reference
        _check_inputs(input, linear_weight, target, linear_bias, params, "reference")
        options = dict(reduction=reduction, ignore_index=ignore_index, label_smoothing=float(label_smoothing),
                       z_loss=float(z_loss))
        return run_dispatched(OP, (input, linear_weight, target, linear_bias), options, input.dtype)
    be = resolve_backend(backend, input, OP)
    _check_inputs(input, linear_weight, target, linear_bias, params, be)
    if be == "reference":
        return linear_cross_entropy_reference(
            input,
            linear_weight,
            target,
            linear_bias=linear_bias,
            reduction=reduction,
            ignore_index=ignore_index,
            label_smoothing=label_smoothing,
            z_loss=z_loss,
        )
    return _linear_cross_entropy_triton(input, linear_weight, target, linear_bias, params)
