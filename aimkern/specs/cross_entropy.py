"""The spec of ``aimkern.linear_cross_entropy``: checks, candidates, key parts, tolerance.

Candidates (each ``fn(input, linear_weight, target, linear_bias, params)``):

    triton       aimkern's fused head: logits tile by tile, never the (tokens, V) matrix; with a gradient,
                 loss and gradients in one pass (3 GEMM-equivalents)
    chunked      F.linear + F.cross_entropy over token chunks, each chunk recomputed in the backward
                 (torch.utils.checkpoint), so at most one chunk's logits live at a time
    torch-fused  torch's own F.linear_cross_entropy (torch >= 2.13; chunked with LinearCrossEntropyOptions
                 where torch has them), without z-loss
    reference    F.linear + F.cross_entropy on the whole (tokens, V) logits
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..checks import can_inspect_values, check_float_dtype, check_same_device, check_tensor
from ..ops._launch import gpu_configs_active, interpreting, kernels
from ..ops.cross_entropy import REDUCTIONS, CrossEntropyParams, linear_cross_entropy_triton
from ..reference.cross_entropy import linear_cross_entropy_reference
from .common import autotune_min_macs, kernel_unsupported, pow2, randint, randn
from .opspec import Candidate, OpSpec, Problem, Tolerance, add_spec

NAME = "linear_cross_entropy"
CHUNK_TOKENS = 4096  # the chunked candidate's tokens per chunk: 4096 x 8192 fp32 logits = 128 MiB


def check(tensors: tuple, params: CrossEntropyParams, backend: str, op: str = NAME) -> tuple:
    """((input (..., E), linear_weight (V, E), target (...), linear_bias (V,) or None), params), checked."""
    input, weight, target, bias = tensors
    check_tensor(input, "input", op, min_ndim=1)
    check_tensor(weight, "linear_weight", op, ndim=2)
    check_tensor(target, "target", op)
    e = input.shape[-1]
    v = weight.shape[0]
    if weight.shape[1] != e:
        raise ValueError(f"{op}: linear_weight must be (V, E) with E={e} (input's last dim), got {tuple(weight.shape)}")
    if e < 1:  # refused on every backend (the reference would return ln V from zero logits)
        raise ValueError(f"{op}: input's last dimension E must be >= 1 (a multiple of 8 is the fast case), got {e}")
    if v < 1:
        raise ValueError(f"{op}: linear_weight must have at least one row (V >= 1)")
    if tuple(target.shape) != tuple(input.shape[:-1]):
        raise ValueError(f"{op}: target must have shape {tuple(input.shape[:-1])} (input's leading dims), got {tuple(target.shape)}")
    if target.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise TypeError(f"{op}: target must be an integer tensor of class ids, got {target.dtype}")
    if bias is not None:
        check_tensor(bias, "linear_bias", op, ndim=1)
        if bias.shape != (v,):
            raise ValueError(f"{op}: linear_bias must have shape (V,) = ({v},), got {tuple(bias.shape)}")
    check_same_device((("input", input), ("linear_weight", weight), ("target", target), ("linear_bias", bias)), op)
    for name, t in (("input", input), ("linear_weight", weight), ("linear_bias", bias)):
        if t is not None:
            check_float_dtype(t, name, op, backend)
    for name, t in (("linear_weight", weight), ("linear_bias", bias)):  # every backend: one GEMM dtype
        if t is not None and t.dtype != input.dtype:
            raise TypeError(f"{op}: {name} must have input's dtype {input.dtype}, got {t.dtype}")
    if isinstance(params.ignore_index, bool) or not isinstance(params.ignore_index, int):
        raise TypeError(f"{op}: ignore_index must be an int (a class id), got {params.ignore_index!r}")
    if params.reduction not in REDUCTIONS:
        raise ValueError(f"{op}: reduction must be one of {REDUCTIONS}, got {params.reduction!r}")
    if not 0.0 <= params.label_smoothing <= 1.0:
        raise ValueError(f"{op}: label_smoothing must be in [0, 1], got {params.label_smoothing}")
    if not 0.0 <= params.z_loss < float("inf"):  # as label_smoothing: NaN fails the comparison
        raise ValueError(f"{op}: z_loss must be a finite float >= 0, got {params.z_loss}")
    # Target values are read only on the CPU, where it costs no device sync. On CUDA the check would be three
    # host syncs per call (every training step); there the kernels mark an out-of-range target instead, and
    # its token's loss is NaN (so a mean or sum is NaN): never a plausible-looking wrong loss.
    if target.device.type == "cpu" and can_inspect_values() and target.numel() > 0:
        kept = target[target != params.ignore_index]
        if kept.numel() > 0:
            lo, hi = int(kept.min()), int(kept.max())
            if lo < 0 or hi >= v:
                raise ValueError(
                    f"{op}: target values must be in [0, V={v}) or equal ignore_index={params.ignore_index}, "
                    f"got min {lo} and max {hi}"
                )
    return tensors, params


def reference(input, linear_weight, target, linear_bias, params: CrossEntropyParams) -> torch.Tensor:
    return linear_cross_entropy_reference(input, linear_weight, target, linear_bias=linear_bias,
                                          reduction=params.reduction, ignore_index=params.ignore_index,
                                          label_smoothing=params.label_smoothing, z_loss=params.z_loss)


def _float_dtypes_match(problem: Problem) -> Optional[str]:
    for i, name in ((1, "linear_weight"), (3, "linear_bias")):
        if problem.shapes[i] is not None and problem.dtype_of(i) != problem.dtype_of(0):
            return f"needs {name} in input's dtype"
    return None


def _triton_unsupported(problem: Problem) -> Optional[str]:
    return kernel_unsupported(problem) or _float_dtypes_match(problem)


def _chunk_losses(x, w, b, t, ignore_index: int, label_smoothing: float, z_loss: float):
    """Per-token loss (T,) fp32 of one chunk, zero where ignored."""
    logits = F.linear(x, w, b).float()
    loss = F.cross_entropy(logits, t, reduction="none", ignore_index=ignore_index, label_smoothing=label_smoothing)
    if z_loss:  # where, not a 0/1 product: with every token ignored, "mean"'s 1/0 upstream would give inf * 0
        z = torch.logsumexp(logits, dim=-1).square()
        loss = loss + z_loss * torch.where(t != ignore_index, z, torch.zeros_like(z))
    return loss


def _chunked(input, linear_weight, target, linear_bias, params: CrossEntropyParams):
    x = input.reshape(-1, input.shape[-1])
    t = target.reshape(-1).long()
    parts = []
    for t0 in range(0, x.shape[0], CHUNK_TOKENS):
        args = (x[t0:t0 + CHUNK_TOKENS], linear_weight, linear_bias, t[t0:t0 + CHUNK_TOKENS],
                params.ignore_index, params.label_smoothing, params.z_loss)
        grad = torch.is_grad_enabled() and any(a.requires_grad for a in args[:3] if a is not None)
        parts.append(checkpoint(_chunk_losses, *args, use_reentrant=False) if grad else _chunk_losses(*args))
    loss = torch.cat(parts) if parts else x.new_zeros((0,), dtype=torch.float32)
    if params.reduction == "none":
        return loss.reshape(target.shape)
    if params.reduction == "sum":
        return loss.sum()
    return loss.sum() / (t != params.ignore_index).sum()


def _torch_fused(input, linear_weight, target, linear_bias, params: CrossEntropyParams):
    options = getattr(torch.nn, "LinearCrossEntropyOptions", None)
    kwargs = dict(linear_bias=linear_bias, reduction=params.reduction, ignore_index=params.ignore_index,
                  label_smoothing=params.label_smoothing)
    if options is not None:
        kwargs["options"] = options()
    x = input.reshape(-1, input.shape[-1])  # it takes (T, E) and (T,)
    loss = F.linear_cross_entropy(x, linear_weight, target.reshape(-1).long(), **kwargs).float()
    return loss.reshape(target.shape) if params.reduction == "none" else loss


def _torch_fused_unsupported(problem: Problem) -> Optional[str]:
    if not hasattr(F, "linear_cross_entropy"):
        return f"torch {torch.__version__} has no F.linear_cross_entropy (torch >= 2.13)"
    if problem.params.z_loss:
        return "torch's F.linear_cross_entropy has no z-loss"
    if problem.dtype == "float16" and problem.grad:
        # Its loss is fp16, so autograd hands the backward the upstream gradient in fp16: a GradScaler's first
        # scale, 65536, becomes inf and every gradient NaN.
        return "returns an fp16 loss: a GradScaler's 65536 upstream overflows to inf in its backward"
    return _float_dtypes_match(problem)


def mask_kind(problem: Problem) -> str:
    params = problem.params
    parts = [params.reduction]
    parts += ["ls"] if params.label_smoothing else []
    parts += ["z"] if params.z_loss else []
    parts += ["bias"] if problem.shapes[3] is not None else []
    return "+".join(parts)


def shape_band(problem: Problem) -> str:
    tokens = 1
    for s in problem.shapes[2]:
        tokens *= s
    v, e = problem.shapes[1]
    return f"t<={pow2(tokens)}|v{v}|e{e}"


def small_problem(problem: Problem) -> Problem:
    """The fewest tokens that run the real call's code, the same vocabulary, width, dtype and options.

    With a gradient the kernels run chunk by chunk (``bwd_chunk_tokens``): where the real call has several
    chunks, a full chunk plus the real last one (dW and d(bias) accumulate over chunks; each chunk's GEMM
    size picks its table: autotuned or fixed). In one launch, the fewest tokens whose GEMM is as large as to
    be autotuned where the real one is; else 37 (a ragged tile)."""
    v, e = problem.shapes[1]
    tokens = 1
    for s in problem.shapes[2]:
        tokens *= s
    elem = problem.torch_dtype.itemsize
    least = autotune_min_macs(elem == 2)
    chunk = tokens
    if problem.grad:
        try:  # the chunking of the Triton path (imports Triton)
            chunk = kernels("cross_entropy").bwd_chunk_tokens(tokens, v, elem, interpreting() and not gpu_configs_active())
        except ImportError:  # no Triton: no chunks to reach
            pass
    if tokens > chunk:
        t2 = chunk + (tokens - chunk * ((tokens - 1) // chunk))
    elif least is not None and tokens * v * e >= least:
        t2 = min(tokens, -(-least // (v * e)))
    else:
        t2 = min(tokens, 37)
    shapes = list(problem.shapes)
    shapes[0], shapes[2] = (t2, e), (t2,)
    return problem.with_(shapes=tuple(shapes))


def reference_bytes(problem: Problem) -> int:
    """The float64 reference's (T, V) logits, probabilities and their gradient, plus the inputs in float64."""
    v, e = problem.shapes[1]
    tokens = 1
    for s in problem.shapes[2]:
        tokens *= s
    return 8 * (4 * tokens * v + 4 * (tokens + v) * e)


