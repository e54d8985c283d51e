"""Helpers the op specs share: shape bands and synthetic inputs."""
from __future__ import annotations

from typing import Optional

import torch

from ..spec import Problem


def pow2(n: int) -> int:
    """n rounded up to a power of two (the band of a dimension that only changes the grid)."""
    return 1 << max(0, n - 1).bit_length()


def seq_band(n: int) -> str:
    """Sequence lengths up to 1024 are their own band (the kernels' tail tiles and the fused / split
    hand-over change within a few tokens); longer ones share a power-of-two band."""
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


def on_device(problem: Problem, device_type: str) -> Optional[str]:
    return None if problem.device_type == device_type else f"runs on {device_type} only"


# --------------------------------------------------------------------------------- compile gate problems
GATE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def gate_dtypes(subset: str) -> tuple:
    """The dtypes of the compile gate's problems: "gpu-run" keeps the 16-bit ones benchmarks/gpu_check.sh runs."""
    return ("bf16", "fp16") if subset == "gpu-run" else ("bf16", "fp16", "fp32")


def meta(*shape, dtype: torch.dtype) -> torch.Tensor:
    """A meta tensor: the gate's launchers see shapes, dtypes and strides, and launch nothing."""
    return torch.empty(*shape, device="meta", dtype=dtype)


# ------------------------------------------------------------------------------------ contract problems
def problem(op: str, dtype: str, shapes: tuple, options: dict, requires_grad: tuple, dtypes: tuple) -> Problem:
    """A CPU ``Problem`` of the contract tests (tests/test_op_contracts.py); ``dtypes`` entries of None
    (for present tensors) mean the problem's dtype."""
    dtypes = tuple(None if s is None else (d or dtype) for s, d in zip(shapes, dtypes))
    return Problem(op=op, device="cpu", dtype=dtype, shapes=tuple(shapes), options=tuple(sorted(options.items())),
                   requires_grad=tuple(requires_grad), dtypes=dtypes)


def strided(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The same values in a layout no kernel may assume: memory order reversed (dim 0 is the fastest) and
    neighbours two elements apart. A view of a leaf that requires grad when ``t`` does, so a gradient
    reaches it through its strides."""
    if t is None or t.dim() == 0:
        return t
    rev = tuple(range(t.dim() - 1, -1, -1))
    base = t.detach().permute(rev).contiguous()
    wide = base.new_zeros((*base.shape[:-1], 2 * base.shape[-1]))
    wide[..., ::2] = base
    wide.requires_grad_(t.requires_grad)
    return wide[..., ::2].permute(rev)
