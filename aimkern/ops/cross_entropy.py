"""The Triton path of ``aimkern.linear_cross_entropy``: linear head + cross-entropy without the (tokens, V) logits.

Mirrors ``torch.nn.functional.linear_cross_entropy`` (torch >= 2.13) and adds z-loss. The Triton launchers
(kernels/cross_entropy.py), their custom ops (typed arguments: ops/_custom_op.py) + autograd, and the entry
``linear_cross_entropy_triton`` (checked inputs in, as ``aimkern.functional`` and dispatch call it).

Two Triton paths:

* The loss will be differentiated (grad mode on, an input that requires grad, reduction "mean" or "sum"):
  ``aimkern::linear_cross_entropy_fwd_grad`` computes the reduced loss *and* its gradients in the forward,
  chunk by chunk (Liger's plan): each chunk's logits GEMM runs once, its logits become dlogits in place,
  and two GEMMs give d input and d weight. 3 GEMM-equivalents in all; the autograd backward only scales
  the saved gradients by the incoming one (exact for 1 and powers of two).
* Otherwise (no grad, or reduction "none", whose per-token upstream gradient is unknown in the forward):
  ``aimkern::linear_cross_entropy_fwd`` returns the per-token loss (fp32, 0 where ignored) and the per-token
  logsumexp; the reduction is plain torch on that (T,) vector, so its gradient reaches
  ``aimkern::linear_cross_entropy_bwd`` as per-token scales (often a stride-0 expanded view, read with its
  stride), which recomputes the logits tile by tile (4 GEMM-equivalents with the forward; 1 without grad).

Public launcher entry points (the custom ops run them; the compile gate drives them on meta tensors):
``launch_forward``, ``launch_backward`` and ``launch_forward_with_grad``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ._custom_op import TypedOp
from ._launch import (
    LaunchPolicy, autotunes, cdiv, current_policy, fixed_config, gpu_configs_active, interpreting, kernels, launch,
    sm_count, table_arch,
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


def _programs_wanted(device: torch.device) -> int:
    # About two waves on the card; under the interpreter a small number, so small tests split the vocab.
    return 2 * sm_count(device) if device.type in ("cuda", "meta") else 4


def launch_forward(x, w, b, tgt, params: CrossEntropyParams, policy: LaunchPolicy, logits=None):
    """Per-token statistics over vocabulary slices -> (lse, target logit, logit sum or None), each (T,) fp32.

    logits: optional (T, V) buffer (row stride free, unit column stride) that receives the logits, bias
    included, in its dtype (the forward-with-gradient path)."""
    kern = kernels("cross_entropy")
    t, e = x.shape
    v = w.shape[0]
    choice = kern.tile("fwd", t, v, e, x.element_size(), table_arch(x.device))
    block_t = kern.CUDA_BLOCK_T if autotunes(choice, policy) else fixed_config(choice, policy).kwargs["BLOCK_T"]
    vs = kern.vocab_split(cdiv(t, block_t), v, _programs_wanted(x.device))
    slices = cdiv(v, vs)
    need_sum = params.label_smoothing != 0.0
    stats = torch.empty((3 if need_sum else 2, slices, t), device=x.device, dtype=torch.float32)
    launch(
        choice, lambda META: (cdiv(t, META["BLOCK_T"]), slices),
        (x, w, b if b is not None else stats, tgt, stats[0], stats[1], stats[-1],  # bias never read without HAS_BIAS
         logits if logits is not None else stats,  # never written without STORE_LOGITS
         t, v, e, vs,
         x.stride(0), x.stride(1), w.stride(0), w.stride(1), b.stride(0) if b is not None else 0,
         logits.stride(0) if logits is not None else 0),
        dtype=x.dtype, policy=policy, HAS_BIAS=b is not None, NEED_SUM=need_sum, STORE_LOGITS=logits is not None,
    )
    # Combining a few slices per token in torch is a fixed-order reduction: deterministic.
    lse = stats[0, 0] if slices == 1 else torch.logsumexp(stats[0], dim=0)
    return lse, stats[1].sum(0), stats[2].sum(0) if need_sum else None


def _token_losses(lse, tgt_logit, logit_sum, tgt, v: int, params: CrossEntropyParams) -> torch.Tensor:
    """Per-token loss from the statistics: (1 - eps) * nll + eps * mean_c(-log p_c) + z * lse^2, 0 if ignored."""
    eps = params.label_smoothing
    loss = (lse - tgt_logit) * (1.0 - eps)
    if logit_sum is not None:
        loss = loss + (lse - logit_sum / v) * eps
    if params.z_loss != 0.0:
        loss = loss + params.z_loss * lse * lse
    keep = tgt != params.ignore_index
    loss = torch.where(keep, loss, torch.zeros_like(loss))
    # Target values are not checked on the host for CUDA tensors (nor under torch.compile): an out-of-range
    # target gives NaN, never a plausible-looking wrong loss.
    bad = keep & ((tgt < 0) | (tgt >= v))
    return torch.where(bad, torch.full_like(loss, float("nan")), loss)


def launch_backward(grad, x, w, b, tgt, lse, params: CrossEntropyParams, need_dx: bool, need_dw: bool,
                     need_db: bool, policy: LaunchPolicy):
    """(dx (T, E) in x's dtype or None, dW32 (V, E) fp32 or None, db32 (V,) fp32 or None), chunk by chunk."""
    kern = kernels("cross_entropy")
    t, e = x.shape
    v = w.shape[0]
    dev = x.device
    dx = torch.empty((t, e), device=dev, dtype=x.dtype) if need_dx else None
    dw32 = torch.empty((v, e), device=dev, dtype=torch.float32) if need_dw else None
    db32 = torch.zeros((v,), device=dev, dtype=torch.float32) if need_db else None
    chunk = kern.bwd_chunk_tokens(t, v, x.element_size(), interpreting() and not gpu_configs_active())
    dbuf = torch.empty((chunk, v), device=dev, dtype=x.dtype)
    eps = params.label_smoothing
    for t0 in range(0, t, chunk):
        tc = min(chunk, t - t0)
        d = dbuf[:tc]
        xc = x[t0 : t0 + tc]
        launch(
            kern.tile("dlogits", tc, v, e, x.element_size(), table_arch(x.device)),
            lambda META: (cdiv(tc, META["BLOCK_T"]), cdiv(v, META["BLOCK_V"])),
            (xc, w, b if b is not None else lse, tgt[t0:], lse[t0:], grad[t0:], d,
             tc, v, e, params.ignore_index, eps / v, 1.0 - eps, 2.0 * params.z_loss,
             xc.stride(0), xc.stride(1), w.stride(0), w.stride(1), b.stride(0) if b is not None else 0,
             grad.stride(0), d.stride(0)),
            dtype=x.dtype, policy=policy, HAS_BIAS=b is not None,
        )
        if need_dx:  # dx[chunk] = dlogits @ W
            _matmul(d, w, dx[t0 : t0 + tc], None, accumulate=False, policy=policy)
        if need_dw:  # dW += dlogits^T @ x[chunk]; its A-operand row sums are d(bias)
            _matmul(d.t(), xc, dw32, db32, accumulate=t0 > 0, policy=policy)
        elif need_db:
            db32 += d.sum(0, dtype=torch.float32)
    return dx, dw32, db32


def launch_forward_with_grad(x, w, b, tgt, params: CrossEntropyParams, need_dx: bool, need_dw: bool,
                              need_db: bool, policy: LaunchPolicy):
    """The reduced loss and its gradients in one pass: 3 GEMM-equivalents instead of forward + backward's 4.

    Chunk by chunk (the backward's bounded chunk buffer): the forward kernel computes the chunk's logits
    once, keeps its statistics and stores the logits into the buffer; an elementwise kernel turns them into
    dlogits in place (the gradient of the *reduced* loss for an upstream gradient of 1: 1 / count for
    "mean", 1 for "sum"); then dx[chunk] = dlogits @ W and dW32 += dlogits^T @ x[chunk] (fp32, a fixed
    chunk order: deterministic). Returns (loss 0-d fp32, dx or None, dW32 or None, db32 or None); the
    autograd backward only scales them by the incoming gradient.
    """
    kern = kernels("cross_entropy")
    t, e = x.shape
    v = w.shape[0]
    dev = x.device
    keep = tgt != params.ignore_index
    count = keep.sum()
    mean = params.reduction == "mean"
    # 1 / 0 = inf for an all-ignored "mean": the kernels zero ignored tokens with a where, so no NaN.
    g = (1.0 / count.to(torch.float32)).reshape(1) if mean else torch.ones(1, device=dev, dtype=torch.float32)
    dx = torch.empty((t, e), device=dev, dtype=x.dtype) if need_dx else None
    dw32 = torch.empty((v, e), device=dev, dtype=torch.float32) if need_dw else None
    db32 = torch.zeros((v,), device=dev, dtype=torch.float32) if need_db else None
    chunk = kern.bwd_chunk_tokens(t, v, x.element_size(), interpreting() and not gpu_configs_active())
    dbuf = torch.empty((chunk, v), device=dev, dtype=x.dtype)
    losses = torch.empty((t,), device=dev, dtype=torch.float32)
    eps = params.label_smoothing
    for t0 in range(0, t, chunk):
        tc = min(chunk, t - t0)
        d = dbuf[:tc]
        xc, tgt_c = x[t0 : t0 + tc], tgt[t0 : t0 + tc]
        lse, tgt_logit, logit_sum = launch_forward(xc, w, b, tgt_c, params, policy, logits=d)
        losses[t0 : t0 + tc] = _token_losses(lse, tgt_logit, logit_sum, tgt_c, v, params)
        lse = lse.contiguous()
        launch(
            kern.dlogits_inplace(), lambda META: (cdiv(tc, META["BLOCK_T"]), cdiv(v, META["BLOCK_V"])),
            (d, tgt_c, lse, g, tc, v, params.ignore_index, eps / v, 1.0 - eps, 2.0 * params.z_loss, 0, d.stride(0)),
            dtype=x.dtype, policy=policy,
        )
        if need_dx:
            _matmul(d, w, dx[t0 : t0 + tc], None, accumulate=False, policy=policy)
        if need_dw:
            _matmul(d.t(), xc, dw32, db32, accumulate=t0 > 0, policy=policy)
        elif need_db:
            db32 += d.sum(0, dtype=torch.float32)
    loss = losses.sum()
    return (loss / count if mean else loss), dx, dw32, db32


def _matmul(a, b, c, rs, *, accumulate: bool, policy: LaunchPolicy) -> None:
    """c (+)= a @ b (fp32 accumulation); rs (+)= a.sum(1) in fp32 when rs is given."""
    m, k = a.shape
    n = b.shape[1]
    launch(
        kernels("cross_entropy").matmul(m, n, k, a.element_size(), table_arch(a.device)),
        lambda META: (cdiv(m, META["BLOCK_M"]) * cdiv(n, META["BLOCK_N"]),),
        (a, b, c, rs if rs is not None else c,  # rs never touched without ROWSUM
         m, n, k, a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1)),
        dtype=a.dtype, policy=policy, ACCUMULATE=accumulate, ROWSUM=rs is not None,
    )