def make_inputs(problem: Problem, gen: torch.Generator) -> tuple:
    v, e = problem.shapes[1]
    x, w, b = randn(problem, 0, gen), randn(problem, 1, gen, e**-0.5), randn(problem, 3, gen)
    target = randint(problem, 2, 0, v, gen)
    drop = torch.rand(target.shape, generator=gen) < 0.1  # about one token in ten ignored
    target = torch.where(drop.to(target.device), torch.full_like(target, problem.params.ignore_index), target)
    return x, w, target, b


SPEC = add_spec(OpSpec(
    name=NAME,
    tensor_args=("input", "linear_weight", "target", "linear_bias"),
    positional=3,
    params_type=CrossEntropyParams,
    check=check,
    reference=reference,
    triton=linear_cross_entropy_triton,
    candidates=[
        Candidate("triton", linear_cross_entropy_triton, "aimkern", _triton_unsupported, interpreted=True),
        Candidate("chunked", _chunked, "torch", _float_dtypes_match),
        Candidate("torch-fused", _torch_fused, "torch", _torch_fused_unsupported),
        Candidate("reference", reference, "torch"),
    ],
    make_inputs=make_inputs,
    small_problem=small_problem,
    mask_kind=mask_kind,
    shape_band=shape_band,
    autocast=(0, 1, 3),
    reference_bytes=reference_bytes,
    tolerance=Tolerance(factor=2.0, atol={"float32": 1e-5, "float16": 1e-3, "bfloat16": 1e-2}),
))
