"""The spec of ``aimkern.attention`` (and ``attention_qkvpacked``): checks, candidates, key parts, tolerance.

Candidates (each a forward + the backward autograd takes through it; each ``fn(q, k, v, prefix_len,
params)``, attention's Triton ones with a "packed" variant ``fn(qkv, prefix_len, params)``):

    triton-fused          aimkern's one-program-per-head backward (where a head's K, V fit on chip)
    triton-split          the tiled dK/dV + dQ backward, dQ shares added in a fixed order (the forward alone
                          when nothing needs a gradient)
    triton-split-atomic   the same, dQ shares added by fp32 atomics: only when the call says deterministic=False
    sdpa-cudnn / -flash / -efficient / -math   F.scaled_dot_product_attention pinned to one backend (CUDA);
                          is_causal=True for token-causal, a boolean (B, 1, N, N) mask for block and prefix
    sdpa                  F.scaled_dot_product_attention as torch picks it (CPU)
    reference             aimkern.reference.attention_reference (einsum, softmax in fp32)
"""
from __future__ import annotations

import contextlib
import functools
from typing import Optional

import torch
import torch.nn.functional as F

from ..checks import check_float_dtype, check_same_device, check_tensor, normalize_prefix_len
from ..ops._launch import sm_count
from ..ops.attention import (
    AttentionParams, attention_qkvpacked_triton, attention_triton, effective_causal, flat_grid_forced, flat_launch,
    fused_backward_fits,
)
from ..reference.attention import attention_mask, attention_reference
from .common import DOT_TOLERANCE, exact_or_pow2, kernel_unsupported, pow2, randint, randn
from .opspec import Candidate, OpSpec, Problem, add_spec

NAME = "attention"
TENSORS = ("q", "k", "v", "prefix_len")


