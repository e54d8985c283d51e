"""`aimkern.patch_timm`: run a timm VisionTransformer (AIMv2 included) on aimkern's attention, weights kept.

Every timm ``Attention`` module of the model is replaced, in place, by a ``TimmAttention`` that adopts the
original's submodules under the same names (``qkv``, ``q_norm``, ``k_norm``, ``norm``, ``gate``, ``proj``,
dropouts), so parameters are the same objects, ``state_dict`` keys are unchanged and pretrained
checkpoints still load. Only the attention core changes, and it copies nothing:

* q_norm and k_norm are ``nn.Identity`` (the common case): the (B, N, 3, H, D) view of the qkv linear's
  output goes to ``attention_qkvpacked`` as is. Its output is (B, N, H, D) memory, so the reshape before
  the output projection is free, and its backward writes dq, dk, dv into one packed gradient that is the
  qkv linear's output gradient as it stands (no stack, no permute copy).
* otherwise q and k are normalized views and ``aimkern.attention`` runs on them; the views are taken along
  the packed dim, so autograd's stack of dq, dk, dv lands in the linear's layout (one copy, not two).

The mask applies to the token sequence as timm orders it: class / register tokens (``num_prefix_tokens``)
first, then patches in raster order. ``prefix_len=model.num_prefix_tokens`` lets every token see them.

Host-repo tools:

* FX (timm's feature extraction, torchvision's ``create_feature_extractor``): ``TimmAttention`` is
  registered as a timm leaf module, so timm's tracer records one call per block and the mask options are
  read when the graph runs. A plain ``torch.fx.symbolic_trace`` traces through instead: the kernel call is
  one ``torch.fx.wrap``-ed function node, with the mask options of trace time baked in.
* TorchScript: ``torch.jit.script(model)`` compiles the block; the kernel call itself is a
  ``@torch.jit.ignore`` function, i.e. a call back into Python. The scripted model therefore runs in the
  process that scripted it but cannot be saved with ``torch.jit.save`` (export through ``torch.export`` or
  save the eager model's state_dict instead).
"""
# No `from __future__ import annotations`: TorchScript reads the kernel calls' annotations as real types.
from typing import Optional, Union

import torch
import torch.nn as nn

from ..checks import check_backend_name
from ..functional import attention, attention_qkvpacked
from ..ops.attention import AttentionParams


def _timm_attention_classes() -> tuple:
    """timm's plain multi-head self-attention class(es): timm.layers.Attention (timm >= 1.0.2x) and the one
    vision_transformer uses (older releases defined it there)."""
    classes = []
    try:
        from timm.layers import Attention as layers_attention

        classes.append(layers_attention)
    except ImportError:
        pass
    try:
        from timm.models.vision_transformer import Attention as vit_attention

        classes.append(vit_attention)
    except ImportError:
        pass
    if not classes:
        raise ImportError("patch_timm: timm is not installed (pip install timm)")
    return tuple(dict.fromkeys(classes))


def _check_call(attn_mask: Optional[torch.Tensor], dropout_p: float) -> None:
    """Runtime checks of one call (run when the graph runs, so FX and TorchScript keep them)."""
    if attn_mask is not None:
        raise ValueError(
            "patch_timm: an explicit attn_mask is not supported by aimkern attention; express the mask "
            "with patch_timm(model, is_causal=..., block_size=..., prefix_len=...) instead"
        )
    if dropout_p > 0:
        raise ValueError(
            f"patch_timm: attention dropout (p={dropout_p}) is not supported by aimkern attention; "
            "build the model with attn_drop_rate=0 or use eval()"
        )


# The two kernel calls below are module-level functions so that host tools see them as one opaque call:
# torch.fx.wrap makes a symbolic trace record a call_function node instead of tracing into the op's Python
# checks (which need real tensors), and torch.jit.ignore makes TorchScript call back into Python for them.
# Their arguments are plain values, so attn_mask / is_causal may be FX proxies at trace time.
@torch.fx.wrap
@torch.jit.ignore
def timm_attention_packed(
    qkv: torch.Tensor, attn_mask: Optional[torch.Tensor], call_is_causal: bool, dropout_p: float, is_causal: bool,
    block_size: int, prefix_len: Optional[Union[int, torch.Tensor]], scale: float, backend: str,
) -> torch.Tensor:
    """qkv (B, N, 3, H, D), any strides -> (B, N, H, D) contiguous (Triton); the copy-free path."""
    _check_call(attn_mask, dropout_p)
    return attention_qkvpacked(
        qkv, is_causal=is_causal or bool(call_is_causal), block_size=block_size, prefix_len=prefix_len,
        scale=scale, backend=backend,
    )


@torch.fx.wrap
@torch.jit.ignore
def timm_attention_unpacked(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Optional[torch.Tensor], call_is_causal: bool,
    dropout_p: float, is_causal: bool, block_size: int, prefix_len: Optional[Union[int, torch.Tensor]],
    scale: float, backend: str,
) -> torch.Tensor:
    """q, k, v (B, H, N, D), any strides -> (B, N, H, D) (contiguous on Triton); for normalized q / k."""
    _check_call(attn_mask, dropout_p)
    o = attention(
        q, k, v, is_causal=is_causal or bool(call_is_causal), block_size=block_size, prefix_len=prefix_len,
        scale=scale, backend=backend,
    )
    return o.transpose(1, 2)


def _is_identity(module: Optional[nn.Module]) -> bool:
    return module is None or type(module) is nn.Identity


