"""The spec of ``aimkern.attention_varlen`` (and ``attention_varlen_qkvpacked``): checks, candidates, key parts.

Tensors, in order: q, k, v (T, H, D); cu_seqlens int32 (S + 1,); block_size None (the params' int for every
sequence) or int32 (S,); prefix_len None or int32 (S,). Candidates (each ``fn(q, k, v, cu_seqlens,
block_size, prefix_len, params)``):

    triton          aimkern's varlen kernels: tiles per sequence (packed variant on a (T, 3, H, D) qkv)
    reference       aimkern.reference.attention_varlen_reference: the dense reference sequence by sequence
    reference-dense the same math on the whole pack with a block-diagonal (T, T) mask (small T only)
    sdpa-mask       F.scaled_dot_product_attention on the pack with that boolean mask, where it fits memory
    torch-varlen    torch.nn.attention.varlen.varlen_attn (FlashAttention's varlen kernel): CUDA, 16-bit,
                    full or token-causal without prefix, where this torch has it; its backward is not
                    deterministic, so only for deterministic=False or without grad
"""
from __future__ import annotations

import contextlib
from dataclasses import replace
from typing import Optional

import torch
import torch.nn.functional as F

from ..checks import can_inspect_values, check_float_dtype, check_same_device, check_tensor
from ..ops._launch import pow2
from ..ops.attention_varlen import VarlenAttentionParams, attention_varlen_qkvpacked_triton, attention_varlen_triton
from ..reference.attention_varlen import attention_varlen_reference, varlen_mask
from .common import DOT_TOLERANCE, kernel_unsupported, randn
from .opspec import Candidate, OpSpec, Problem, add_spec

NAME = "attention_varlen"
TENSORS = ("q", "k", "v", "cu_seqlens", "block_size", "prefix_len")
DENSE_MASK_MAX = 1 << 26  # H * T * T score elements (256 MB in fp32) above which the dense-mask paths step aside


