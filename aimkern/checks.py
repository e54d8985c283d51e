"""Argument checks every layer may use: plain validation, no dispatch, no kernels.

The public ops validate their arguments once, at the boundary (``aimkern.specs.<op>.check`` through
``aimkern.functional.run``), so that a bad input gets a ValueError/TypeError naming the argument instead of
a wrong result or a CUDA crash deep inside a kernel. The model integrations (timm, transformers) use the
same checks for their own options. This module imports torch and ``aimkern.backends`` only: the ops layer,
the specs and the integrations can all import it without an import circle.
"""
from __future__ import annotations

import weakref
from typing import Iterable, Optional

import torch

from .backends import BACKENDS

# Dtypes the Triton kernels accept. The reference path also takes float64 (tests use it as ground truth).
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
REFERENCE_DTYPES = KERNEL_DTYPES + (torch.float64,)


def check_backend_name(backend, op: str) -> None:
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {backend!r}")


def check_tensor(x, name: str, op: str, ndim: Optional[int] = None, min_ndim: Optional[int] = None) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{op}: {name} must have {ndim} dimensions, got shape {tuple(x.shape)}")
    if min_ndim is not None and x.dim() < min_ndim:
        raise ValueError(f"{op}: {name} must have at least {min_ndim} dimensions, got shape {tuple(x.shape)}")


def check_float_dtype(x: torch.Tensor, name: str, op: str, backend: str) -> None:
    """``x`` in a dtype ``backend`` ("triton" or "reference") computes in."""
    allowed = KERNEL_DTYPES if backend == "triton" else REFERENCE_DTYPES
    if x.dtype not in allowed:
        names = ", ".join(str(d).replace("torch.", "") for d in allowed)
        raise TypeError(f"{op}: {name} must be one of {names} for backend={backend!r}, got {x.dtype}")


def check_same_device(tensors: Iterable[tuple[str, Optional[torch.Tensor]]], op: str) -> None:
    first = None
    for name, t in tensors:
        if t is None:
            continue
        if first is None:
            first = (name, t.device)
        elif t.device != first[1]:
            raise ValueError(f"{op}: {name} is on {t.device} but {first[0]} is on {first[1]}; put them on one device")


def can_inspect_values() -> bool:
    """Whether value checks (which read tensor data, a host sync on CUDA) may run.

    Under torch.compile tracing, tensors are fake and data-dependent checks would break the graph, so
    they are skipped there; the kernels clamp indices themselves so a bad value can never crash them.
    """
    return not torch.compiler.is_compiling()


def normalize_prefix_len(prefix_len, batch: int, n: int, device: torch.device, op: str) -> Optional[torch.Tensor]:
    """Check ``prefix_len`` (None, int, or an int tensor of shape (B,)) and return None or an int32 (B,) tensor."""
    if prefix_len is None:
        return None
    if isinstance(prefix_len, bool):
        raise TypeError(f"{op}: prefix_len must be None, an int or an integer tensor of shape (B,), got a bool")
    if isinstance(prefix_len, int):
        if not 0 <= prefix_len <= n:
            raise ValueError(f"{op}: prefix_len must be in [0, N={n}], got {prefix_len}")
        return torch.full((batch,), prefix_len, dtype=torch.int32, device=device)
    if not isinstance(prefix_len, torch.Tensor):
        raise TypeError(
            f"{op}: prefix_len must be None, an int or an integer tensor of shape (B,), got {type(prefix_len).__name__}"
        )
    if prefix_len.dtype.is_floating_point or prefix_len.dtype.is_complex or prefix_len.dtype == torch.bool:
        raise TypeError(f"{op}: prefix_len must be an integer tensor, got {prefix_len.dtype}")
    if prefix_len.shape != (batch,):
        raise ValueError(f"{op}: prefix_len must have shape (B,) = ({batch},), got {tuple(prefix_len.shape)}")
    if prefix_len.device != device:
        raise ValueError(f"{op}: prefix_len is on {prefix_len.device} but the inputs are on {device}")
    if can_inspect_values() and batch > 0 and not _already_validated(prefix_len, n):
        lo, hi = int(prefix_len.min()), int(prefix_len.max())  # a host sync on CUDA
        if lo < 0 or hi > n:
            raise ValueError(f"{op}: prefix_len values must be in [0, N={n}], got min {lo} and max {hi}")
        remember_validated(prefix_len, n)
    return prefix_len.to(torch.int32)


# A model passes one prefix_len tensor to every block: remember the last one that passed the range check
# (by identity and version counter, so an in-place change is checked again) and sync once per step, not
# once per layer.
_last_validated: tuple = (None, -1, -1)


def _already_validated(t: torch.Tensor, n: int) -> bool:
    ref, version, checked_n = _last_validated
    return ref is not None and ref() is t and version == t._version and checked_n >= 0 and n >= checked_n


def remember_validated(t: torch.Tensor, n: int) -> None:
    """Record that ``t`` (a prefix_len tensor) holds values in [0, n], as the range check would find: a
    caller that drew the values itself (the training step, on the CPU) spares the ops the check's read-back
    from the GPU. An in-place change of ``t`` makes the ops check it again."""
    global _last_validated
    _last_validated = (weakref.ref(t), t._version, n)