def check(tensors: tuple, params: AttentionParams, backend: str, op: str = NAME) -> tuple:
    """((q, k, v, prefix_len as None or int32 (B,)), params) of a call on (B, H, N, D) q, k, v."""
    q, k, v, prefix_len = tensors
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(t, name, op, ndim=4)
    if q.shape != k.shape or q.shape != v.shape:
        raise ValueError(
            f"{op}: q, k and v must have the same shape (B, H, N, D), got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    check_same_device((("q", q), ("k", k), ("v", v)), op)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"{op}: q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    check_float_dtype(q, "q", op, backend)
    n, d = q.shape[2], q.shape[3]
    if n < 1:
        raise ValueError(f"{op}: sequence length N must be >= 1, got {n}")
    if d % 8 != 0 or not 16 <= d <= 256:
        raise ValueError(f"{op}: head dim D must be a multiple of 8 in [16, 256], got {d}")
    params.check(op)
    return (q, k, v, normalize_prefix_len(prefix_len, q.shape[0], n, q.device, op)), params


def _effective(problem: Problem) -> tuple:
    """(causal, block_size, has_prefix) as the kernels see them."""
    n = problem.shapes[0][2]
    params = problem.params
    causal = effective_causal(params.is_causal, params.block_size, n)
    return causal, (params.block_size if causal else 1), causal and problem.shapes[3] is not None


def mask_kind(problem: Problem) -> str:
    causal, block, prefix = _effective(problem)
    if not causal:
        return "full"
    kind = "causal" if block == 1 else "block"
    return f"prefix-{kind}" if prefix else kind


def shape_band(problem: Problem) -> str:
    b, h, n, d = problem.shapes[0]
    return f"bh<={pow2(b * h)}|n{exact_or_pow2(n)}|d{d}"


# The verification problem reaches the real call's kernels and tables (tests/test_dispatch_coverage.py holds
# it to that at the benchmark shapes): N itself up to LONG_VERIFY_MAX, else the smallest long-band N with the
# real N's residues (N % 64 picks the forward's query-tail kernel and the backward's key-tail tile, N % 128
# which configs pad the tiles least), so the band, the tail kernels and the table entries are the real
# call's. Heads: up to two waves of programs on a GPU (what depends on residency, such as the deterministic
# dQ turns, runs), a few on the CPU, within VERIFY_SCORES float64 scores.
LONG_VERIFY_MAX = 1024
VERIFY_SCORES = 1 << 26  # B * H * N * N of the float64 reference: 512 MB


def verify_n(n: int) -> int:
    """The verification problem's N for a real N (see above): N itself up to 1024, else 384 + N % 128."""
    return n if n <= LONG_VERIFY_MAX else 384 + n % 128


def small_problem(problem: Problem) -> Problem:
    """The same D, dtype, mask kind, band, tail kernels and table configs as ``problem`` (``verify_n``), on
    fewer heads (``verify_heads``)."""
    b, h, n, d = problem.shapes[0]
    n2 = verify_n(n)
    b2, h2 = verify_heads(b, h, n2, problem.device)
    params = problem.params
    causal, block, _ = _effective(problem)
    if causal and block >= n2:  # a causal block as long as the shorter sequence would make it full attention
        params = AttentionParams(params.is_causal, max(2, n2 // 2), params.scale, params.deterministic)
    qshape = (b2, h2, n2, d)
    return problem.with_(shapes=(qshape, qshape, qshape, (b2,) if problem.shapes[3] is not None else None),
                         params=params)


def verification_launch(problem: Problem):
    """The real call's grid for the verification problem: the flat one above FLAT_ABOVE heads (B * H that
    large would not fit a float64 reference), else the launches' own."""
    b, h = problem.shapes[0][:2]
    return flat_grid_forced(flat_launch(b * h))


def verify_heads(b: int, h: int, n: int, device: str) -> tuple:
    """(B, H) of the verification problem: all heads of as many images as two waves of programs need on a
    GPU (2 x SMs heads), 2 x 2 on the CPU; never more than VERIFY_SCORES float64 scores."""
    want = 2 * sm_count(torch.device(device)) if device.startswith("cuda") else 4
    want = max(1, min(want, VERIFY_SCORES // (n * n)))
    h2 = min(h, 2) if not device.startswith("cuda") else min(h, want)
    b2 = max(1, min(b, want // h2))
    return b2, h2


def reference_bytes(problem: Problem) -> int:
    """The float64 reference's N x N tensors (scores, probabilities and their gradients, about 6 live at
    once) plus 16 float64 copies of q, k, v."""
    b, h, n, d = problem.shapes[0]
    return 8 * b * h * (6 * n * n + 16 * 3 * n * d)


def make_inputs(problem: Problem, gen: torch.Generator) -> tuple:
    q, k, v = (randn(problem, i, gen) for i in range(3))
    return q, k, v, randint(problem, 3, 0, problem.shapes[0][2] + 1, gen)


def reference(q, k, v, prefix_len: Optional[torch.Tensor], params: AttentionParams) -> torch.Tensor:
    return attention_reference(q, k, v, is_causal=params.is_causal, block_size=params.block_size,
                               prefix_len=prefix_len, scale=params.scale)


# ------------------------------------------------------------------------------------------- Triton paths
def _triton_unsupported(problem: Problem) -> Optional[str]:
    return kernel_unsupported(problem)


def _fused_unsupported(problem: Problem):
    if not problem.grad:
        return "no backward to choose (the forward is triton-split's)"
    if problem.device_type == "cuda":
        _, _, n, d = problem.shapes[0]
        if not fused_backward_fits(d, problem.torch_dtype, n, torch.device(problem.device)):
            return f"a head's (N={n}, D={d}) tile does not fit on chip"
    return _triton_unsupported(problem)


def _atomic_unsupported(problem: Problem):
    if not problem.grad:
        return "no backward to choose (the forward is triton-split's)"
    if problem.params.deterministic:
        return "adds dQ with atomics: only for deterministic=False"
    return _triton_unsupported(problem)


def _triton(backward: str, deterministic: Optional[bool] = None) -> tuple:
    """A Triton candidate and its packed variant: the aimkern kernels with one backward path
    (``deterministic`` overrides the call's). The path is passed down, not set with ``launch_policy``:
    torch.compile cannot trace a ContextVar.set()."""
    if deterministic is None:  # the entries themselves, the path bound: one call less per op call
        return (functools.partial(attention_triton, backward=backward),
                functools.partial(attention_qkvpacked_triton, backward=backward))

    def with_determinism(params: AttentionParams) -> AttentionParams:
        return AttentionParams(params.is_causal, params.block_size, params.scale, deterministic)

    def run(q, k, v, prefix_len, params):
        return attention_triton(q, k, v, prefix_len, with_determinism(params), backward)

    def packed(qkv, prefix_len, params):
        return attention_qkvpacked_triton(qkv, prefix_len, with_determinism(params), backward)

    return run, packed


# -------------------------------------------------------------------------------------------- torch paths
_SDPA_BACKENDS = ("cudnn", "flash", "efficient", "math")


def _sdpa(backend: Optional[str]):
    def run(q, k, v, prefix_len, params: AttentionParams):
        n = q.shape[2]
        causal = effective_causal(params.is_causal, params.block_size, n)
        mask, token_causal = None, False
        if causal and params.block_size == 1 and prefix_len is None:
            token_causal = True
        elif causal:
            mask = attention_mask(n, is_causal=True, block_size=params.block_size, prefix_len=prefix_len,
                                  batch=q.shape[0], device=q.device)
        ctx = contextlib.nullcontext()
        if backend is not None:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            which = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                     "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}[backend]
            ctx = sdpa_kernel(which)
        with ctx:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=token_causal,
                                                  scale=params.scale)

    return run


def _sdpa_unsupported(backend: str):
    def rule(problem: Problem):
        if problem.dtype not in ("float16", "bfloat16", "float32"):
            return f"{problem.dtype} is not an SDPA kernel dtype"
        if backend in ("cudnn", "flash"):
            if problem.dtype == "float32":
                return f"SDPA's {backend} backend takes 16-bit inputs only"
            if mask_kind(problem) not in ("full", "causal"):
                return f"SDPA's {backend} backend takes no explicit mask ({mask_kind(problem)} needs one)"
        if backend != "math" and problem.grad and problem.params.deterministic:
            return f"SDPA's {backend} backward adds dQ with atomics: only for deterministic=False"
        return None

    return rule


def _candidates() -> list:
    fused, fused_packed = _triton("fused")
    split, split_packed = _triton("split")
    atomic, atomic_packed = _triton("split", deterministic=False)
    out = [
        Candidate("triton-fused", fused, "aimkern", _fused_unsupported, interpreted=True,
                  extra={"packed": fused_packed}),
        Candidate("triton-split", split, "aimkern", _triton_unsupported, interpreted=True,
                  extra={"packed": split_packed}),
        Candidate("triton-split-atomic", atomic, "aimkern", _atomic_unsupported, interpreted=True,
                  extra={"packed": atomic_packed}),
    ]
    out += [Candidate(f"sdpa-{b}", _sdpa(b), "torch", _sdpa_unsupported(b), devices=("cuda",)) for b in _SDPA_BACKENDS]
    out.append(Candidate("sdpa", _sdpa(None), "torch", _sdpa_unsupported("math"), devices=("cpu",)))
    out.append(Candidate("reference", reference, "torch"))
    return out


SPEC = add_spec(OpSpec(
    name=NAME,
    tensor_args=TENSORS,
    positional=3,
    params_type=AttentionParams,
    check=check,
    reference=reference,
    triton=attention_triton,
    candidates=_candidates(),
    make_inputs=make_inputs,
    small_problem=small_problem,
    mask_kind=mask_kind,
    shape_band=shape_band,
    autocast=(0, 1, 2),
    tolerance=DOT_TOLERANCE,
    reference_bytes=reference_bytes,
    verification_launch=verification_launch,
))
