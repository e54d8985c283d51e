"""ViTConfig: one small dataclass describing a causal ViT, and the named presets."""
from __future__ import annotations

import functools
import math
import warnings
from dataclasses import asdict, dataclass, fields, replace
from typing import Optional

from ..backends import BACKENDS

# The fields a trunk's weights fix, with its family (heads, eps): a checkpoint or a timm model sets them, an
# override may not, and two configs build the same trunk when their ``trunk()`` agree. The others (mask,
# prediction head, objective, backend) are free.
TRUNK_FIELDS = ("img_size", "patch_size", "in_chans", "dim", "depth", "num_heads", "mlp_ratio", "norm", "norm_eps",
                "mlp", "qkv_bias", "bias", "norm_bias", "patch_bias", "patch_norm", "pos_embed")
# Old field name -> new: accepted (with a DeprecationWarning) for one release. ``head_dim`` said "attention head
# width" (Attention.head_dim is dim // num_heads) where it meant the prediction head's width.
RENAMED = {"head_dim": "head_width"}


@dataclass
class ViTConfig:
    # --- input ---
    img_size: int = 224  # square input resolution in pixels (a multiple of patch_size)
    patch_size: int = 16  # P: each token is a P x P patch
    in_chans: int = 3  # image channels C
    # --- trunk ---
    dim: int = 768  # token width
    depth: int = 12  # number of transformer blocks
    num_heads: int = 12  # attention heads; head dim = dim // num_heads (a multiple of 8 in [16, 256])
    mlp_ratio: float = 4.0  # MLP hidden width = int(dim * mlp_ratio) (the gated width for SwiGLU)
    norm: str = "layernorm"  # "layernorm" | "rmsnorm"
    norm_eps: float = 1e-6  # epsilon of every norm
    mlp: str = "gelu"  # "gelu" | "swiglu"
    qkv_bias: bool = True  # bias on the qkv projection
    bias: bool = True  # bias on every other linear (attention output, MLPs, heads) and the norms
    norm_bias: Optional[bool] = None  # bias on the LayerNorms; None follows `bias` (AIMv1: norms only)
    patch_bias: Optional[bool] = None  # bias on the patch projection; None follows `bias` (AIMv2 has one)
    patch_norm: bool = False  # a norm right after the patch projection (AIMv2)
    pos_embed: str = "learned"  # "learned" | "sincos" (fixed 2-D sine-cosine, AIMv1 / MAE)
    # --- attention mask (raster order; see aimkern.attention) ---
    is_causal: bool = True  # causal pretraining; forward_features(is_causal=False) gives full attention
    block_size: int = 1  # tokens per causal block; the next-patch offset too
    prefix: bool = True  # AIM prefix sampling in training: a random bidirectional prefix per image
    # --- prediction head and objective ---
    head: str = "pixel"  # "pixel" (normalized next-patch pixels) | "token" (next patch's token id)
    head_depth: int = 0  # MLP-only residual blocks in the head (AIMv1: 12)
    head_width: int = 0  # width of those blocks; 0 means the trunk's dim (AIMv1: 2048). Was head_dim.
    vocab_size: int = 8192  # token head: number of token ids
    norm_pix: bool = True  # pixel head: regress per-patch standardized pixels (MAE / AIM)
    # --- execution ---
    backend: str = "auto"  # op backend: "auto" (measured: aimkern.dispatch) | "triton" | "reference"

    def __post_init__(self) -> None:
        """Check every field's type and range, then how they fit together; a ValueError names the field."""

        def bad(msg):
            raise ValueError(f"ViTConfig: {msg}")

        def is_int(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        for name, low in (("img_size", 1), ("patch_size", 1), ("in_chans", 1), ("dim", 1), ("depth", 1),
                          ("num_heads", 1), ("block_size", 1), ("head_depth", 0), ("head_width", 0),
                          ("vocab_size", 2)):
            value = getattr(self, name)
            if not is_int(value) or value < low:
                bad(f"{name} must be an int >= {low}, got {value!r}")
        for name in ("qkv_bias", "bias", "patch_norm", "is_causal", "prefix", "norm_pix"):
            if not isinstance(getattr(self, name), bool):
                bad(f"{name} must be a bool, got {getattr(self, name)!r}")
        for name in ("patch_bias", "norm_bias"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), bool):
                bad(f"{name} must be None or a bool, got {getattr(self, name)!r}")
        for name in ("mlp_ratio", "norm_eps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
                bad(f"{name} must be a finite float > 0, got {value!r}")
        for name, allowed in (
            ("norm", ("layernorm", "rmsnorm")),
            ("mlp", ("gelu", "swiglu")),
            ("pos_embed", ("learned", "sincos")),
            ("head", ("pixel", "token")),
            ("backend", BACKENDS),
        ):
            if getattr(self, name) not in allowed:
                bad(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        # how the fields fit together
        if self.img_size % self.patch_size:
            bad(f"img_size={self.img_size} must be a multiple of patch_size={self.patch_size}")
        if self.dim % self.num_heads:
            bad(f"dim={self.dim} must be divisible by num_heads={self.num_heads}")
        per_head = self.dim // self.num_heads  # an attention head's width (Attention.head_dim)
        if per_head % 8 or not 16 <= per_head <= 256:
            bad(f"head dim dim // num_heads = {per_head} must be a multiple of 8 in [16, 256]")
        if self.mlp_hidden_dim < 1:
            bad(f"mlp_ratio={self.mlp_ratio} leaves no MLP width (int(dim * mlp_ratio) = {self.mlp_hidden_dim})")
        if self.pos_embed == "sincos" and self.dim % 4:
            bad(f"pos_embed='sincos' needs dim divisible by 4, got {self.dim}")
        if self.norm == "rmsnorm" and self.norm_bias:
            bad("norm_bias=True needs norm='layernorm' (RMSNorm has no bias)")
        if self.block_size >= self.num_patches:
            bad(f"block_size={self.block_size} leaves no next patch to predict among N={self.num_patches}")

    @property
    def has_patch_bias(self) -> bool:
        return self.bias if self.patch_bias is None else self.patch_bias

    @property
    def has_norm_bias(self) -> bool:
        """Whether the norms carry a bias (never for RMSNorm)."""
        if self.norm == "rmsnorm":
            return False
        return self.bias if self.norm_bias is None else self.norm_bias

    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def mlp_hidden_dim(self) -> int:
        return int(self.dim * self.mlp_ratio)

    def trunk(self) -> dict:
        """The ``TRUNK_FIELDS`` with the optional biases resolved (``norm_bias`` None follows ``bias``, and an
        RMSNorm has none): equal for two configs exactly when they build the same trunk."""
        out = {f: getattr(self, f) for f in TRUNK_FIELDS}
        return dict(out, norm_bias=self.has_norm_bias, patch_bias=self.has_patch_bias)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ViTConfig":
        """The config of a ``to_dict()`` (deprecated field names, e.g. an older checkpoint's, are renamed)."""
        d = current_names(d, "ViTConfig.from_dict")
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"ViTConfig.from_dict: unknown fields {sorted(unknown)}")
        return cls(**d)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "ViTConfig":
        """A named preset (see ``PRESETS``), with optional field overrides."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return replace(PRESETS[name], **current_names(overrides, "ViTConfig.from_preset"))


def current_names(values: dict, where: str = "ViTConfig") -> dict:
    """``values`` (ViTConfig fields by name) with each deprecated name (``RENAMED``) replaced by its new one, with
    a DeprecationWarning; a ValueError when both names are given with different values."""
    values = dict(values)
    for old, new in RENAMED.items():
        if old in values:
            value = values.pop(old)
            warnings.warn(f"{where}: {old}= is deprecated, renamed {new}= (the prediction head's width; "
                          f"{old} goes in the next release)", DeprecationWarning, stacklevel=3)
            if values.get(new, value) != value:
                raise ValueError(f"{where}: {old}={value!r} and {new}={values[new]!r} disagree; {old} is the "
                                 f"deprecated name of {new}: pass {new} only")
            values[new] = value
    return values


def _accept_renamed(init):
    """ViTConfig's __init__, also taking the deprecated names. A new name at 0, its default, yields to the old
    one: ``dataclasses.replace(cfg, head_dim=w)`` passes cfg's own head_width beside it (a set, different width
    is a ValueError there: replace with head_width)."""

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        for old, new in RENAMED.items():
            if old in kwargs and kwargs.get(new) == 0:
                del kwargs[new]
        init(self, *args, **current_names(kwargs))

    return __init__


def _renamed_property(old: str, new: str) -> property:
    def warn():
        warnings.warn(f"ViTConfig.{old} is deprecated, renamed {new} (the prediction head's width; {old} goes in "
                      "the next release)", DeprecationWarning, stacklevel=3)

    def get(self):
        warn()
        return getattr(self, new)

    def set_(self, value):
        warn()
        setattr(self, new, value)

    return property(get, set_, doc=f"Deprecated name of ``{new}``.")


ViTConfig.__init__ = _accept_renamed(ViTConfig.__init__)
for _old, _new in RENAMED.items():
    setattr(ViTConfig, _old, _renamed_property(_old, _new))


def _vit(**kw) -> ViTConfig:
    # Classic ViT trunks (timm's names), without class token, learned positions, biases everywhere.
    return ViTConfig(**kw)


def mlp_ratio_for(dim: int, hidden: int) -> float:
    """The smallest float ratio with int(dim * ratio) == hidden (hidden / dim itself can round down by one)."""
    ratio = hidden / dim
    while int(dim * ratio) < hidden:
        ratio = math.nextafter(ratio, math.inf)
    return ratio


def _aim_v1(dim: int, depth: int, num_heads: int) -> ViTConfig:
    # AIMv1 (El-Nouby et al., 2024), as Apple's ml-aim ``aim-v1/aim/v1/torch``: patch 14 at 224 px, a Conv2d
    # patch projection with a bias followed by a LayerNorm, every LayerNorm with a bias (eps 1e-6), no bias
    # on the linear layers, sin-cos positions computed (not stored), a final norm (ml-aim's post_trunk_norm);
    # prefix-causal pretraining with an MLP-only pixel head of 12 residual blocks at width 2048.
    return ViTConfig(
        img_size=224, patch_size=14, dim=dim, depth=depth, num_heads=num_heads, qkv_bias=False, bias=False,
        norm_bias=True, patch_bias=True, patch_norm=True, pos_embed="sincos", head_depth=12, head_width=2048,
    )


def _aim_v2(dim: int, hidden: int, num_heads: int, img_size: int = 224, pos_embed: str = "learned") -> ViTConfig:
    # AIMv2 (Fini et al., 2024), as ml-aim's ``aim-v2/aim/v2/torch``: 24 blocks, patch 14, RMSNorm (eps 1e-5)
    # after the patch projection (which has a bias) and in every block, SwiGLU, no other bias, learned
    # positions (the native-resolution model: sin-cos), a final norm.
    return ViTConfig(
        img_size=img_size, patch_size=14, dim=dim, depth=24, num_heads=num_heads,
        mlp_ratio=mlp_ratio_for(dim, hidden), norm="rmsnorm", norm_eps=1e-5, mlp="swiglu", qkv_bias=False,
        bias=False, patch_bias=True, patch_norm=True, pos_embed=pos_embed,
    )


# AIMv2 trunks by size: (dim, SwiGLU hidden width, heads).
_AIM_V2_SIZES = {"large": (1024, 2816, 8), "huge": (1536, 4096, 12), "1b": (2048, 5632, 16), "3b": (3072, 8192, 24)}
PRESETS = {
    # A toy for CPUs: 32 px images of 4 px patches (N = 64), trains in seconds.
    "vit-tiny": _vit(img_size=32, patch_size=4, dim=64, depth=4, num_heads=4),
    "vit-s16": _vit(dim=384, depth=12, num_heads=6),
    "vit-b16": _vit(dim=768, depth=12, num_heads=12),
    "vit-l16": _vit(dim=1024, depth=24, num_heads=16),
    "vit-h14": _vit(patch_size=14, dim=1280, depth=32, num_heads=16),
    "aim-600m": _aim_v1(1536, 24, 12),
    "aim-1b": _aim_v1(2048, 24, 16),
    "aim-3b": _aim_v1(3072, 24, 24),
    "aim-7b": _aim_v1(4096, 32, 32),
}
# AIMv2: aimv2-SIZE (224 px), aimv2-SIZE-336, aimv2-SIZE-448, and the native-resolution aimv2-large-native
# (sin-cos positions; 224 px by default, any multiple of 14 through img_size=...).
for _size, (_dim, _hidden, _heads) in _AIM_V2_SIZES.items():
    for _img in (224, 336, 448):
        PRESETS[f"aimv2-{_size}" + ("" if _img == 224 else f"-{_img}")] = _aim_v2(_dim, _hidden, _heads, _img)
PRESETS["aimv2-large-native"] = _aim_v2(1024, 2816, 8, pos_embed="sincos")
