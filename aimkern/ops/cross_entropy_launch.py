"""The Triton launchers of `aimkern.linear_cross_entropy` (kernels/cross_entropy.py), beside its custom ops.

aimkern/ops/cross_entropy.py registers the custom ops that run these and re-exports the public entry
points (the compile gate drives them on meta tensors): ``launch_forward``, ``launch_backward``,
``launch_forward_with_grad`` and ``launch_scale``. ``params`` is a ``CrossEntropyParams`` (read by
attribute: reduction, ignore_index, label_smoothing, z_loss).

Shapes: x (T, E), w (V, E), b (V,) or None, tgt (T,) int64 in any layout (the kernels read it through
its stride: a target is often a column of a label table, or a stride-0 expanded view).
"""
from __future__ import annotations

import torch

from ._launch import (
    LaunchPolicy, autotunes, cdiv, fixed_config, gpu_configs_active, interpreting, kernels, launch, sm_count,
    table_arch,
)


def _programs_wanted(device: torch.device) -> int:
    # About two waves on the card; under the interpreter a small number, so small tests split the vocab.
    return 2 * sm_count(device) if device.type in ("cuda", "meta") else 4


def launch_forward(x, w, b, tgt, params, policy: LaunchPolicy, logits=None):
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
         logits.stride(0) if logits is not None else 0, tgt.stride(0)),
        dtype=x.dtype, policy=policy, HAS_BIAS=b is not None, NEED_SUM=need_sum, STORE_LOGITS=logits is not None,
    )
    # Combining a few slices per token in torch is a fixed-order reduction: deterministic.
    lse = stats[0, 0] if slices == 1 else torch.logsumexp(stats[0], dim=0)
    return lse, stats[1].sum(0), stats[2].sum(0) if need_sum else None


def token_losses(lse, tgt_logit, logit_sum, tgt, v: int, params) -> torch.Tensor:
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


def launch_backward(grad, x, w, b, tgt, lse, params, need_dx: bool, need_dw: bool, need_db: bool,
                    policy: LaunchPolicy):
    """grad, tgt, lse (T,) in any layout -> (dx (T, E) in x's dtype or None, dW32 (V, E) fp32 or None,
    db32 (V,) fp32 or None), chunk by chunk."""
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
             grad.stride(0), d.stride(0), tgt.stride(0), lse.stride(0)),
            dtype=x.dtype, policy=policy, HAS_BIAS=b is not None,
        )
        if need_dx:  # dx[chunk] = dlogits @ W
            _matmul(d, w, dx[t0 : t0 + tc], None, accumulate=False, policy=policy)
        if need_dw:  # dW += dlogits^T @ x[chunk]; its A-operand row sums are d(bias)
            _matmul(d.t(), xc, dw32, db32, accumulate=t0 > 0, policy=policy)
        elif need_db:
            db32 += d.sum(0, dtype=torch.float32)
    return dx, dw32, db32


def launch_forward_with_grad(x, w, b, tgt, params, need_dx: bool, need_dw: bool, need_db: bool,
                             policy: LaunchPolicy):
    """The reduced loss and its gradients in one pass: 3 GEMM-equivalents instead of forward + backward's 4.

    Chunk by chunk (the backward's bounded chunk buffer): the forward kernel computes the chunk's logits
    once, keeps its statistics and stores the logits into the buffer; an elementwise kernel turns them into
    dlogits in place; then dx[chunk] = dlogits @ W and dW32 += dlogits^T @ x[chunk] (fp32, a fixed chunk
    order: deterministic).

    The gradients are those of the per-token *sum* (an upstream gradient of 1 for every token), whatever
    the reduction: "mean"'s 1 / count is not folded into the dlogits. At T = 65,536 tokens p / T lies
    below fp16's normal range (6.1e-5) for every p, so folded-in dlogits would round to fp16's subnormal
    grid or to zero before a GradScaler's factor could lift them; unscaled they are p itself, and the
    autograd backward applies count and the incoming gradient in fp32 (``launch_scale``). Same bytes and
    GEMMs as before: only the factor moved.

    Returns (loss 0-d fp32, dx or None, dW32 or None, db32 or None, grad_scale 0-d fp32): grad_scale is the
    reduction's factor, 1 / count for "mean" (0 when every token is ignored: the gradients are 0 then,
    like F.cross_entropy's) and 1 for "sum".
    """
    kern = kernels("cross_entropy")
    t, e = x.shape
    v = w.shape[0]
    dev = x.device
    count = (tgt != params.ignore_index).sum().to(torch.float32)
    mean = params.reduction == "mean"
    one = torch.ones(1, device=dev, dtype=torch.float32)
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
        losses[t0 : t0 + tc] = token_losses(lse, tgt_logit, logit_sum, tgt_c, v, params)
        lse = lse.contiguous()
        launch(
            kern.dlogits_inplace(), lambda META: (cdiv(tc, META["BLOCK_T"]), cdiv(v, META["BLOCK_V"])),
            (d, tgt_c, lse, one, tc, v, params.ignore_index, eps / v, 1.0 - eps, 2.0 * params.z_loss, 0,
             d.stride(0), tgt_c.stride(0)),
            dtype=x.dtype, policy=policy,
        )
        if need_dx:
            _matmul(d, w, dx[t0 : t0 + tc], None, accumulate=False, policy=policy)
        if need_dw:
            _matmul(d.t(), xc, dw32, db32, accumulate=t0 > 0, policy=policy)
        elif need_db:
            db32 += d.sum(0, dtype=torch.float32)
    loss = losses.sum()
    if not mean:
        return loss, dx, dw32, db32, one.reshape(())
    scale = torch.where(count > 0, 1.0 / count, torch.zeros_like(count))  # 1 / 0 -> 0, never inf * 0
    return loss / count, dx, dw32, db32, scale


def launch_scale(src, grad, scale, dtype: torch.dtype, policy: LaunchPolicy) -> torch.Tensor:
    """src * (grad * scale) computed in fp32, returned in ``dtype`` with src's shape (contiguous).

    grad and scale are 0-d tensors (read on the device: no host sync). One pass: 2 + 2 bytes a value for
    an fp16 dx, 4 + 2 for the fp32 dW32 into a 16-bit weight's gradient."""
    src = src.contiguous()
    out = torch.empty(src.shape, device=src.device, dtype=dtype)
    n = src.numel()
    if n:
        launch(kernels("cross_entropy").scale(), lambda META: (cdiv(n, META["BLOCK"]),),
               (src, out, grad, scale, n), dtype=src.dtype, policy=policy)
    return out


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