# ------------------------------------------------------------------------------ custom ops + autograd
# Custom ops: opaque to torch.compile (no graph break), fake implementations give the output shapes. Their
# scalars (ops/_custom_op.py): the call's CrossEntropyParams whole (the per-token ops ignore ``reduction``;
# the forward-with-gradient op reads "mean" / "sum" from it), the autotune choice of the LaunchPolicy current
# at the forward (the backward op gets the same), and which gradients a backward computes.
_FWD_SCALARS = (CrossEntropyParams, ("autotune", bool))
_GRAD_SCALARS = _FWD_SCALARS + (("need_dx", bool), ("need_dw", bool), ("need_db", bool))


def _lce_fwd(x, w, b, tgt, params: CrossEntropyParams, autotune: bool) -> tuple:
    """x (T, E), w (V, E), b (V,) or None, tgt (T,) int64 -> (per-token loss (T,) fp32, lse (T,) fp32)."""
    t = x.shape[0]
    if t == 0:
        empty = torch.empty((0,), device=x.device, dtype=torch.float32)
        return empty, empty.clone()
    lse, tgt_logit, logit_sum = launch_forward(x, w, b, tgt, params, LaunchPolicy(autotune=autotune))
    return _token_losses(lse, tgt_logit, logit_sum, tgt, w.shape[0], params), lse.contiguous()


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
    """-> (reduced loss 0-d fp32, dx like x, dW32 (V, E) fp32, db32 (V,) fp32) for an upstream gradient of 1
    (the call's reduction: "mean" or "sum"); a gradient the call does not ask for is an empty (0,) tensor."""
    mean = params.reduction == "mean"
    t, e = x.shape
    v = w.shape[0]
    need_db = need_db and b is not None
    if t == 0:
        loss = x.new_full((), float("nan") if mean else 0.0, dtype=torch.float32)
        dx = x.new_zeros((0, e)) if need_dx else None
        dw32 = x.new_zeros((v, e), dtype=torch.float32) if need_dw else None
        db32 = x.new_zeros((v,), dtype=torch.float32) if need_db else None
    else:
        loss, dx, dw32, db32 = launch_forward_with_grad(x, w, b, tgt, params, need_dx, need_dw, need_db,
                                                        LaunchPolicy(autotune=autotune))
    none = x.new_empty((0,), dtype=torch.float32)
    return (loss, dx if need_dx else x.new_empty((0,)), dw32 if need_dw else none,
            db32 if need_db else none.clone())


