"""CausalViT on packed images (``aimkern.PackedImages``): native resolution, no padding inside an image.

    pack (T tokens of S images) -> normalize + project + positions per image grid (one fused op on the
    uint8 patches) -> depth x Block on attention_varlen (each image its own AIM mask, no image sees
    another) -> norm -> (T, dim) features
    features -> head -> next_patch_pixel_loss_varlen (pixel) or linear_cross_entropy over ids (token)

uint8 patches are read by the fused kernels as they are: ``aimkern.patch_embed``'s and the pixel loss's
normalize them per channel in registers (``input_scale`` / ``input_shift`` = ``aimkern.data.decode.pixel_affine``,
``input_affine``), so no float copy of the pack is made.

``CausalViT.forward_features_packed`` / ``forward_packed`` forward here. Packing changes nothing: a square
image at the config's size gets, in its rows of the pack, the features, loss terms and gradients of
``forward_features`` on that image alone (tests/test_packed_model.py holds it, in any order and beside any
neighbours).

Nothing here reads a device tensor back to the host: the per-token sequence index, positions and target
masks are computed from ``cu_seqlens``, ``grid`` and ``coords`` on the device, and the pack's ``max_seqlen``
(a host int) bounds the attention grid, so a training step on packs of a fixed T has fixed shapes.
"""
from __future__ import annotations

from typing import Optional, Union

import torch

from ..data.decode import check_channels, pixel_affine
from ..functional import linear_cross_entropy, next_patch_pixel_loss_varlen
from .positions import resized_learned_at, sincos_at

PrefixLen = Union[None, int, torch.Tensor]
IGNORE_INDEX = -100


def input_affine(patches: torch.Tensor, in_chans: int) -> dict:
    """The keywords that make the fused ops (``patch_embed``, ``next_patch_pixel_loss_varlen``) read uint8
    patches as the model's input, ``(x / 255 - mean) / std`` per channel in fp32 in their kernels
    (``pixel_affine``: the numbers ``model_input`` uses for the dense batch); none for float patches, which
    are the model's input already."""
    if patches.is_floating_point():
        return {}
    if patches.dtype != torch.uint8:
        raise TypeError(f"packed patches must be uint8 or float, got {patches.dtype}")
    check_channels(in_chans)
    scale, shift = pixel_affine(in_chans)
    return {"input_scale": scale, "input_shift": shift}


def token_sequence(cu_seqlens: torch.Tensor, t: int) -> torch.Tensor:
    """(T,) int64: the sequence each token belongs to (empty sequences hold none), on the device."""
    pos = torch.arange(t, device=cu_seqlens.device)
    return torch.searchsorted(cu_seqlens[1:].long(), pos, right=True)


def check_pack(model, packed) -> None:
    """A ValueError / TypeError when ``packed`` cannot go through ``model`` (patch size, channels, device)."""
    from ..data.packing import PackedImages

    cfg = model.config
    if not isinstance(packed, PackedImages):
        raise TypeError(f"CausalViT: packed must be an aimkern.PackedImages (aimkern.pack_images), got "
                        f"{type(packed).__name__}")
    values = cfg.patch_size**2 * cfg.in_chans
    if packed.patch_size != cfg.patch_size or packed.patches.shape[1] != values:
        raise ValueError(f"CausalViT: the pack has patch size {packed.patch_size} and {packed.patches.shape[1]} "
                         f"values a patch; the model takes patch size {cfg.patch_size} with {cfg.in_chans} "
                         f"channels ({values} values)")
    weight = model.patch_embed.proj.weight
    if packed.patches.device != weight.device:
        raise ValueError(f"CausalViT: the pack is on {packed.patches.device}, the model on {weight.device} "
                         "(packed.to(device))")


def positions(model, packed, seq: torch.Tensor) -> torch.Tensor:
    """(T, dim) position rows for the pack's tokens at their own image's grid (``aimkern.models.positions``)."""
    cfg = model.config
    if cfg.pos_embed == "sincos":
        return sincos_at(cfg.dim, packed.coords, max(packed.max_seqlen, 1))
    return resized_learned_at(model.pos_embed, packed.coords, packed.grid.long()[seq], cfg.grid_size)


