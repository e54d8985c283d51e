"""PatchEmbed: images -> raster-order tokens through `aimkern.patch_embed`."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn

from ..functional import patch_embed


class PatchEmbed(nn.Module):
    """(B, C, H, W) images -> (B, N, dim) tokens, N = (H // P) * (W // P), raster order.

    The projection is held in an ``nn.Conv2d`` (``proj.weight``, ``proj.bias``) so timm, MAE and AIM
    checkpoints load unchanged, but it runs as one fused GEMM (no cuDNN strided convolution). The position
    embedding, when given, is added in the same op. ``norm`` (AIMv2's patch norm) follows the projection.
    """

    def __init__(
        self,
        patch_size: int = 16,
        in_chans: int = 3,
        dim: int = 768,
        bias: bool = True,
        norm_layer: Optional[nn.Module] = None,
        backend: str = "auto",
    ):
        super().__init__()
        self.patch_size = patch_size
        self.backend = backend
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size, bias=bias)
        self.norm = norm_layer if norm_layer is not None else nn.Identity()

    def forward(self, images: torch.Tensor, pos_embed: Optional[torch.Tensor] = None, *,
                input_scale: Optional[Sequence[float]] = None,
                input_shift: Optional[Sequence[float]] = None) -> torch.Tensor:
        """images (B, C, H, W) float, or uint8 with ``input_scale`` / ``input_shift`` (C floats each, see
        ``aimkern.patch_embed``: normalized inside the op's kernels); pos_embed (N, E) / (1, N, E) or None."""
        norm = dict(input_scale=input_scale, input_shift=input_shift, backend=self.backend)
        if isinstance(self.norm, nn.Identity):
            return patch_embed(images, self.proj.weight, self.proj.bias, pos_embed, **norm)
        # With a patch norm the position embedding goes after the norm (AIMv2's order).
        x = self.norm(patch_embed(images, self.proj.weight, self.proj.bias, None, **norm))
        return x if pos_embed is None else x + pos_embed.reshape(1, -1, x.shape[-1]).to(x.dtype)