class TimmAttention(nn.Module):
    """timm's ``Attention`` forward with aimkern's attention as its core; built from an existing module.

    Mask options (``is_causal``, ``block_size``, ``prefix_len``, ``backend``) are attributes: reassign them
    (or call ``patch_timm`` again) to change the mask, e.g. a new per-sample ``prefix_len`` each batch.
    ``packed`` (q_norm and k_norm are Identity: the copy-free packed op) is decided when the module is
    built or re-patched; call ``patch_timm`` again after replacing q_norm / k_norm.
    """

    def __init__(self, src: nn.Module, *, is_causal: bool, block_size: int, prefix_len, backend: str):
        super().__init__()
        self.num_heads = src.num_heads
        self.head_dim = src.head_dim
        self.attn_dim = getattr(src, "attn_dim", src.num_heads * src.head_dim)
        self.scale = float(getattr(src, "scale", self.head_dim**-0.5))
        for name, child in src.named_children():  # the same module objects: weights kept, names unchanged
            self.add_module(name, child)
        for name, param in src.named_parameters(recurse=False):
            self.register_parameter(name, param)
        # Older timm releases lack some of these; parameter-free stand-ins keep one scriptable forward.
        for name, default in (("q_norm", nn.Identity), ("k_norm", nn.Identity), ("norm", nn.Identity),
                              ("attn_drop", nn.Dropout), ("proj_drop", nn.Dropout)):
            if not hasattr(self, name):
                self.add_module(name, default())
        if not hasattr(self, "gate"):
            self.gate = None
        self.packed = _is_identity(self.q_norm) and _is_identity(self.k_norm)
        self.is_causal, self.block_size, self.prefix_len, self.backend = is_causal, block_size, prefix_len, backend

    def forward(
        self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False
    ) -> torch.Tensor:
        """x (B, N, C) -> (B, N, C_out). ``is_causal=True`` from timm's call adds token causality; an
        ``attn_mask`` raises (the mask is set with ``patch_timm``'s options)."""
        B, N, C = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim)  # a view of the linear's output
        dropout_p = self.attn_drop.p if self.training else 0.0
        if self.packed:
            o = timm_attention_packed(qkv, attn_mask, is_causal, dropout_p, self.is_causal, self.block_size,
                                      self.prefix_len, self.scale, self.backend)
        else:
            q, k, v = qkv.unbind(2)  # (B, N, H, D) views; the backward's stack of dq, dk, dv is then packed
            q, k = self.q_norm(q.transpose(1, 2)), self.k_norm(k.transpose(1, 2))
            o = timm_attention_unpacked(q, k, v.transpose(1, 2), attn_mask, is_causal, dropout_p, self.is_causal,
                                        self.block_size, self.prefix_len, self.scale, self.backend)
        x = o.reshape(B, N, self.attn_dim)  # (B, N, H, D) memory from the kernels: a free reshape
        x = self.norm(x)
        if gate is not None:
            x = x * gate
        x = self.proj(x)
        x = self.proj_drop(x)
        return x

    def extra_repr(self) -> str:
        prefix = "tensor" if torch.is_tensor(self.prefix_len) else self.prefix_len
        return (f"heads={self.num_heads}, head_dim={self.head_dim}, is_causal={self.is_causal}, "
                f"block_size={self.block_size}, prefix_len={prefix}, backend={self.backend!r}, packed={self.packed}")


def _register_fx_leaf() -> None:
    """Make timm's FX tracer (feature extraction, timm's own tests) keep TimmAttention as one leaf call."""
    try:
        from timm.layers import register_notrace_module
    except ImportError:  # older timm: the registry lived in timm.models
        from timm.models import register_notrace_module
    register_notrace_module(TimmAttention)


def _check_options(is_causal, block_size, prefix_len, backend, where: str = "patch_timm") -> None:
    AttentionParams(is_causal=is_causal, block_size=block_size).check(where)
    if prefix_len is not None and (isinstance(prefix_len, bool) or not isinstance(prefix_len, (int, torch.Tensor))):
        raise TypeError(
            f"{where}: prefix_len must be None, an int or a (B,) int tensor, got {type(prefix_len).__name__}"
        )
    if isinstance(prefix_len, int) and prefix_len < 0:
        raise ValueError(f"{where}: prefix_len must be >= 0, got {prefix_len}")
    check_backend_name(backend, where)


def patch_timm(
    model: nn.Module,
    is_causal: bool = False,
    block_size: int = 1,
    prefix_len: Union[None, int, torch.Tensor] = None,
    backend: str = "auto",
) -> nn.Module:
    """Swap every timm ``Attention`` in ``model`` for aimkern's, in place; returns ``model``.

    Args:
        model: a timm model whose blocks use ``timm.layers.Attention`` (VisionTransformer, AIMv2, ...), or a
            wrapper of one (``features_only=True`` models).
        is_causal, block_size, prefix_len: the mask, as in ``aimkern.attention``, over the model's token
            sequence (class / register tokens first). A prefix_len tensor must have shape (B,) of each batch.
        backend: "auto" | "triton" | "reference", as in ``aimkern.attention``.

    Already patched modules get the new options, so calling it again changes the mask. Raises ValueError
    when the model has no timm attention module to swap.
    """
    _check_options(is_causal, block_size, prefix_len, backend)
    classes = _timm_attention_classes()
    _register_fx_leaf()
    opts = dict(is_causal=is_causal, block_size=block_size, prefix_len=prefix_len, backend=backend)
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, TimmAttention):
                for key, value in opts.items():
                    setattr(child, key, value)
                child.packed = _is_identity(child.q_norm) and _is_identity(child.k_norm)
                swapped += 1
            elif type(child) in classes:  # exact type: subclasses (rope, ...) change the forward we mirror
                setattr(parent, name, TimmAttention(child, **opts))
                swapped += 1
    if swapped == 0:
        raise ValueError(
            f"patch_timm: found no timm Attention module in {type(model).__name__}; expected a timm "
            "VisionTransformer-style model (blocks with timm.layers.Attention)"
        )
    return model
