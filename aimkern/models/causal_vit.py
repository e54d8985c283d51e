"""CausalViT: a lean Vision Transformer for autoregressive (next-patch, raster-order) pretraining.

images -> PatchEmbed (+ positions) -> depth x Block (prefix/block-causal attention) -> norm -> features
features -> PredictionHead -> next_patch_pixel_loss (pixel objective) or linear_cross_entropy (token objective)

No class token; tokens are patches in raster order. Every op runs through aimkern's public ops, so each
Triton kernel swaps in through ``config.backend`` without touching the model.
"""
from __future__ import annotations

from functools import partial
from typing import Optional, Union

import torch
import torch.nn as nn

from ..nn import Attention, Block, PatchEmbed, PredictionHead, make_mlp, make_norm, sincos_pos_embed_2d
from ..functional import linear_cross_entropy, next_patch_pixel_loss
from ..reference.targets import target_mask
from .. import hooks
from .config import ViTConfig

PrefixLen = Union[None, int, torch.Tensor]


class CausalViT(nn.Module):
    def __init__(self, config: ViTConfig):
        super().__init__()
        if not isinstance(config, ViTConfig):
            raise TypeError(f"CausalViT: config must be a ViTConfig, got {type(config).__name__}")
        self.config = cfg = config
        norm = partial(make_norm, cfg.norm, eps=cfg.norm_eps, bias=cfg.has_norm_bias)

        self.patch_embed = PatchEmbed(
            cfg.patch_size, cfg.in_chans, cfg.dim, bias=cfg.has_patch_bias,
            norm_layer=norm(cfg.dim) if cfg.patch_norm else None, backend=cfg.backend,
        )
        n = cfg.num_patches
        if cfg.pos_embed == "learned":
            self.pos_embed = nn.Parameter(torch.zeros(1, n, cfg.dim))
        else:
            pos = sincos_pos_embed_2d(cfg.dim, cfg.grid_size, cfg.grid_size).unsqueeze(0)
            self.register_buffer("pos_embed", pos, persistent=False)

        self.blocks = nn.ModuleList(
            Block(
                attn=Attention(
                    cfg.dim, cfg.num_heads, qkv_bias=cfg.qkv_bias, proj_bias=cfg.bias,
                    is_causal=cfg.is_causal, block_size=cfg.block_size, backend=cfg.backend,
                ),
                mlp=make_mlp(cfg.mlp, cfg.dim, cfg.mlp_hidden_dim, bias=cfg.bias),
                norm1=norm(cfg.dim),
                norm2=norm(cfg.dim),
            )
            for _ in range(cfg.depth)
        )
        self.norm = norm(cfg.dim)

        head_width = cfg.head_width or cfg.dim
        out_dim = cfg.patch_size**2 * cfg.in_chans if cfg.head == "pixel" else cfg.vocab_size
        self.head = PredictionHead(
            cfg.dim, out_dim, depth=cfg.head_depth, hidden_dim=head_width,
            make_block_mlp=lambda w: make_mlp(cfg.mlp, w, int(w * cfg.mlp_ratio), bias=cfg.bias),
            make_norm=norm, bias=cfg.bias,
        )
        self.reset_parameters()

    # ----------------------------------------------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str, **overrides) -> "CausalViT":
        """Build a named preset (``ViTConfig.from_preset``), with optional config overrides."""
        return cls(ViTConfig.from_preset(name, **overrides))

    def reset_parameters(self) -> None:
        # ViT/MAE initialization: truncated normal (std 0.02) for linears and learned positions, the patch
        # projection like a linear layer (xavier on its flattened view), zero biases, unit norms.
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        if self.patch_embed.proj.bias is not None:
            nn.init.zeros_(self.patch_embed.proj.bias)
        if isinstance(self.pos_embed, nn.Parameter):
            nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def num_parameters(self, trunk_only: bool = False) -> int:
        """Parameter count; ``trunk_only`` leaves out the prediction head (the published sizes count the trunk)."""
        params = self.parameters() if not trunk_only else (
            p for name, p in self.named_parameters() if not name.startswith("head.")
        )
        return sum(p.numel() for p in params)

    def sample_prefix_len(self, batch_size: int, device=None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """AIM's prefix sampling: an int64 (batch_size,) tensor uniform in [1, N - 1]."""
        n = self.config.num_patches
        return torch.randint(1, n, (batch_size,), generator=generator).to(device or self.pos_embed.device)

    # ----------------------------------------------------------------------------------------------
    def forward_features(
        self, images: torch.Tensor, prefix_len: PrefixLen = None, is_causal: Optional[bool] = None
    ) -> torch.Tensor:
        """(B, C, H, W) images -> (B, N, dim) features after the final norm.

        ``is_causal=None`` uses the config's mask; False gives full attention (evaluation, probing).
        ``prefix_len`` (None, int or (B,) tensor) makes the first tokens of each image bidirectional.
        """
        cfg = self.config
        if images.dim() != 4 or images.shape[1:] != (cfg.in_chans, cfg.img_size, cfg.img_size):
            raise ValueError(
                f"CausalViT: images must be (B, {cfg.in_chans}, {cfg.img_size}, {cfg.img_size}), "
                f"got {tuple(images.shape)}"
            )
        x = self.patch_embed(images, self.pos_embed.to(images.dtype))
        for block in self.blocks:
            x = block(x, prefix_len=prefix_len, is_causal=is_causal)
        return self.norm(x)

    def forward(
        self, images: torch.Tensor, prefix_len: PrefixLen = None, targets: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """The pretraining loss (a scalar) for a batch of images.

        Row i of the features predicts patch i + block_size. With the pixel head the target is the patch's
        normalized pixels; with the token head it is ``targets[:, i + block_size]`` from the (B, N) token
        ids. In training with ``config.prefix`` on and no ``prefix_len`` given, a prefix is sampled per image
        (AIM); prefix patches are context, never targets. A ``PackedImages`` goes to ``forward_packed``.
        """
        from ..data.packing import PackedImages

        if isinstance(images, PackedImages):  # what a wrapped model (DDP, FSDP, compile) is called with
            return self.forward_packed(images, prefix_len=prefix_len, targets=targets)
        cfg = self.config
        if prefix_len is None and self.training and cfg.prefix and cfg.is_causal:
            prefix_len = self.sample_prefix_len(images.shape[0], images.device)
        x = self.forward_features(images, prefix_len=prefix_len)
        offset = cfg.block_size
        if cfg.head == "pixel":
            pred = self.head(x)
            return next_patch_pixel_loss(
                pred, images, patch_size=cfg.patch_size, offset=offset, prefix_len=prefix_len,
                norm_pix=cfg.norm_pix, backend=cfg.backend,
            )
        return self._token_loss(x, targets, prefix_len, offset)

    def forward_features_packed(self, packed, prefix_len: PrefixLen = None, is_causal: Optional[bool] = None
                                ) -> torch.Tensor:
        """A pack of images at their own sizes (``aimkern.PackedImages``, uint8 or float patches) -> (T, dim)
        features after the final norm, image s at rows [cu_seqlens[s], cu_seqlens[s + 1]).

        uint8 patches are normalized like ``model_input``; positions follow each image's grid (sin-cos from
        the coords, or the learned table bilinearly resized); attention is ``attention_varlen`` with each
        image's own mask. ``prefix_len`` (None: the pack's own; an int or an (S,) tensor) and ``is_causal``
        as in ``forward_features``. A square image at the config's size gets the rows ``forward_features``
        gives it alone (``aimkern.models.packed``)."""
        from .packed import forward_features_packed

        return forward_features_packed(self, packed, prefix_len=prefix_len, is_causal=is_causal)

    def forward_packed(self, packed, prefix_len: PrefixLen = None, targets: Optional[torch.Tensor] = None
                       ) -> torch.Tensor:
        """The pretraining loss (a scalar) of a pack: the mean over the counted targets of all its images.

        ``prefix_len``: None takes the pack's own (``pack_to_budget`` gives its padding sequence its length:
        no target); a pack without one, in training with ``config.prefix``, gets AIM's prefix sampled per
        image in [1, n_i - 1]. The pixel head's targets are the image's own normalized patches; the token
        head needs ``targets``, the (T,) token ids of the pack's patches."""
        from .packed import forward_packed

        return forward_packed(self, packed, prefix_len=prefix_len, targets=targets)

    def _token_loss(self, x: torch.Tensor, targets, prefix_len: PrefixLen, offset: int) -> torch.Tensor:
        cfg = self.config
        b, n, _ = x.shape
        if targets is None:
            raise ValueError("CausalViT: the token head needs targets, the (B, N) token ids of the patches")
        if not isinstance(targets, torch.Tensor) or tuple(targets.shape) != (b, n):
            raise ValueError(f"CausalViT: targets must be a (B, N) = ({b}, {n}) tensor of token ids")
        if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
            raise TypeError(f"CausalViT: targets must be integer token ids, got {targets.dtype} (a float would be "
                            "truncated)")
        ignore_index = -100
        tgt = targets[:, offset:].long()
        if prefix_len is not None:  # prefix patches are context: not counted, like the pixel head's
            counted = target_mask(b, n, offset, prefix_len, x.device)[:, offset:]
            tgt = tgt.masked_fill(~counted, ignore_index)
        h = self.head.features(x[:, : n - offset])
        # Sum over the counted targets / their number: the op's own "mean" bit for bit, and 0 (like the pixel
        # head) instead of 0 / 0 when the prefix covers every target.
        total = linear_cross_entropy(
            h, self.head.out.weight, tgt, linear_bias=self.head.out.bias, ignore_index=ignore_index,
            reduction="sum", backend=cfg.backend,
        )
        return total / (tgt != ignore_index).sum().clamp_min(1)

    def extra_repr(self) -> str:
        cfg = self.config
        return (
            f"img={cfg.img_size}, patch={cfg.patch_size}, N={cfg.num_patches}, causal={cfg.is_causal}, "
            f"block_size={cfg.block_size}, head={cfg.head}, params={self.num_parameters() / 1e6:.1f}M"
        )

    # ----------------------------------------------------------------------------------------------
    # Formats: thin forwarders to the layers that build on the model (aimkern.hooks says why they are
    # not imported here).
    @classmethod
    def from_checkpoint(cls, src, *, preset=None, strict: bool = True, **overrides) -> "CausalViT":
        """Load a checkpoint file or state dict of any layout: Apple's ml-aim AIMv1 / AIMv2, timm, transformers'
        ``Aimv2VisionModel`` or aimkern's own; the config is inferred from the shapes unless ``preset`` is
        given. See ``aimkern.checkpoints.load.from_checkpoint``."""
        return hooks.provided("CausalViT.from_checkpoint")(src, preset=preset, strict=strict, **overrides)

    def save_checkpoint(self, path, layout: str = "aimkern") -> str:
        """Write this model as ``layout`` ("aimkern" | "timm" | "hf" | "ml-aim"); returns the file written. See
        ``aimkern.checkpoints.load.save_checkpoint``."""
        return hooks.provided("CausalViT.save_checkpoint")(self, path, layout=layout)

    @classmethod
    def from_timm(cls, vit: nn.Module, **overrides) -> "CausalViT":
        """Convert timm's AIMv2 or class-token-free ViT, weights included (``aimkern.integrations.timm_convert``):
        ``forward_features(x, is_causal=False)`` then equals ``vit.forward_features(x)``."""
        return hooks.provided("CausalViT.from_timm")(vit, **overrides)

    def to_timm(self) -> nn.Module:
        """This trunk as timm's ``VisionTransformer`` (class_token=False, global_pool='avg'), weights included."""
        return hooks.provided("CausalViT.to_timm")(self)
