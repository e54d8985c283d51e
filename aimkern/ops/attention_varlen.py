"""The Triton path of ``aimkern.attention_varlen``: S sequences laid end to end in (T, H, D), bounded by cu_seqlens.

The launchers (kernels/attention_varlen.py holds the kernels and their configs), their custom ops
(``aimkern::attention_varlen_fwd`` / ``_bwd``, typed arguments: ops/_custom_op.py), the autograd wiring and the
entries ``attention_varlen_triton`` / ``attention_varlen_qkvpacked_triton`` (checked inputs in, as
``aimkern.functional`` and the dispatch candidates call them):

    o, lse = attention_varlen_fwd(q, k, v, cu_seqlens, block_sizes, prefix_len, <params>, <policy>, layout)
    dq, dk, dv = attention_varlen_bwd(do, q, k, v, o, lse, cu_seqlens, block_sizes, prefix_len, <the same>)

Shapes: q, k, v, o, do (T, H, D), any strides; cu_seqlens int32 (S + 1,) from 0 to T, non-decreasing;
block_sizes None (``params.block_size`` for every sequence) or int32 (S,); prefix_len None or int32 (S,) in
[0, n_s]; lse (H, T) fp32, natural log (each head's rows contiguous, as the kernels read them).
``params.max_seqlen`` is resolved before the ops (a host int, meant to be >= every sequence's length: it sizes
the grid). The kernels get it too: a sequence longer than it, which the grid may not cover, comes out NaN in
all its rows (o, lse, and dq, dk, dv), never finite and wrong; the other sequences are unaffected. Nothing
reads cu_seqlens on the host to check it (that sync is what max_seqlen saves).

Layout "packed": a (T, 3, H, D) qkv in place of q (k, v None); the backward writes dq, dk, dv through strides
into one (T, 3, H, D) gradient, as attention's packed layout does.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch

from ._custom_op import TypedOp
from ._launch import LaunchPolicy, cdiv, check_interpretable_dtype, current_policy, kernels, launch, table_arch

OP = "attention_varlen"
FAMILY = "attention_varlen"
# CUDA's grid limits: axis 0 takes 2**31 - 1 programs, axes 1 and 2 take 65,535 each. The tiled kernels run on
# (tiles, H, S): tiles fastest, so one head's tiles of one sequence are launched side by side (and the tiled
# backward's highest-key-tile-first order holds), H and S each on an axis of its own. The key-tail kernel
# runs one program per (s, h) on a flat axis 0.
GRID_X_MAX = 2**31 - 1
GRID_YZ_MAX = 65_535


def _log2e() -> float:
    """log2(e), from kernels/constants.py (as ops/attention.py reads it): the kernels use exp2, so the
    launchers pre-scale the scores by it."""
    return kernels("constants").LOG2E.value


@dataclass(frozen=True)
class VarlenAttentionParams:
    """The options of one varlen attention call (the public keyword arguments, one field each).

    max_seqlen:    a host-side upper bound on every sequence's length (None: the op finds one).
    is_causal:     False: each sequence attends fully to itself; True: (block-)causal in raster order.
    block_size:    the causal block of every sequence, when given as an int (a per-sequence (S,) tensor
                   travels as the tensor argument ``block_size`` instead; this field is then 1).
    scale:         softmax scale; None means D ** -0.5.
    deterministic: bit-identical gradients run to run (the dQ shares are added in a fixed order).
    """

    max_seqlen: Optional[int] = None
    is_causal: bool = False
    block_size: int = 1
    scale: Optional[float] = None
    deterministic: bool = True

    def check(self, op: str = OP) -> None:
        """Raise a TypeError / ValueError naming the option that has the wrong type or range."""
        m = self.max_seqlen
        if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 1):
            raise ValueError(f"{op}: max_seqlen must be None or an int >= 1, got {m!r}")
        if not isinstance(self.is_causal, bool):
            raise TypeError(f"{op}: is_causal must be a bool, got {type(self.is_causal).__name__}")
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"{op}: block_size must be an int >= 1 or an int tensor (S,), got {self.block_size!r}")
        if self.scale is not None and (isinstance(self.scale, bool) or not isinstance(self.scale, (int, float))):
            raise TypeError(f"{op}: scale must be None or a float, got {type(self.scale).__name__}")
        if self.scale is not None and not abs(self.scale) < float("inf"):
            raise ValueError(f"{op}: scale must be a finite float, got {self.scale}")
        if not isinstance(self.deterministic, bool):
            raise TypeError(f"{op}: deterministic must be a bool, got {type(self.deterministic).__name__}")

    def resolved_scale(self, head_dim: int) -> float:
        return head_dim**-0.5 if self.scale is None else float(self.scale)


def _mask_tensors(cu_seqlens, block_sizes, prefix_len, params: VarlenAttentionParams) -> tuple:
    """(CU, BLOCK_SIZE, PREFIX, has_prefix) as the kernels read them: an int block size becomes an (S,)
    tensor; tensors a kernel never reads are replaced by cu_seqlens."""
    if not params.is_causal:
        return cu_seqlens, cu_seqlens, cu_seqlens, False
    if block_sizes is None:
        block_sizes = torch.full((cu_seqlens.numel() - 1,), params.block_size, dtype=torch.int32,
                                 device=cu_seqlens.device)
    has_prefix = prefix_len is not None
    return cu_seqlens, block_sizes, prefix_len if has_prefix else cu_seqlens, has_prefix


def _fixed(policy: LaunchPolicy) -> LaunchPolicy:
    """The policy without autotuning: the varlen Choices list fallbacks for small shared memories, not
    tuning candidates (a tuning trial would add into DQ_ACC twice)."""
    return replace(policy, autotune=False)


def check_grid(s: int, h: int) -> None:
    """A ValueError naming the quantity when S sequences x H heads cannot be launched: S (grid axis 2) or H
    (axis 1) above 65,535, or S * H above the 2**31 - 1 programs of the key tail's flat axis 0 (the tile
    axis 0 holds cdiv(max_seqlen, BLOCK) <= T programs, under it whenever cu_seqlens is int32)."""
    if s > GRID_YZ_MAX:
        raise ValueError(f"{OP}: S = {s} sequences exceed CUDA's {GRID_YZ_MAX} programs of grid axis 2 (one "
                         f"per sequence); split the pack into calls of at most {GRID_YZ_MAX} sequences")
    if h > GRID_YZ_MAX:
        raise ValueError(f"{OP}: H = {h} heads exceed CUDA's {GRID_YZ_MAX} programs of grid axis 1 (one per "
                         f"head); run the heads in groups of at most {GRID_YZ_MAX}")
    if s * h > GRID_X_MAX:
        raise ValueError(f"{OP}: S * H = {s} * {h} = {s * h} (sequence, head) pairs exceed CUDA's {GRID_X_MAX} "
                         "programs of grid axis 0 (the backward's key tail runs one program per pair); "
                         "split the pack or the heads")


# ------------------------------------------------------------------------------------------ launchers
def launch_forward(q, k, v, cu_seqlens, block_sizes, prefix_len, params: VarlenAttentionParams,
                   policy: LaunchPolicy) -> tuple:
    """-> (o (T, H, D) contiguous in q's dtype, lse (H, T) fp32 natural log)."""
    t, h, d = q.shape
    s = cu_seqlens.numel() - 1
    max_seqlen = params.max_seqlen
    o = q.new_empty((t, h, d))
    lse = torch.empty((h, t), device=q.device, dtype=torch.float32)
    if t == 0 or h == 0 or s == 0 or not max_seqlen:
        return o, lse
    check_grid(s, h)
    kern = kernels(FAMILY)
    fp32 = q.dtype == torch.float32
    cu, bs, pf, has_prefix = _mask_tensors(cu_seqlens, block_sizes, prefix_len, params)
    args = (q, k, v, o, lse, cu, bs, pf, *q.stride(), *k.stride(), *v.stride(), *o.stride(), h, t, max_seqlen,
            params.resolved_scale(d) * _log2e())
    flags = dict(dtype=q.dtype, policy=_fixed(policy), HEAD_D=d, BLOCK_D=kern.block_d(d), IS_CAUSAL=params.is_causal,
                 HAS_PREFIX=has_prefix)
    launch(kern.forward(d, fp32, max_seqlen, table_arch(q.device)),
           lambda META: (cdiv(max_seqlen, META["BLOCK_M"]), h, s), args, **flags)
    if max_seqlen > kern.QUERY_TAIL_QUANTUM:  # only sequences longer than 64 have a query tail
        launch(kern.forward_tail(d, fp32), lambda META: (cdiv(kern.QUERY_TAIL_QUANTUM - 1, META["BLOCK_M"]), h, s),
               args, **flags)
    return o, lse


def launch_backward(do, q, k, v, o, lse, cu_seqlens, block_sizes, prefix_len, params: VarlenAttentionParams,
                    policy: LaunchPolicy, out: Optional[tuple] = None) -> tuple:
    """-> (dq, dk, dv), each (T, H, D) in q's dtype; ``lse`` (H, T) as ``launch_forward`` returns it. ``out``:
    optional preallocated (dq, dk, dv), any (T, H, D) strided views (a packed (T, 3, H, D) gradient's slices):
    every kernel stores through their strides."""
    t, h, d = q.shape
    s = cu_seqlens.numel() - 1
    max_seqlen = params.max_seqlen
    dq, dk, dv = out if out is not None else (q.new_empty((t, h, d)), k.new_empty((t, h, d)), v.new_empty((t, h, d)))
    if t == 0 or h == 0 or s == 0 or not max_seqlen:
        return dq, dk, dv
    check_grid(s, h)
    kern = kernels(FAMILY)
    fp32 = q.dtype == torch.float32
    arch = table_arch(q.device)
    scale = params.resolved_scale(d)
    delta = torch.empty((h, t), device=q.device, dtype=torch.float32)
    # delta = rowsum(o * do) needs no sequence structure: the dense pre-pass on the (1, H, T, D) view.
    launch(kern.backward_preprocess(), lambda META: (cdiv(t, META["BLOCK_M"]), h),
           (o, do, delta, 0, o.stride(1), o.stride(0), o.stride(2), 0, do.stride(1), do.stride(0), do.stride(2), h, t),
           dtype=q.dtype, policy=_fixed(policy), HEAD_D=d, BLOCK_D=kern.block_d(d))
    dq_acc = torch.zeros((h, t, d), device=q.device, dtype=torch.float32)
    slots = kern.sem_slots(t, s)
    sem = torch.zeros((h, slots) if params.deterministic else (1,), device=q.device, dtype=torch.int32)
    cu, bs, pf, has_prefix = _mask_tensors(cu_seqlens, block_sizes, prefix_len, params)
    tensors = (q, k, v, do, lse, delta, dk, dv, dq_acc)
    strides = (*q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride())
    common = dict(dtype=q.dtype, policy=_fixed(policy), HEAD_D=d, BLOCK_D=kern.block_d(d), IS_CAUSAL=params.is_causal,
                  HAS_PREFIX=has_prefix)
    key_tail = kern.has_key_tail(d)
    if key_tail and max_seqlen > kern.KEY_TAIL_QUANTUM:  # the last <= 32 keys first: their dQ shares land first
        launch(kern.backward_key_tail(d, fp32, arch), lambda META: (s * h,),
               (*tensors, cu, bs, pf, *strides, h, t, max_seqlen, scale * _log2e(), scale), **common)
    launch(kern.backward_tiled(d, fp32, max_seqlen, arch), lambda META: (cdiv(max_seqlen, META["BLOCK_N"]), h, s),
           (*tensors, sem, cu, bs, pf, *strides, h, t, max_seqlen, slots, scale * _log2e(), scale),
           HAS_KEY_TAIL=key_tail, DETERMINISTIC=params.deterministic, DQ_KEY_MAJOR=arch >= 90, **common)
    dq.copy_(dq_acc.mul_(scale).permute(1, 0, 2))  # one pass: scale and cast into dq's strides
    return dq, dk, dv


def unpack(qkv: torch.Tensor) -> tuple:
    """q, k, v as (T, H, D) strided views of a (T, 3, H, D) tensor (no copy)."""
    return qkv.unbind(1)


# ------------------------------------------------------------------------------ custom ops + autograd
# layout "thd":    q, k, v (T, H, D) in; o (T, H, D) contiguous out.
#        "packed": the (T, 3, H, D) qkv in place of q (k, v None); the backward writes one (T, 3, H, D) gradient.
_SCALARS = (VarlenAttentionParams, LaunchPolicy, ("layout", str))


def _views(layout: str, q, k, v) -> tuple:
    return unpack(q) if layout == "packed" else (q, k, v)


def _fwd(q, k, v, cu, block_sizes, prefix_len, params, policy, layout) -> tuple:
    return launch_forward(*_views(layout, q, k, v), cu, block_sizes, prefix_len, params, policy)


def _fwd_fake(q, k, v, cu, block_sizes, prefix_len, params, policy, layout):
    q = _views(layout, q, k, v)[0]
    t, h, d = q.shape
    return q.new_empty((t, h, d)), q.new_empty((h, t), dtype=torch.float32)


def _bwd(do, q, k, v, o, lse, cu, block_sizes, prefix_len, params, policy, layout) -> tuple:
    if layout == "packed":
        dqkv = torch.empty(q.shape, device=q.device, dtype=q.dtype)
        launch_backward(do, *unpack(q), o, lse, cu, block_sizes, prefix_len, params, policy, out=unpack(dqkv))
        return dqkv, q.new_empty((0,)), q.new_empty((0,))
    return launch_backward(do, q, k, v, o, lse, cu, block_sizes, prefix_len, params, policy)


def _bwd_fake(do, q, k, v, o, lse, cu, block_sizes, prefix_len, params, policy, layout):
    if layout == "packed":
        return q.new_empty(q.shape), q.new_empty((0,)), q.new_empty((0,))
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


_TENSORS = ("q", "k?", "v?", "cu_seqlens", "block_sizes?", "prefix_len?")
attention_varlen_fwd = TypedOp("attention_varlen_fwd", _TENSORS, _SCALARS, "(Tensor, Tensor)", _fwd, _fwd_fake)
attention_varlen_bwd = TypedOp("attention_varlen_bwd", ("do", "q", "k?", "v?", "o", "lse", "cu_seqlens",
                                                        "block_sizes?", "prefix_len?"),
                               _SCALARS, "(Tensor, Tensor, Tensor)", _bwd, _bwd_fake)


def _setup_context(ctx, q, k, v, cu, block_sizes, prefix_len, params, policy, layout, output):
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, cu, block_sizes, prefix_len)
    ctx.scalars = (params, policy, layout)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, do, _dlse):
    q, k, v, o, lse, cu, block_sizes, prefix_len = ctx.saved_tensors
    dq, dk, dv = attention_varlen_bwd(do, q, k, v, o, lse, cu, block_sizes, prefix_len, *ctx.scalars)
    if ctx.scalars[2] == "packed":
        dk = dv = None
    return dq, dk, dv, None, None, None