def embed(model, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """(T, P*P*C) patches in (p, q, c) order -> (T, dim) tokens through the model's own PatchEmbed (the fused
    ``patch_embed`` op: projection, bias, patch norm, positions). The patches are handed over as a 1 x T
    strip image (1, C, T * P, P), a strided view of ``x`` (no copy): its raster order is the pack's.

    uint8 patches go to the op as they are, with the model's normalization (``pixel_affine``) fused into
    its kernels: the pixels are read once, and no float copy is made. Float patches are the model's input
    already and pass as they are (positions in their dtype, as before)."""
    t = x.shape[0]
    p, c = model.config.patch_size, model.config.in_chans
    affine = input_affine(x, c)
    strip = x.view(t, p, p, c).permute(3, 0, 1, 2).reshape(1, c, t * p, p)
    return model.patch_embed(strip, pos if affine else pos.to(x.dtype), **affine)[0]


def forward_features_packed(model, packed, prefix_len: PrefixLen = None, is_causal: Optional[bool] = None
                            ) -> torch.Tensor:
    """(T, dim) features after the final norm; see ``CausalViT.forward_features_packed``."""
    check_pack(model, packed)
    return _features(model, packed, prefix_len, is_causal)


def _features(model, packed, prefix_len: PrefixLen, is_causal: Optional[bool]) -> torch.Tensor:
    if prefix_len is None:
        prefix_len = packed.prefix_len
    seq = token_sequence(packed.cu_seqlens, packed.num_tokens)
    h = embed(model, packed.patches, positions(model, packed, seq))
    for block in model.blocks:
        h = block(h, prefix_len=prefix_len, is_causal=is_causal, cu_seqlens=packed.cu_seqlens,
                  max_seqlen=max(packed.max_seqlen, 1))
    return model.norm(h)


def sample_prefix_len(packed, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """AIM's prefix per image of a pack: int32 (S,) uniform in [1, n_i - 1] for image i (1 for an image of
    one or two patches), drawn on the CPU and moved to the pack's device; padding sequences (from
    ``num_images`` on) get their length, so they hold no loss target. Reads the pack's lengths on the host."""
    lengths = packed.seqlens.cpu().long()
    u = torch.rand(lengths.shape[0], generator=generator, dtype=torch.float64)
    draw = 1 + (u * (lengths - 1).clamp_min(1)).long()
    prefix = torch.minimum(draw, lengths)
    prefix[packed.num_images:] = lengths[packed.num_images:]
    return prefix.to(torch.int32).to(packed.cu_seqlens.device)


def forward_packed(model, packed, prefix_len: PrefixLen = None, targets: Optional[torch.Tensor] = None
                   ) -> torch.Tensor:
    """The pretraining loss of a pack; see ``CausalViT.forward_packed``."""
    cfg = model.config
    check_pack(model, packed)
    if prefix_len is None:
        prefix_len = packed.prefix_len
    if prefix_len is None and model.training and cfg.prefix and cfg.is_causal:
        prefix_len = sample_prefix_len(packed)
    feats = _features(model, packed, prefix_len, None)
    offset = cfg.block_size
    if cfg.head == "pixel":
        # Targets are the normalized patches, as the dense loss takes them from the normalized images: the
        # loss's kernel normalizes the uint8 pack per channel (input_affine) before its per-patch statistics.
        return next_patch_pixel_loss_varlen(model.head(feats), packed.patches, packed.cu_seqlens, offset=offset,
                                            prefix_len=prefix_len, norm_pix=cfg.norm_pix,
                                            max_seqlen=max(packed.max_seqlen, 1), backend=cfg.backend,
                                            **input_affine(packed.patches, cfg.in_chans))
    return _token_loss(model, packed, feats, targets, prefix_len, offset)


def _token_loss(model, packed, feats: torch.Tensor, targets, prefix_len: PrefixLen, offset: int) -> torch.Tensor:
    """Cross-entropy of row i against token i + offset of the same image, counted when that target is at or
    after the image's prefix: the dense token loss, image by image, averaged over the pack's counted targets."""
    t = packed.num_tokens
    if targets is None:
        raise ValueError("CausalViT.forward_packed: the token head needs targets, the (T,) token ids of the "
                         "pack's patches (one per token, in the pack's order)")
    if not isinstance(targets, torch.Tensor) or tuple(targets.shape) != (t,):
        raise ValueError(f"CausalViT.forward_packed: targets must be a (T,) = ({t},) tensor of token ids")
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise TypeError(f"CausalViT.forward_packed: targets must be integer token ids, got {targets.dtype}")
    cu = packed.cu_seqlens.long()
    seq = token_sequence(packed.cu_seqlens, t)
    j = torch.arange(t, device=cu.device) - cu[seq] + offset  # the target index of row i in its image
    counted = j < (cu[seq + 1] - cu[seq])
    if prefix_len is not None:
        first = prefix_len if isinstance(prefix_len, torch.Tensor) else torch.tensor(prefix_len, device=cu.device)
        first = first.to(cu.device).long()
        counted = counted & (j >= (first[seq] if first.dim() else first))
    src = (torch.arange(t, device=cu.device) + offset).clamp_max(t - 1)
    tgt = targets.long()[src].masked_fill(~counted, IGNORE_INDEX)
    head = model.head
    total = linear_cross_entropy(head.features(feats), head.out.weight, tgt, linear_bias=head.out.bias,
                                 ignore_index=IGNORE_INDEX, reduction="sum", backend=model.config.backend)
    return total / counted.sum().clamp_min(1)
