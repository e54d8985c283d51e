"""Helpers the op specs share: shape bands of the dispatch key and synthetic inputs."""
from __future__ import annotations

import math
from typing import Optional

import torch

from ..ops._launch import interpreter_dtype_problem, interpreting, pow2
from .opspec import Problem, Tolerance

__all__ = ["autotune_min_macs", "exact_or_pow2", "kernel_unsupported", "pow2", "randint", "randn"]


def exact_or_pow2(n: int) -> str:
    """A sequence length's part of the shape band: up to 1024 each length is its own band (the kernels' tail
    tiles and the fused / split hand-over change within a few tokens); longer ones share a power of two."""
    return str(n) if n <= 1024 else f"<={pow2(n)}"


def randn(problem: Problem, index: int, gen: torch.Generator, scale: float = 1.0) -> Optional[torch.Tensor]:
    """Tensor argument ``index`` of ``problem``: standard normal (times ``scale``) in its dtype on the
    problem's device, drawn on the CPU from ``gen``, requiring grad as the problem says; None if absent."""
    shape = problem.shapes[index]
    if shape is None:
        return None
    t = torch.randn(shape, generator=gen, dtype=torch.float32) * scale
    t = t.to(device=problem.device, dtype=problem.dtype_of(index))
    return t.requires_grad_(bool(problem.requires_grad[index]))


def randint(problem: Problem, index: int, low: int, high: int, gen: torch.Generator) -> Optional[torch.Tensor]:
    """Integer tensor argument ``index`` of ``problem``, uniform in [low, high), in its dtype; None if absent."""
    shape = problem.shapes[index]
    if shape is None:
        return None
    t = torch.randint(low, high, shape, generator=gen, dtype=torch.int64)
    return t.to(device=problem.device, dtype=problem.dtype_of(index))


def autotune_min_macs(sixteen_bit: bool) -> Optional[int]:
    """The fewest multiply-adds of a GEMM-like launch that the kernels autotune (kernels/launch_table.py's
    ``tunable``), None where they never do (fp32, or no Triton installed): a verification problem must
    reach the same side of it as the real call."""
    if not sixteen_bit:
        return None
    try:
        from ..kernels.launch_table import AUTOTUNE_MIN_MACS  # imports Triton: only when deciding
    except ImportError:
        return None
    return AUTOTUNE_MIN_MACS


def kernel_unsupported(problem: Problem) -> Optional[str]:
    """Why the Triton kernels cannot run ``problem`` (None when they can), for the ops whose kernels take the
    first tensor's dtype: CPU tensors need Triton's interpreter, the dtype must be a kernel dtype, and the
    interpreter's own dtype limits (``interpreter_dtype_problem``) hold."""
    if problem.device_type == "cpu" and not interpreting():
        return "Triton on CPU tensors needs its interpreter (TRITON_INTERPRET=1)"
    if problem.dtype not in ("float16", "bfloat16", "float32"):
        return f"{problem.dtype} is not a kernel dtype"
    return interpreter_dtype_problem(problem.dtype, problem.device_type)


KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def loss_kernel_unsupported(problem: Problem, data: str, data_dtypes: tuple) -> Optional[str]:
    """Why a pixel loss's kernel cannot run ``problem`` (None when it can): CPU tensors need Triton's
    interpreter, pred (tensor 0) must be a kernel dtype, the target data (tensor 1, named ``data``) one of
    ``data_dtypes``, and the data must need no gradient (the kernels read it as data)."""
    if problem.device_type == "cpu" and not interpreting():
        return "Triton on CPU tensors needs its interpreter (TRITON_INTERPRET=1)"
    if problem.dtype_of(0) not in KERNEL_DTYPES:
        return f"pred in {problem.dtype_of(0)} is not a kernel dtype"
    if problem.dtype_of(1) not in data_dtypes:
        return f"{data} in {problem.dtype_of(1)}: not a dtype the kernel reads"
    if problem.requires_grad[1]:
        return f"treats {data} as data (no gradient); the {data} require grad"
    return None


_FLOAT32_MAX = 3.4028234663852886e38


def channel_values(value, name: str, c: int, op: str) -> Optional[tuple]:
    """``value`` (None, or C finite real numbers within float32's range: a per-channel input affine, as
    ``input_scale`` / ``input_shift``) as a tuple of floats; a TypeError / ValueError naming ``name``."""
    if value is None:
        return None
    if not isinstance(value, (tuple, list)):
        raise TypeError(f"{op}: {name} must be None or a tuple of C={c} floats (one per channel), got "
                        f"{type(value).__name__}")
    if len(value) != c:
        raise ValueError(f"{op}: {name} must hold C={c} floats (one per channel), got {len(value)}")
    for v in value:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TypeError(f"{op}: {name} must hold floats, got {type(v).__name__} {v!r}")
        if not (math.isfinite(v) and abs(v) <= _FLOAT32_MAX):
            raise ValueError(f"{op}: {name} must hold finite floats within float32's range, got {v!r}")
    return tuple(float(v) for v in value)


# The tolerance rules the specs share (``Tolerance``: the error against float64 may be ``factor`` x the
# same-dtype PyTorch error plus ``atol``). Dot products of 16-bit operands (attention, packed or not, and
# the patch embedding's GEMM) round each operand once; a pixel loss is an fp32 reduction of fp32 errors,
# whose only 16-bit rounding is of pred and of its gradient.
DOT_TOLERANCE = Tolerance(factor=2.0, atol={"float32": 1e-5, "float16": 2e-3, "bfloat16": 1.6e-2})
PIXEL_LOSS_TOLERANCE = Tolerance(factor=2.0, atol={"float32": 1e-5, "float16": 1e-4, "bfloat16": 1e-3})
