"""`aimkern.linear_cross_entropy`: linear head + cross-entropy without the (tokens, V) logits.

Mirrors ``torch.nn.functional.linear_cross_entropy`` (torch >= 2.13) and adds z-loss. Backend dispatch and
input checks live here; the Triton launcher, autograd and custom-op registration join this file when the
kernel lands (kernels/cross_entropy.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..reference.cross_entropy import linear_cross_entropy_reference
from ._checks import can_inspect_values, check_float_dtype, check_same_device, check_tensor, resolve_backend

OP = "linear_cross_entropy"
REDUCTIONS = ("mean", "sum", "none")


@dataclass(frozen=True)
class CrossEntropyParams:
    """Non-tensor options of one linear_cross_entropy call."""

    reduction: str = "mean"  # "mean" over non-ignored tokens, "sum", or "none" (per token)
    ignore_index: int = -100  # targets equal to this contribute nothing
    label_smoothing: float = 0.0  # in [0, 1], as in F.cross_entropy
    z_loss: float = 0.0  # weight of logsumexp(logits) ** 2, averaged like the loss


def _check_inputs(input, weight, target, bias, params: CrossEntropyParams, backend: str) -> None:
    check_tensor(input, "input", OP, min_ndim=1)
    check_tensor(weight, "linear_weight", OP, ndim=2)
    check_tensor(target, "target", OP)
    e = input.shape[-1]
    v = weight.shape[0]
    if weight.shape[1] != e:
        raise ValueError(f"{OP}: linear_weight must be (V, E) with E={e} (input's last dim), got {tuple(weight.shape)}")
    if v < 1:
        raise ValueError(f"{OP}: linear_weight must have at least one row (V >= 1)")
    if tuple(target.shape) != tuple(input.shape[:-1]):
        raise ValueError(f"{OP}: target must have shape {tuple(input.shape[:-1])} (input's leading dims), got {tuple(target.shape)}")
    if target.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise TypeError(f"{OP}: target must be an integer tensor of class ids, got {target.dtype}")
    if bias is not None:
        check_tensor(bias, "linear_bias", OP, ndim=1)
        if bias.shape != (v,):
            raise ValueError(f"{OP}: linear_bias must have shape (V,) = ({v},), got {tuple(bias.shape)}")
    check_same_device((("input", input), ("linear_weight", weight), ("target", target), ("linear_bias", bias)), OP)
    for name, t in (("input", input), ("linear_weight", weight), ("linear_bias", bias)):
        if t is not None:
            check_float_dtype(t, name, OP, backend)
    if params.reduction not in REDUCTIONS:
        raise ValueError(f"{OP}: reduction must be one of {REDUCTIONS}, got {params.reduction!r}")
    if not 0.0 <= params.label_smoothing <= 1.0:
        raise ValueError(f"{OP}: label_smoothing must be in [0, 1], got {params.label_smoothing}")
    if params.z_loss < 0.0:
        raise ValueError(f"{OP}: z_loss must be >= 0, got {params.z_loss}")
    if can_inspect_values() and target.numel() > 0:
        kept = target[target != params.ignore_index]
        if kept.numel() > 0:
            lo, hi = int(kept.min()), int(kept.max())
            if lo < 0 or hi >= v:
                raise ValueError(
                    f"{OP}: target values must be in [0, V={v}) or equal ignore_index={params.ignore_index}, "
                    f"got min {lo} and max {hi}"
                )


def _linear_cross_entropy_triton(input, weight, target, bias, params: CrossEntropyParams) -> torch.Tensor:
    raise NotImplementedError(
        "aimkern.linear_cross_entropy: the Triton kernel has not landed yet; use backend='reference' "
        "(or 'auto' on CPU)"
    )


def linear_cross_entropy(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    target: torch.Tensor,
    *,
    linear_bias: Optional[torch.Tensor] = None,
    reduction: str = "mean",
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    backend: str = "auto",
) -> torch.Tensor:
    """Cross-entropy of ``F.linear(input, linear_weight, linear_bias)`` against ``target``, plus z-loss.

    Args:
        input: (..., E) hidden states.
        linear_weight: (V, E) head weight.  linear_bias: (V,) or None.
        target: (...) integer class ids in [0, V), or ignore_index.
        reduction: "mean" (over non-ignored tokens), "sum" or "none" (shape of target).
        ignore_index, label_smoothing: as in ``F.cross_entropy``.
        z_loss: weight of ``logsumexp(logits) ** 2``, averaged like the loss.
        backend: "auto" (Triton on CUDA, reference on CPU), "triton" or "reference".

    Returns:
        float32 loss (float64 for float64 inputs): a scalar, or target's shape for reduction="none".
    """
    params = CrossEntropyParams(reduction, ignore_index, float(label_smoothing), float(z_loss))
    check_tensor(input, "input", OP)
    be = resolve_backend(backend, input, OP)
    _check_inputs(input, linear_weight, target, linear_bias, params, be)
    if be == "reference":
        return linear_cross_entropy_reference(
            input,
            linear_weight,
            target,
            linear_bias=linear_bias,
            reduction=reduction,
            ignore_index=ignore_index,
            label_smoothing=label_smoothing,
            z_loss=z_loss,
        )
    return _linear_cross_entropy_triton(input, linear_weight, target, linear_bias, params)
