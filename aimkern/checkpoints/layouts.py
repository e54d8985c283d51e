"""Key layouts of the public AIM / ViT checkpoints, and the mapping of each onto CausalViT's names.

CausalViT's trunk names (timm's)::

    patch_embed.proj.{weight,bias}  patch_embed.norm.{weight,bias}  pos_embed (1, N, D; learned only)
    blocks.I.norm1 / norm2          blocks.I.attn.qkv / attn.proj   (qkv rows: q, k, v)
    blocks.I.mlp.fc1 / fc2 (GELU)   blocks.I.mlp.fc1_g / fc1_x / fc2 (SwiGLU: fc2(silu(fc1_g x) * fc1_x x))
    norm                            head.* (aimkern's pretraining head; in no other layout)

=========== ======================================================================================
layout      source names (I: block index; P: weight or bias)
=========== ======================================================================================
ml-aim-v1   preprocessor.patchifier.{proj,norm}.P, trunk.blocks.I.norm_1 / norm_2, attn.qkv / proj,
            mlp.fc1 / fc2, trunk.post_trunk_norm (Apple's ml-aim ``aim-v1``; sin-cos positions not stored)
ml-aim-v2   as v1 with SwiGLU mlp.fc1 (gate) / fc3 (up) / fc2 (down), preprocessor.pos_embed (absent in
            the native-resolution model); the LiT model's ``image_encoder.`` prefix is dropped
timm        CausalViT's own names (timm ``VisionTransformer`` / ``aimv2_*``); ``head.*`` is timm's classifier
hf          transformers ``Aimv2VisionModel``: embeddings.patch_embed / rms_norm / position_embedding (N, D),
            encoder.layers.I.rms_norm1 / rms_norm2, attention.{q,k,v}_proj (split) / out_proj,
            ffn.gate_proj / up_proj / down_proj, rms_norm; optional prefix ``vision_model.``
aimkern     CausalViT's names, head included, with its ViTConfig stored beside the weights
=========== ======================================================================================
"""
from __future__ import annotations

import re
from typing import Dict, List, Tuple

import torch

LAYOUTS = ("ml-aim-v1", "ml-aim-v2", "timm", "hf", "aimkern")
SAVE_LAYOUTS = ("aimkern", "timm", "hf", "ml-aim")

_FIELDS = {"i": r"(?P<i>\d+)", "p": r"(?P<p>weight|bias)"}


class Rule:
    """One name pattern in a source layout and its CausalViT counterpart, e.g.
    ``Rule("trunk.blocks.{i}.norm_1.{p}", "blocks.{i}.norm1.{p}")``; usable in both directions."""

    def __init__(self, theirs: str, ours: str):
        self.theirs, self.ours = theirs, ours
        self._theirs, self._ours = self._compile(theirs), self._compile(ours)

    @staticmethod
    def _compile(pattern: str) -> re.Pattern:
        out = re.escape(pattern)
        for name, rx in _FIELDS.items():
            out = out.replace(re.escape("{" + name + "}"), rx)
        return re.compile(out + "$")

    def to_ours(self, key: str):
        m = self._theirs.match(key)
        return self.ours.format(**m.groupdict()) if m else None

    def to_theirs(self, key: str):
        m = self._ours.match(key)
        return self.theirs.format(**m.groupdict()) if m else None


def _ml_aim_rules(swiglu: bool) -> List[Rule]:
    mlp = [("fc1", "fc1_g"), ("fc3", "fc1_x"), ("fc2", "fc2")] if swiglu else [("fc1", "fc1"), ("fc2", "fc2")]
    return [
        Rule("preprocessor.patchifier.proj.{p}", "patch_embed.proj.{p}"),
        Rule("preprocessor.patchifier.norm.{p}", "patch_embed.norm.{p}"),
        Rule("preprocessor.pos_embed", "pos_embed"),
        Rule("trunk.blocks.{i}.norm_1.{p}", "blocks.{i}.norm1.{p}"),
        Rule("trunk.blocks.{i}.norm_2.{p}", "blocks.{i}.norm2.{p}"),
        Rule("trunk.blocks.{i}.attn.qkv.{p}", "blocks.{i}.attn.qkv.{p}"),
        Rule("trunk.blocks.{i}.attn.proj.{p}", "blocks.{i}.attn.proj.{p}"),
        *[Rule(f"trunk.blocks.{{i}}.mlp.{a}.{{p}}", f"blocks.{{i}}.mlp.{b}.{{p}}") for a, b in mlp],
        Rule("trunk.post_trunk_norm.{p}", "norm.{p}"),
    ]


