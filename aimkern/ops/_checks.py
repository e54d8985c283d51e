"""Shared input checks and backend resolution for the public ops.

Every public op validates its arguments here, once, at the boundary, so that a bad input gets a
ValueError/TypeError naming the argument instead of a wrong result or a CUDA crash deep inside a kernel.
"""
from __future__ import annotations

import weakref
from typing import Iterable, Optional

import torch

from ._launch import interpreting

BACKENDS = ("auto", "triton", "reference")

# Dtypes the Triton kernels accept. The reference path also takes float64 (tests use it as ground truth).
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
REFERENCE_DTYPES = KERNEL_DTYPES + (torch.float64,)


def check_backend_name(backend, op: str) -> None:
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {backend!r}")


def resolve_backend(backend: str, ref: torch.Tensor, op: str) -> str:
    """Map ``backend`` to "triton" or "reference" for tensors living on ``ref.device``.

    "auto" runs Triton on CUDA and the reference elsewhere. "triton" on CPU tensors needs Triton's
    interpreter, which must be switched on (TRITON_INTERPRET=1) before aimkern's kernels are imported.
    """
    check_backend_name(backend, op)
    if backend == "auto":
        return "triton" if ref.is_cuda else "reference"
    if backend == "triton" and not ref.is_cuda and not interpreting():
        raise ValueError(
            f"{op}: backend='triton' got tensors on {ref.device}; Triton kernels run on CUDA tensors, or on "
            "CPU tensors under Triton's interpreter (set TRITON_INTERPRET=1 before importing aimkern)"
        )
    return backend


def measured_auto(backend: str) -> bool:
    """Whether ``backend`` ("auto") is decided by measuring (``aimkern.dispatch``) rather than by the fixed
    rule (``AIMKERN_DISPATCH=fixed``: Triton on CUDA, the reference elsewhere)."""
    if backend != "auto":
        return False
    global _mode
    if _mode is None:
        from ..dispatch.environment import mode  # imported late: aimkern.dispatch imports the ops' specs

        _mode = mode
    return _mode() == "measured"


_mode = None  # aimkern.dispatch.environment.mode, once imported


def autocast_inputs(*tensors):
    """Cast floating inputs to the autocast dtype when autocast is on for their device, as F.linear and SDPA do.

    Custom ops are invisible to autocast, so the GEMM-like ops (attention, patch_embed,
    linear_cross_entropy) apply its rule themselves: under ``torch.autocast("cuda", torch.bfloat16)``
    fp32 images and weights reach the kernel as bf16 instead of running an fp32 GEMM. Like autocast,
    float64 is left alone. Non-tensors (None) pass through.
    """
    ref = next((t for t in tensors if isinstance(t, torch.Tensor)), None)
    if ref is None or ref.device.type not in ("cuda", "cpu") or not torch.is_autocast_enabled(ref.device.type):
        return tensors
    dtype = torch.get_autocast_dtype(ref.device.type)
    return tuple(
        t.to(dtype) if isinstance(t, torch.Tensor) and t.dtype in (torch.float32, torch.float16, torch.bfloat16) else t
        for t in tensors
    )


def check_tensor(x, name: str, op: str, ndim: Optional[int] = None, min_ndim: Optional[int] = None) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{op}: {name} must have {ndim} dimensions, got shape {tuple(x.shape)}")
    if min_ndim is not None and x.dim() < min_ndim:
        raise ValueError(f"{op}: {name} must have at least {min_ndim} dimensions, got shape {tuple(x.shape)}")


def check_float_dtype(x: torch.Tensor, name: str, op: str, backend: str) -> None:
    allowed = KERNEL_DTYPES if backend == "triton" else REFERENCE_DTYPES
    if x.dtype not in allowed:
        names = ", ".join(str(d).replace("torch.", "") for d in allowed)
        raise TypeError(f"{op}: {name} must be one of {names} for backend={backend!r}, got {x.dtype}")


# Triton's interpreter multiplies bf16 operands of tl.dot as raw bits: every kernel built on tl.dot
# (attention, patch_embed, linear_cross_entropy) refuses bf16 there, with this one rule.
INTERPRETED_BF16 = "bfloat16 is not supported under Triton's interpreter (its bf16 tl.dot is wrong)"


def interpreter_dtype_problem(dtype, device_type: str) -> Optional[str]:
    """Why a tl.dot kernel would compute ``dtype`` (a torch.dtype or its name) wrong on ``device_type``
    tensors, i.e. under Triton's interpreter; None when it computes it right."""
    name = dtype if isinstance(dtype, str) else str(dtype).replace("torch.", "")
    if name == "bfloat16" and device_type != "cuda" and interpreting():
        return INTERPRETED_BF16
    return None


def check_interpretable_dtype(x: torch.Tensor, op: str) -> None:
    """TypeError for a tensor a tl.dot kernel would compute wrong under the interpreter (bf16 off CUDA)."""
    reason = interpreter_dtype_problem(x.dtype, x.device.type)
    if reason is not None:
        raise TypeError(f"{op}: {reason}; use float16 / float32 on CPU, or run bfloat16 on a CUDA GPU")


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


_select = None  # aimkern.dispatch.core.select, once imported
_SPECS: dict = {}  # aimkern.ops.spec.SPECS, once imported


def run_dispatched(op: str, tensors: tuple, options: dict, dtype: torch.dtype):
    """Run the call through the candidate ``aimkern.dispatch`` chooses for it (``backend="auto"``)."""
    cand = select_candidate(op, tensors, options, dtype)
    args, kwargs = _SPECS[op].split_call(tensors, options)
    return cand.fn(*args, **kwargs)


def select_candidate(op: str, tensors: tuple, options: dict, dtype: torch.dtype):
    """``aimkern.dispatch.core.select``, imported on first use (aimkern.dispatch imports the ops' specs)."""
    global _select, _SPECS
    if _select is None:
        from ..dispatch.core import select
        from .spec import SPECS

        _select, _SPECS = select, SPECS
    return _select(op, tensors, options, dtype)