attention_varlen_fwd.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------------------- entries
def _kernel_call(q, block_sizes, prefix_len, params: VarlenAttentionParams) -> tuple:
    """(block_sizes, prefix_len, params, policy) as the kernels take them for (T, H, D) ``q``: the mask
    tensors only where causal and contiguous (the kernels read [s] at stride 1), the scale and the grid
    bound resolved (max_seqlen None: T)."""
    t, _, d = q.shape
    check_interpretable_dtype(q, OP)
    if not params.is_causal:
        block_sizes = prefix_len = None  # every key of the sequence is visible anyway
    block_sizes = None if block_sizes is None else block_sizes.contiguous()
    prefix_len = None if prefix_len is None else prefix_len.contiguous()
    max_seqlen = t if params.max_seqlen is None else min(params.max_seqlen, t)
    kernel_params = VarlenAttentionParams(max_seqlen=max_seqlen, is_causal=params.is_causal,
                                          block_size=params.block_size, scale=params.resolved_scale(d),
                                          deterministic=params.deterministic)
    return block_sizes, prefix_len, kernel_params, LaunchPolicy(autotune=current_policy().autotune)


def attention_varlen_triton(q, k, v, cu_seqlens, block_sizes, prefix_len, params: VarlenAttentionParams):
    """The Triton path on checked (T, H, D) q, k, v, int32 cu_seqlens (S + 1,), block_sizes / prefix_len None
    or int32 (S,) -> (T, H, D) contiguous."""
    o, _ = attention_varlen_fwd(q, k, v, cu_seqlens.contiguous(), *_kernel_call(q, block_sizes, prefix_len, params),
                                "thd")
    return o


def attention_varlen_qkvpacked_triton(qkv, cu_seqlens, block_sizes, prefix_len, params: VarlenAttentionParams):
    """The Triton path on a checked (T, 3, H, D) qkv -> (T, H, D) contiguous; the gradient of qkv is one
    (T, 3, H, D) tensor written by the kernels."""
    o, _ = attention_varlen_fwd(qkv, None, None, cu_seqlens.contiguous(),
                                *_kernel_call(unpack(qkv)[0], block_sizes, prefix_len, params), "packed")
    return o
