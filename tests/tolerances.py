"""Error-relative tolerances: a kernel may err at most about as much as PyTorch does in the same dtype.

    err(kernel) <= factor * err(torch in the same dtype) + atol

where both errors are measured against a float64 computation of the same thing.
"""
from __future__ import annotations

import torch

from aimkern.dispatch.measure import max_abs_err  # one error measure for the tests and the dispatcher


def assert_close_relative(
    got: torch.Tensor, same_dtype_torch: torch.Tensor, ref64: torch.Tensor, *, name: str = "output",
    factor: float = 2.0, atol: float = 1e-5,
) -> None:
    """Assert ``got`` is within ``factor`` x the same-dtype PyTorch error of the float64 reference (+ atol)."""
    assert got.shape == ref64.shape, f"{name}: shape {tuple(got.shape)} != reference {tuple(ref64.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    err = max_abs_err(got, ref64)
    base = max_abs_err(same_dtype_torch, ref64)
    bound = factor * base + atol
    assert err <= bound, f"{name}: max error {err:.3e} > {factor} x torch's {base:.3e} + {atol:.1e}"
