"""The per-channel input affine that kernels apply in registers: value = x * scale[c] + shift[c].

uint8 inputs (the patch embedding's images, the packed pixel loss's target patches) carry their
normalization as two tuples of C floats in the op's params (``aimkern.data.decode.pixel_affine`` gives the
model's). Kernels read them as (C,) float32 device tensors, made once per (device, values) here, so that a
training step copies nothing to the GPU for them. Launchers run inside their custom ops, which
torch.compile does not trace, so the cache never becomes a graph guard.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

_TENSORS: Dict[tuple, Tuple[torch.Tensor, torch.Tensor]] = {}


def device_affine(scale: Optional[tuple], shift: Optional[tuple], device: torch.device,
                  stand_in: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) as (C,) float32 tensors on ``device``; ``stand_in`` twice when there is no affine (a
    kernel compiled without it never reads them)."""
    if scale is None:
        return stand_in, stand_in
    key = (str(device), scale, shift)
    if key not in _TENSORS:
        _TENSORS[key] = tuple(torch.tensor(v, dtype=torch.float32).to(device) for v in (scale, shift))
    return _TENSORS[key]
