"""aimkern's modules, built on the fused ops (swap kernels through each module's ``backend``)."""
from .attention import Attention
from .block import Block, MlpBlock
from .heads import PredictionHead
from .mlp import Mlp, SwiGLU, make_mlp
from .norm import make_norm
from .patch_embed import PatchEmbed
from .pos_embed import sincos_pos_embed_2d

__all__ = [
    "Attention",
    "Block",
    "Mlp",
    "MlpBlock",
    "PatchEmbed",
    "PredictionHead",
    "SwiGLU",
    "make_mlp",
    "make_norm",
    "sincos_pos_embed_2d",
]