def _lce_fwd_grad_fake(x, w, b, tgt, params, autotune, need_dx, need_dw, need_db):
    t, e = x.shape
    v = w.shape[0]
    f32 = dict(dtype=torch.float32)
    return (x.new_empty((), **f32), x.new_empty((t, e)) if need_dx else x.new_empty((0,)),
            x.new_empty((v, e), **f32) if need_dw else x.new_empty((0,), **f32),
            x.new_empty((v,), **f32) if need_db and b is not None else x.new_empty((0,), **f32))


lce_fwd_grad = TypedOp("linear_cross_entropy_fwd_grad", ("x", "w", "b?", "tgt"), _GRAD_SCALARS,
                       "(Tensor, Tensor, Tensor, Tensor)", _lce_fwd_grad, _lce_fwd_grad_fake)


def _setup_context_grad(ctx, x, w, b, tgt, params, autotune, need_dx, need_dw, need_db, output):
    _, dx, dw32, db32 = output
    ctx.save_for_backward(dx, dw32, db32)
    ctx.dtypes = (w.dtype, b.dtype if b is not None else None)
    ctx.mark_non_differentiable(dx, dw32, db32)


def _backward_grad(ctx, grad_loss, _gdx, _gdw, _gdb):
    dx, dw32, db32 = ctx.saved_tensors
    need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
    w_dtype, b_dtype = ctx.dtypes
    # Scaling by the incoming gradient is exact when it is 1 (loss.backward()) or a power of two (loss scaling).
    return (
        (dx * grad_loss.to(dx.dtype)) if need_dx else None,
        (dw32 * grad_loss).to(w_dtype) if need_dw else None,
        (db32 * grad_loss).to(b_dtype) if need_db and b_dtype is not None else None,
        None,  # tgt
    )


lce_fwd_grad.register_autograd(_backward_grad, setup_context=_setup_context_grad)


def _wants_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def linear_cross_entropy_triton(input, weight, target, bias, params: CrossEntropyParams) -> torch.Tensor:
    """The Triton path on checked inputs (input (..., E), weight (V, E), target (...), bias (V,) or None)."""
    x = input.reshape(-1, input.shape[-1])
    tgt = target.reshape(-1).to(torch.int64)
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