_TIMM_RULES = [
    Rule("patch_embed.proj.{p}", "patch_embed.proj.{p}"),
    Rule("patch_embed.norm.{p}", "patch_embed.norm.{p}"),
    Rule("pos_embed", "pos_embed"),
    *[Rule(f"blocks.{{i}}.{m}.{{p}}", f"blocks.{{i}}.{m}.{{p}}")
      for m in ("norm1", "norm2", "attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "mlp.fc1_g", "mlp.fc1_x")],
    Rule("norm.{p}", "norm.{p}"),
]

# transformers' q/k/v projections are split; they are packed into this intermediate name first.
_HF_QKV = "encoder.layers.{i}.attention.qkv.{p}"
_HF_POS = "embeddings.position_embedding.weight"
_HF_RULES = [
    Rule("embeddings.patch_embed.{p}", "patch_embed.proj.{p}"),
    Rule("embeddings.rms_norm.{p}", "patch_embed.norm.{p}"),
    Rule(_HF_POS, "pos_embed"),
    Rule("encoder.layers.{i}.rms_norm1.{p}", "blocks.{i}.norm1.{p}"),
    Rule("encoder.layers.{i}.rms_norm2.{p}", "blocks.{i}.norm2.{p}"),
    Rule(_HF_QKV, "blocks.{i}.attn.qkv.{p}"),
    Rule("encoder.layers.{i}.attention.out_proj.{p}", "blocks.{i}.attn.proj.{p}"),
    Rule("encoder.layers.{i}.ffn.gate_proj.{p}", "blocks.{i}.mlp.fc1_g.{p}"),
    Rule("encoder.layers.{i}.ffn.up_proj.{p}", "blocks.{i}.mlp.fc1_x.{p}"),
    Rule("encoder.layers.{i}.ffn.down_proj.{p}", "blocks.{i}.mlp.fc2.{p}"),
    Rule("rms_norm.{p}", "norm.{p}"),
]
_HF_SPLIT = re.compile(r"encoder\.layers\.(\d+)\.attention\.([qkv])_proj\.(weight|bias)$")


def rules(layout: str, swiglu: bool = False) -> List[Rule]:
    if layout == "ml-aim-v1":
        return _ml_aim_rules(False)
    if layout == "ml-aim-v2":
        return _ml_aim_rules(True)
    if layout == "timm":
        return _TIMM_RULES
    if layout == "hf":
        return _HF_RULES
    raise ValueError(f"layout must be one of {LAYOUTS[:-1]}, got {layout!r}")


def _pack_hf_qkv(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Concatenate each block's q_proj, k_proj, v_proj (in that order) into one packed qkv entry. A block
    with only some of the three keeps them under their own names (then reported as unmapped)."""
    out, groups = {}, {}
    for key, value in state.items():
        m = _HF_SPLIT.match(key)
        if m:
            groups.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = (key, value)
        else:
            out[key] = value
    for (i, p), parts in groups.items():
        if set(parts) == {"q", "k", "v"}:
            out[_HF_QKV.format(i=i, p=p)] = torch.cat([parts[c][1] for c in "qkv"], dim=0)
        else:
            out.update(dict(parts.values()))
    return out


def to_causal_vit(state: Dict[str, torch.Tensor], layout: str) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """(CausalViT-named state, source keys that map to nothing) of a ``layout`` state dict."""
    if layout == "aimkern":
        return dict(state), []
    if layout.startswith("ml-aim"):  # the LiT model's vision encoder (its text tower stays unmapped)
        state = {k[len("image_encoder."):] if k.startswith("image_encoder.") else k: v for k, v in state.items()}
    if layout == "hf":
        state = {k[len("vision_model."):] if k.startswith("vision_model.") else k: v for k, v in state.items()}
        state = _pack_hf_qkv(state)
    table = rules(layout)
    mapped, unmapped = {}, []
    for key, value in state.items():
        ours = next((n for n in (r.to_ours(key) for r in table) if n is not None), None)
        if ours is None:
            unmapped.append(key)
            continue
        if layout == "hf" and key == _HF_POS:
            value = value.reshape(1, *value.shape)  # nn.Embedding (N, D) -> (1, N, D)
        mapped[ours] = value
    return mapped, sorted(unmapped)


def from_causal_vit(state: Dict[str, torch.Tensor], layout: str, swiglu: bool) -> Dict[str, torch.Tensor]:
    """A CausalViT trunk state (no ``head.*``) under ``layout``'s names; a key with no place is a ValueError."""
    if layout == "ml-aim":
        layout = "ml-aim-v2" if swiglu else "ml-aim-v1"
    table = rules(layout)
    out, homeless = {}, []
    for key, value in state.items():
        theirs = next((n for n in (r.to_theirs(key) for r in table) if n is not None), None)
        if theirs is None:
            homeless.append(key)
            continue
        if layout == "hf" and theirs == _HF_POS:
            value = value.reshape(value.shape[-2], value.shape[-1])
        if layout == "hf" and ".attention.qkv." in theirs:
            for c, part in zip("qkv", value.chunk(3, dim=0)):
                out[theirs.replace(".qkv.", f".{c}_proj.")] = part
            continue
        out[theirs] = value
    if homeless:
        raise ValueError(f"save_checkpoint: layout={layout!r} has no place for {sorted(homeless)}")
    return out