def _per_sequence(x, name: str, s: int, device, op: str) -> Optional[torch.Tensor]:
    """None, or ``x`` (an integer (S,) tensor) as int32 contiguous."""
    if x is None:
        return None
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: {name} must be an int or an integer tensor of shape (S,), got {type(x).__name__}")
    if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
        raise TypeError(f"{op}: {name} must be an integer tensor, got {x.dtype}")
    if x.shape != (s,):
        raise ValueError(f"{op}: {name} must have shape (S,) = ({s},), got {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"{op}: {name} is on {x.device} but the inputs are on {device}")
    return x.to(torch.int32).contiguous()


def check_cu_seqlens(cu, t: int, device, op: str) -> torch.Tensor:
    """cu_seqlens as int32 contiguous (S + 1,), S >= 1 (shapes, dtype, device; values: ``check_values``)."""
    if not isinstance(cu, torch.Tensor):
        raise TypeError(f"{op}: cu_seqlens must be an int32 tensor of shape (S + 1,), got {type(cu).__name__}")
    if cu.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{op}: cu_seqlens must be an int32 (or int64) tensor, got {cu.dtype}")
    if cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(f"{op}: cu_seqlens must have shape (S + 1,) with S >= 1, got {tuple(cu.shape)}")
    if cu.device != device:
        raise ValueError(f"{op}: cu_seqlens is on {cu.device} but the inputs are on {device}")
    if cu.dtype == torch.int64 and t >= 2**31:
        raise ValueError(f"{op}: T = {t} tokens do not fit the kernels' int32 offsets")
    return cu.to(torch.int32).contiguous()


def check_values(cu: torch.Tensor, t: int, per_seq: dict, op: str) -> int:
    """Read cu_seqlens (and the per-sequence tensors) on the host, once, and check them: from 0 to T,
    non-decreasing, block sizes >= 1, prefixes in [0, n_s]. Returns the longest sequence's length."""
    s = cu.numel() - 1
    parts = [cu.to(torch.int64)] + [x.to(torch.int64) for x in per_seq.values()]
    flat = torch.cat(parts).tolist()  # one host read (a sync on CUDA)
    bounds = flat[: s + 1]
    lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    if bounds[0] != 0 or bounds[-1] != t or min(lengths) < 0:
        raise ValueError(f"{op}: cu_seqlens must be non-decreasing from 0 to T = {t}, got "
                         f"{bounds if len(bounds) <= 12 else bounds[:6] + ['...'] + bounds[-6:]}")
    at = s + 1
    for name in per_seq:
        values = flat[at : at + s]
        at += s
        if name == "block_size" and min(values) < 1:
            raise ValueError(f"{op}: block_size values must be >= 1, got min {min(values)}")
        if name == "prefix_len":
            bad = [i for i, (p, n) in enumerate(zip(values, lengths)) if not 0 <= p <= n]
            if bad:
                i = bad[0]
                raise ValueError(f"{op}: prefix_len values must be in [0, n_s], got {values[i]} for sequence {i} "
                                 f"of length {lengths[i]}")
    return max(lengths)


def check(tensors: tuple, params: VarlenAttentionParams, backend: str, op: str = NAME) -> tuple:
    """((q, k, v, cu_seqlens int32, block_size None or int32 (S,), prefix_len None or int32 (S,)), params)."""
    q, k, v, cu, block_size, prefix_len = tensors
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_tensor(x, name, op, ndim=3)
    if q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"{op}: q, k and v must have the same shape (T, H, D), got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    check_same_device((("q", q), ("k", k), ("v", v)), op)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"{op}: q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    check_float_dtype(q, "q", op, backend)
    t, _, d = q.shape
    if t < 1:
        raise ValueError(f"{op}: T (the packed token count) must be >= 1, got {t}")
    if d % 8 != 0 or not 16 <= d <= 256:
        raise ValueError(f"{op}: head dim D must be a multiple of 8 in [16, 256], got {d}")
    params.check(op)
    cu = check_cu_seqlens(cu, t, q.device, op)
    s = cu.numel() - 1
    block_size = _per_sequence(block_size, "block_size", s, q.device, op)
    if isinstance(prefix_len, bool):
        raise TypeError(f"{op}: prefix_len must be None, an int or an integer tensor of shape (S,), got a bool")
    int_prefix = isinstance(prefix_len, int)
    if int_prefix and prefix_len < 0:
        raise ValueError(f"{op}: prefix_len must be >= 0, got {prefix_len}")
    if not int_prefix:
        prefix_len = _per_sequence(prefix_len, "prefix_len", s, q.device, op)
    if not params.is_causal:
        block_size = prefix_len = None  # every key of a sequence is visible
    elif int_prefix:  # one prefix for every sequence, at most each one's length
        prefix_len = torch.minimum(cu[1:] - cu[:-1], torch.tensor(prefix_len, dtype=torch.int32, device=q.device))
    if params.max_seqlen is not None:
        return (q, k, v, cu, block_size, prefix_len), replace(params, max_seqlen=min(params.max_seqlen, t))
    if can_inspect_values():
        per_seq = {"block_size": block_size, "prefix_len": None if int_prefix else prefix_len}
        longest = check_values(cu, t, {n: x for n, x in per_seq.items() if x is not None}, op)
        # The grid bound in powers of two: calls whose longest sequence falls in one band share one dispatch
        # decision; a bound above the longest only adds programs that return at once.
        params = replace(params, max_seqlen=min(pow2(max(longest, 1)), t))
    return (q, k, v, cu, block_size, prefix_len), params


def mask_kind(problem: Problem) -> str:
    if not problem.params.is_causal:
        return "full"
    kind = "block" if problem.shapes[4] is not None or problem.params.block_size > 1 else "causal"
    return f"prefix-{kind}" if problem.shapes[5] is not None else kind


def shape_band(problem: Problem) -> str:
    t, h, d = problem.shapes[0]
    s = problem.shapes[3][0] - 1
    return f"t<={pow2(t)}|s<={pow2(s)}|h{h}|d{d}"


def _lengths(t: int, s: int, gen: torch.Generator) -> list:
    """S lengths summing to T: near-equal, with a random split point per sequence (length 1 included)."""
    cuts = sorted(torch.randint(0, t + 1, (s - 1,), generator=gen).tolist())
    bounds = [0] + cuts + [t]
    return [b - a for a, b in zip(bounds[:-1], bounds[1:])]


def make_inputs(problem: Problem, gen: torch.Generator) -> tuple:
    """Synthetic q, k, v and a random split of T into S sequences; per-sequence block sizes and prefixes."""
    q, k, v = (randn(problem, i, gen) for i in range(3))
    t, s = problem.shapes[0][0], problem.shapes[3][0] - 1
    lengths = _lengths(t, s, gen)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=problem.device)
    block = prefix = None
    if problem.shapes[4] is not None:
        block = torch.randint(1, 9, (s,), generator=gen, dtype=torch.int32).to(problem.device)
    if problem.shapes[5] is not None:
        prefix = torch.tensor([int(torch.randint(0, n + 1, (1,), generator=gen)) for n in lengths],
                              dtype=torch.int32, device=problem.device)
    return q, k, v, cu, block, prefix


def small_problem(problem: Problem) -> Problem:
    """At most 2 heads and 3 sequences in T <= 160 tokens (query and key tails), the same D, dtype and mask."""
    t, h, d = problem.shapes[0]
    s = problem.shapes[3][0] - 1
    t2, h2, s2 = min(t, 160), min(h, 2), min(s, 3, t)
    shapes = ((t2, h2, d),) * 3 + ((s2 + 1,), None if problem.shapes[4] is None else (s2,),
                                   None if problem.shapes[5] is None else (s2,))
    return problem.with_(shapes=shapes, params=replace(problem.params, max_seqlen=None))


def reference(q, k, v, cu, block_size, prefix_len, params: VarlenAttentionParams) -> torch.Tensor:
    return attention_varlen_reference(q, k, v, cu, is_causal=params.is_causal,
                                      block_size=params.block_size if block_size is None else block_size,
                                      prefix_len=prefix_len, scale=params.scale)


