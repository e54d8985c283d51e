"""Launchers of the varlen attention kernels (kernels/attention_varlen.py): tensors in, tensors out.

Plain functions, no custom-op registration, no input checks beyond what keeps a kernel inside its
buffers: the op layer (aimkern/ops) checks the public arguments and wraps these in its custom ops.

    o, lse = launch_forward(q, k, v, cu_seqlens, max_seqlen, block_size, prefix_len, params, policy)
    dq, dk, dv = launch_backward(do, q, k, v, o, lse, cu_seqlens, max_seqlen, block_size, prefix_len,
                                 params, policy)

Shapes: q, k, v, o, do (T, H, D), any strides; cu_seqlens int32 (S + 1,) from 0 to T, non-decreasing;
block_size int32 (S,) (read only when ``params.is_causal``); prefix_len None or int32 (S,) in [0, n_s];
lse (T, H) fp32, natural log, a view of (H, T) memory (each head's rows contiguous, as the kernels read
them). max_seqlen: a host int >= every sequence's length (it sizes the grid; a smaller one gives wrong
rows for the longer sequences, so the op layer must check it where it can read cu_seqlens).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..ops._launch import LaunchPolicy, cdiv, kernels, launch, table_arch

FAMILY = "attention_varlen"
_LOG2E = 1.4426950408889634  # the kernels use exp2: scores are pre-scaled by log2(e)
MAX_GRID_Y = 65535  # CUDA's limit on grid axis 1, where the kernels put S * H


@dataclass(frozen=True)
class VarlenAttentionParams:
    """Non-tensor options of one varlen attention call, as the kernels see them.

    is_causal:     False: each sequence attends fully to itself; True: (block-)causal in raster order, with
                   the per-sequence block_size and prefix_len tensors.
    scale:         softmax scale; None means D ** -0.5.
    deterministic: bit-identical gradients run to run (the dQ shares are added in a fixed order).
    """

    is_causal: bool = False
    scale: Optional[float] = None
    deterministic: bool = True

    def resolved_scale(self, head_dim: int) -> float:
        return head_dim**-0.5 if self.scale is None else float(self.scale)


def _mask_tensors(cu_seqlens, block_size, prefix_len, params: VarlenAttentionParams) -> tuple:
    """(CU, BLOCK_SIZE, PREFIX, has_prefix): tensors the kernels never read are replaced by cu_seqlens."""
    has_prefix = params.is_causal and prefix_len is not None
    return (cu_seqlens, block_size if params.is_causal else cu_seqlens, prefix_len if has_prefix else cu_seqlens,
            has_prefix)


def _grid_rows(s: int, h: int) -> int:
    if s * h > MAX_GRID_Y:
        raise ValueError(f"attention_varlen: S * H = {s} * {h} exceeds the {MAX_GRID_Y} programs of grid axis 1")
    return s * h


def launch_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                   block_size: torch.Tensor, prefix_len: Optional[torch.Tensor], params: VarlenAttentionParams,
                   policy: LaunchPolicy) -> tuple:
    """-> (o (T, H, D) contiguous in q's dtype, lse (T, H) fp32 natural log, a view of (H, T) memory)."""
    t, h, d = q.shape
    s = cu_seqlens.numel() - 1
    o = q.new_empty((t, h, d))
    lse = torch.empty((h, t), device=q.device, dtype=torch.float32)
    if t == 0 or h == 0 or s == 0 or max_seqlen == 0:
        return o, lse.t()
    rows = _grid_rows(s, h)
    kern = kernels(FAMILY)
    fp32 = q.dtype == torch.float32
    cu, bs, pf, has_prefix = _mask_tensors(cu_seqlens, block_size, prefix_len, params)
    args = (q, k, v, o, lse, cu, bs, pf, *q.stride(), *k.stride(), *v.stride(), *o.stride(), h, t,
            params.resolved_scale(d) * _LOG2E)
    flags = dict(dtype=q.dtype, policy=policy, HEAD_D=d, BLOCK_D=kern.block_d(d), IS_CAUSAL=params.is_causal,
                 HAS_PREFIX=has_prefix)
    launch(kern.forward(d, fp32, max_seqlen, table_arch(q.device)),
           lambda META: (cdiv(max_seqlen, META["BLOCK_M"]), rows), args, **flags)
    if max_seqlen > kern.QUERY_TAIL_QUANTUM:  # only sequences longer than 64 have a query tail
        launch(kern.forward_tail(d, fp32), lambda META: (cdiv(kern.QUERY_TAIL_QUANTUM - 1, META["BLOCK_M"]), rows),
               args, **flags)
    return o, lse.t()


def launch_backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                    lse: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, block_size: torch.Tensor,
                    prefix_len: Optional[torch.Tensor], params: VarlenAttentionParams, policy: LaunchPolicy,
                    out: Optional[tuple] = None) -> tuple:
    """-> (dq, dk, dv), each (T, H, D) in q's dtype. ``lse`` as ``launch_forward`` returns it; ``out``: optional
    preallocated (dq, dk, dv), any (T, H, D) strided views (a packed (T, 3, H, D) gradient's slices): every
    kernel stores through their strides."""
    t, h, d = q.shape
    s = cu_seqlens.numel() - 1
    dq, dk, dv = out if out is not None else (q.new_empty((t, h, d)), k.new_empty((t, h, d)), v.new_empty((t, h, d)))
    if t == 0 or h == 0 or s == 0 or max_seqlen == 0:
        return dq, dk, dv
    rows = _grid_rows(s, h)
    kern = kernels(FAMILY)
    fp32 = q.dtype == torch.float32
    arch = table_arch(q.device)
    scale = params.resolved_scale(d)
    lse_rows = lse.t().contiguous()  # (H, T): a no-op for launch_forward's lse
    delta = torch.empty((h, t), device=q.device, dtype=torch.float32)
    # delta = rowsum(o * do) needs no sequence structure: the dense pre-pass on the (1, H, T, D) view.
    launch(kern.backward_preprocess(), lambda META: (cdiv(t, META["BLOCK_M"]), h),
           (o, do, delta, 0, o.stride(1), o.stride(0), o.stride(2), 0, do.stride(1), do.stride(0), do.stride(2), h, t),
           dtype=q.dtype, policy=policy, HEAD_D=d, BLOCK_D=kern.block_d(d))
    dq_acc = torch.zeros((h, t, d), device=q.device, dtype=torch.float32)
    slots = kern.sem_slots(t, s)
    sem = torch.zeros((h, slots) if params.deterministic else (1,), device=q.device, dtype=torch.int32)
    cu, bs, pf, has_prefix = _mask_tensors(cu_seqlens, block_size, prefix_len, params)
    tensors = (q, k, v, do, lse_rows, delta, dk, dv, dq_acc)
    strides = (*q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride())
    common = dict(dtype=q.dtype, policy=policy, HEAD_D=d, BLOCK_D=kern.block_d(d), IS_CAUSAL=params.is_causal,
                  HAS_PREFIX=has_prefix)
    key_tail = kern.has_key_tail(d)
    if key_tail and max_seqlen > kern.KEY_TAIL_QUANTUM:  # the last <= 32 keys first: their dQ shares land first
        launch(kern.backward_key_tail(d, fp32, arch), lambda META: (rows,),
               (*tensors, cu, bs, pf, *strides, h, t, scale * _LOG2E, scale), **common)
    launch(kern.backward_tiled(d, fp32, max_seqlen, arch), lambda META: (cdiv(max_seqlen, META["BLOCK_N"]), rows),
           (*tensors, sem, cu, bs, pf, *strides, h, t, slots, scale * _LOG2E, scale),
           HAS_KEY_TAIL=key_tail, DETERMINISTIC=params.deterministic, DQ_KEY_MAJOR=arch >= 90, **common)
    dq.copy_(dq_acc.mul_(scale).permute(1, 0, 2))  # one pass: scale and cast into dq's strides
    return dq, dk, dv
