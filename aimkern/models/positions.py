"""Position embeddings of packed images: one (T, dim) row per token, following each image's own grid.

A pack (``aimkern.PackedImages``) holds images of different grids end to end; token t is at (row, col) =
``coords[t]`` of its image's grid (h, w) = ``grid[seq(t)]``. Both embeddings here are computed per token on
the pack's device from those tensors alone: nothing is read back to the host (no sync in a training step),
and a pack of any mix of grids is one gather.

- ``sincos_at(dim, coords)``: the fixed 2-D sine-cosine embedding (MAE / AIM / AIMv2-native) of each token's
  (row, col): row t equals row ``r * w + c`` of ``sincos_pos_embed_2d(dim, h, w)`` bit for bit (the same
  float64 angles, rounded once to float32), so a square image at the config's size gets the dense table.
- ``resized_learned_at(table, coords, grids)``: a learned (G * G, dim) table resized to each token's image
  grid by bilinear interpolation, as ``F.interpolate(table as (1, dim, G, G), size=(h, w), mode="bilinear",
  align_corners=False)`` (no antialias) computes it, but only at the rows the pack needs. At h = w = G the
  weights are exactly 0 / 1: the table itself. Differentiable (its gradient is the interpolation's adjoint).
  Per token rather than per distinct grid: no host read of the grids, and the work is 4 rows a token.
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch

from ..nn.pos_embed import _sincos_1d

# (dim, device) -> float64 (L, dim // 2) 1-D sin-cos rows for positions 0..L-1, grown on demand.
_SINCOS_1D: Dict[Tuple[int, str], torch.Tensor] = {}


def _sincos_rows(dim: int, length: int, device) -> torch.Tensor:
    """float64 (>= length, dim // 2): ``_sincos_1d(dim // 2, arange(length))``, cached per (dim, device)."""
    if torch.compiler.is_compiling():  # no cache in a graph: a cache an eager call fills would fail its guard
        return _sincos_1d(dim // 2, torch.arange(length, device=device))
    key = (dim, str(device))
    table = _SINCOS_1D.get(key)
    if table is None or table.shape[0] < length:
        size = max(length, 64 if table is None else 2 * table.shape[0])
        table = _sincos_1d(dim // 2, torch.arange(size, device=device))
        _SINCOS_1D[key] = table
    return table


def sincos_at(dim: int, coords: torch.Tensor, max_extent: int) -> torch.Tensor:
    """(T, dim) float32 sin-cos embedding of tokens at ``coords`` (T, 2) int (row, col).

    ``max_extent``: a host int above every row and column (a pack's ``max_seqlen`` is one), which sizes the
    cached 1-D table without reading ``coords``. MAE's channel order: first half the column, second the row.
    """
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs dim divisible by 4, got {dim}")
    if coords.dim() != 2 or coords.shape[1] != 2:
        raise ValueError(f"coords must be (T, 2) (row, col), got {tuple(coords.shape)}")
    rows = _sincos_rows(dim, max(int(max_extent), 1), coords.device)
    idx = coords.long()
    return torch.cat([rows[idx[:, 1]], rows[idx[:, 0]]], dim=1).to(torch.float32)


def _axis(index: torch.Tensor, size: torch.Tensor, source: int):
    """Bilinear source rows along one axis, ``align_corners=False``: (lo, hi, weight of hi) per token for
    output position ``index`` of ``size`` positions, read from ``source`` positions (PyTorch's formula:
    src = max((i + 0.5) * source / size - 0.5, 0), lo = floor(src), hi = min(lo + 1, source - 1))."""
    scale = source / size.to(torch.float32)
    src = ((index.to(torch.float32) + 0.5) * scale - 0.5).clamp_min(0.0)
    lo = src.floor().long().clamp_max(source - 1)
    hi = (lo + 1).clamp_max(source - 1)
    return lo, hi, (src - lo.to(torch.float32)).unsqueeze(1)


def resized_learned_at(table: torch.Tensor, coords: torch.Tensor, grids: torch.Tensor, grid_size: int
                       ) -> torch.Tensor:
    """(T, dim) rows of a learned (G*G, dim) or (1, G*G, dim) position table, bilinearly resized to each
    token's image grid.

    coords: (T, 2) int (row, col) of each token; grids: (T, 2) int (h, w) of each token's image; grid_size: G.
    Returns in the table's dtype, differentiable with respect to ``table``.
    """
    g = grid_size
    table = table.reshape(g, g, -1)
    r0, r1, wr = _axis(coords[:, 0], grids[:, 0], g)
    c0, c1, wc = _axis(coords[:, 1], grids[:, 1], g)
    wr, wc = wr.to(table.dtype), wc.to(table.dtype)
    top = table[r0, c0] * (1 - wc) + table[r0, c1] * wc
    bottom = table[r1, c0] * (1 - wc) + table[r1, c1] * wc
    return top * (1 - wr) + bottom * wr