# ------------------------------------------------------------------------------------------------ paths
def _dense_fits(problem: Problem):
    t, h, _ = problem.shapes[0]
    return True if h * t * t <= DENSE_MASK_MAX else f"H * T * T = {h * t * t} scores exceed {DENSE_MASK_MAX}"


def _mask_of(q, cu, block_size, prefix_len, params) -> torch.Tensor:
    return varlen_mask(cu, q.shape[0], is_causal=params.is_causal,
                       block_size=params.block_size if block_size is None else block_size, prefix_len=prefix_len)


def reference_dense(q, k, v, cu, block_size, prefix_len, params: VarlenAttentionParams) -> torch.Tensor:
    """The pack as one sequence with the block-diagonal mask: the reference's math in one einsum."""
    mask = _mask_of(q, cu, block_size, prefix_len, params)
    scale = params.resolved_scale(q.shape[-1])
    dt = torch.promote_types(q.dtype, torch.float32)
    s = torch.einsum("thd,uhd->htu", q.to(dt), k.to(dt)) * scale
    p = s.masked_fill(~mask, float("-inf")).softmax(-1)
    return torch.einsum("htu,uhd->thd", p, v.to(dt)).to(q.dtype)


def _differentiated(*xs) -> bool:
    return torch.is_grad_enabled() and any(x.requires_grad for x in xs)


def sdpa_mask(q, k, v, cu, block_size, prefix_len, params: VarlenAttentionParams) -> torch.Tensor:
    """F.scaled_dot_product_attention on the (1, H, T, D) pack with the (T, T) block-diagonal mask; math
    backend for a deterministic differentiated call on CUDA (the others add dQ with atomics)."""
    mask = _mask_of(q, cu, block_size, prefix_len, params)
    ctx = contextlib.nullcontext()
    if q.is_cuda and params.deterministic and _differentiated(q, k, v):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        ctx = sdpa_kernel(SDPBackend.MATH)
    with ctx:
        o = F.scaled_dot_product_attention(*(x.transpose(0, 1).unsqueeze(0) for x in (q, k, v)), attn_mask=mask,
                                           scale=params.scale)
    return o[0].transpose(0, 1)


def _torch_varlen():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def torch_varlen(q, k, v, cu, block_size, prefix_len, params: VarlenAttentionParams) -> torch.Tensor:
    """torch's varlen_attn: full, or causal by tokens (window (-1, 0))."""
    m = params.max_seqlen if params.max_seqlen is not None else q.shape[0]
    window = (-1, 0) if params.is_causal else (-1, -1)
    return _torch_varlen()(q, k, v, cu, cu, m, m, scale=params.scale, window_size=window)


def _triton_unsupported(problem: Problem) -> Optional[str]:
    return kernel_unsupported(problem)


def _torch_varlen_unsupported(problem: Problem):
    if _torch_varlen() is None:
        return "this torch has no torch.nn.attention.varlen.varlen_attn"
    if problem.dtype not in ("float16", "bfloat16"):
        return "varlen_attn takes 16-bit inputs only"
    if mask_kind(problem) not in ("full", "causal"):
        return f"varlen_attn has full and causal masks only, not {mask_kind(problem)}"
    if problem.grad and problem.params.deterministic:
        return "varlen_attn's backward adds dQ with atomics: only for deterministic=False"
    return None


def _sdpa_unsupported(problem: Problem):
    if problem.dtype not in ("float16", "bfloat16", "float32"):
        return f"{problem.dtype} is not an SDPA kernel dtype"
    return _dense_fits(problem)


class VarlenOpSpec(OpSpec):
    """The public signature takes ``block_size`` as an int or a tensor: a user's candidate gets whichever the
    call had (the int travels in the params, a tensor as the tensor argument)."""

    def public_call(self, tensors: tuple, params) -> tuple:
        args, kwargs = super().public_call(tensors, params)
        if kwargs["block_size"] is None:
            kwargs["block_size"] = params.block_size
        return args, kwargs


SPEC = add_spec(VarlenOpSpec(
    name=NAME,
    tensor_args=TENSORS,
    positional=4,
    params_type=VarlenAttentionParams,
    check=check,
    reference=reference,
    triton=attention_varlen_triton,
    candidates=[
        Candidate("triton", attention_varlen_triton, "aimkern", _triton_unsupported, interpreted=True,
                  extra={"packed": attention_varlen_qkvpacked_triton}),
        Candidate("reference", reference, "torch"),
        Candidate("reference-dense", reference_dense, "torch", _dense_fits),
        Candidate("sdpa-mask", sdpa_mask, "torch", _sdpa_unsupported),
        Candidate("torch-varlen", torch_varlen, "torch", _torch_varlen_unsupported, devices=("cuda",)),
    ],
    make_inputs=make_inputs,
    small_problem=small_problem,
    mask_kind=mask_kind,
    shape_band=shape_band,
    autocast=(0, 1, 2),
    tolerance=DOT_TOLERANCE,
))
