"""The public ops: ``attention``, ``attention_qkvpacked``, ``attention_varlen``, ``attention_varlen_qkvpacked``,
``patch_embed``, ``linear_cross_entropy``, ``next_patch_pixel_loss`` and ``next_patch_pixel_loss_varlen``
(re-exported as ``aimkern.<op>``).

Each is a short function that gathers its tensors (in its spec's order) and its frozen params dataclass and
hands them to ``run``, the one preamble of every op, driven by the op's spec (aimkern/specs/):

    check the first tensor -> autocast (the GEMM-like ops) -> the path: measured dispatch, the Triton entry or
    the reference (``backend=``, ``AIMKERN_DISPATCH``) -> the spec's check and normalization for that path
    -> call the path with (*tensors, params)

A new op adds a spec and a function here of a few lines; nothing of the preamble is copied.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from .checks import check_backend_name, check_tensor
from .dispatch.core import select
from .dispatch.environment import mode as dispatch_mode
from .ops._launch import interpreting
from .ops.attention import AttentionParams, attention_qkvpacked_triton, unpack
from .ops.attention_varlen import VarlenAttentionParams, attention_varlen_qkvpacked_triton
from .ops.attention_varlen import unpack as unpack_varlen
from .ops.cross_entropy import CrossEntropyParams
from .ops.patch_embed import PatchEmbedParams
from .ops.pixel_loss import PixelLossParams
from .ops.pixel_loss_varlen import PixelLossVarlenParams
from .specs import OpSpec, get_spec

ATTENTION, PATCH_EMBED = get_spec("attention"), get_spec("patch_embed")
CROSS_ENTROPY, PIXEL_LOSS = get_spec("linear_cross_entropy"), get_spec("next_patch_pixel_loss")
ATTENTION_VARLEN, PIXEL_LOSS_VARLEN = get_spec("attention_varlen"), get_spec("next_patch_pixel_loss_varlen")
OP_PACKED, OP_VARLEN_PACKED = "attention_qkvpacked", "attention_varlen_qkvpacked"

__all__ = ["attention", "attention_qkvpacked", "attention_varlen", "attention_varlen_qkvpacked",
           "linear_cross_entropy", "next_patch_pixel_loss", "next_patch_pixel_loss_varlen", "patch_embed", "run"]


# ------------------------------------------------------------------------------------------ the preamble
def run(spec: OpSpec, tensors: tuple, params, backend: str):
    """Check ``tensors`` (the spec's order, None where absent) and ``params`` for ``backend``, pick the path
    and call it: the one body of every public op."""
    check_tensor(tensors[0], spec.tensor_args[0], spec.name)
    tensors = autocast_inputs(spec, tensors)
    path, tensors, params = checked(spec, tensors, params, backend, spec.name)
    if path == "measured":
        return select(spec, tensors, params).fn(*tensors, params)
    if path == "reference":
        return spec.reference(*tensors, params)
    return spec.triton(*tensors, params)


def checked(spec: OpSpec, tensors: tuple, params, backend: str, op: str) -> tuple:
    """(path, tensors, params) of a call after every check: path "measured" (``aimkern.dispatch`` chooses;
    the inputs are checked as for the reference, which takes the most dtypes, and each candidate says what
    it supports), "triton" or "reference". ``op`` names the public function in the messages."""
    check_backend_name(backend, op)
    ref = tensors[0]
    if backend == "auto":
        if dispatch_mode() == "measured":
            path = "measured"
        else:  # AIMKERN_DISPATCH=fixed: Triton on CUDA, the reference elsewhere and where only it applies
            use_ref = not ref.is_cuda or (spec.needs_reference is not None and spec.needs_reference(tensors))
            path = "reference" if use_ref else "triton"
    elif backend == "triton" and not ref.is_cuda and not interpreting():
        raise ValueError(
            f"{op}: backend='triton' got tensors on {ref.device}; Triton kernels run on CUDA tensors, or on "
            "CPU tensors under Triton's interpreter (set TRITON_INTERPRET=1 before importing aimkern)"
        )
    else:
        path = backend
    tensors, params = spec.check(tensors, params, "reference" if path == "measured" else path, op)
    return path, tensors, params


def autocast_inputs(spec: OpSpec, tensors: tuple) -> tuple:
    """``tensors`` with those the spec casts (``spec.autocast``: the GEMM-like ops' floating inputs) in the
    autocast dtype when autocast is on for their device, as F.linear and SDPA do.

    Custom ops are invisible to autocast, so the GEMM-like ops (attention, patch_embed,
    linear_cross_entropy) apply its rule themselves: under ``torch.autocast("cuda", torch.bfloat16)``
    fp32 images and weights reach the kernel as bf16 instead of running an fp32 GEMM. Like autocast,
    float64 is left alone; targets, prefix_len and non-tensors (None) pass through.
    """
    ref = tensors[0]
    if not spec.autocast or ref.device.type not in ("cuda", "cpu") or not torch.is_autocast_enabled(ref.device.type):
        return tensors
    dtype = torch.get_autocast_dtype(ref.device.type)
    cast = (torch.float32, torch.float16, torch.bfloat16)
    return tuple(t.to(dtype) if i in spec.autocast and isinstance(t, torch.Tensor) and t.dtype in cast else t
                 for i, t in enumerate(tensors))


# -------------------------------------------------------------------------------------------- the ops
def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    is_causal: bool = False,
    block_size: int = 1,
    prefix_len: Union[None, int, torch.Tensor] = None,
    scale: Optional[float] = None,
    backend: str = "auto",
    deterministic: bool = True,
) -> torch.Tensor:
    """Scaled dot-product attention with AIM's masks; a drop-in for ``F.scaled_dot_product_attention``.

    Args:
        q, k, v: (B, H, N, D), fp16 / bf16 / fp32 (float64 on the reference backend), any strides.
            N >= 1; D a multiple of 8 in [16, 256].
        is_causal: False for full attention; True for raster-order (block-)causal attention.
        block_size: with is_causal, query i sees key j when j // block_size <= i // block_size.
        prefix_len: None, an int, or an int tensor (B,) with values in [0, N]: the first prefix_len[b]
            tokens of sample b are visible to every query (AIM's prefix-causal attention).
        scale: softmax scale, default D ** -0.5.
        backend: "auto" (the fastest correct path, measured on first use: aimkern.dispatch), "triton" or
            "reference".
        deterministic: True (default): gradients are bit-identical run to run (the long-N backward adds
            its dQ shares in a fixed order). False lets them land in any order (fp32 atomics): a little
            faster where many key tiles share a query tile, with run-to-run differences at round-off level.
            The forward and the short-N backward are deterministic either way.

    Returns:
        (B, H, N, D) in the input dtype.

    Visibility for N = 6, is_causal=True, block_size=2, prefix_len=3 (x = visible)::

        keys ->   0 1 2 3 4 5
        query 0   x x x . . .
        query 1   x x x . . .
        query 2   x x x x . .
        query 3   x x x x . .
        query 4   x x x x x x
        query 5   x x x x x x
    """
    params = AttentionParams(is_causal=is_causal, block_size=block_size, scale=scale, deterministic=deterministic)
    return run(ATTENTION, (q, k, v, prefix_len), params, backend)


def attention_qkvpacked(
    qkv: torch.Tensor,
    *,
    is_causal: bool = False,
    block_size: int = 1,
    prefix_len: Union[None, int, torch.Tensor] = None,
    scale: Optional[float] = None,
    backend: str = "auto",
    deterministic: bool = True,
) -> torch.Tensor:
    """``attention`` on a ViT block's packed qkv activation, returning the (B, N, H, D) layout it needs next.

    Args:
        qkv: (B, N, 3, H, D), any strides (e.g. ``linear(x).view(B, N, 3, H, D)``); q, k, v are
            ``qkv[:, :, 0]``, ``qkv[:, :, 1]``, ``qkv[:, :, 2]``. Dtypes, N and D as in ``attention``.
        is_causal, block_size, prefix_len, scale, backend, deterministic: as in ``attention``.

    Returns:
        (B, N, H, D) in the input dtype; contiguous on the Triton backend, so ``.reshape(B, N, H * D)``
        before the output projection is free. The same values as
        ``attention(*qkv.permute(2, 0, 3, 1, 4).unbind(0), ...).transpose(1, 2)``, but the gradient of qkv
        is one (B, N, 3, H, D) tensor written by the kernels (no stack of dq, dk, dv and no copy of it).
    """
    params = AttentionParams(is_causal=is_causal, block_size=block_size, scale=scale, deterministic=deterministic)
    check_tensor(qkv, "qkv", OP_PACKED, ndim=5)
    if qkv.shape[2] != 3:
        raise ValueError(f"{OP_PACKED}: qkv must have shape (B, N, 3, H, D), got {tuple(qkv.shape)} (dim 2 is not 3)")
    (qkv,) = autocast_inputs(ATTENTION, (qkv,))
    q, k, v = unpack(qkv)
    path, (q, k, v, prefix), params = checked(ATTENTION, (q, k, v, prefix_len), params, backend, OP_PACKED)
    if path == "measured":  # the choice of attention on the unpacked views; a packed variant where it has one
        cand = select(ATTENTION, (q, k, v, prefix), params)
        if "packed" in cand.extra:
            return cand.extra["packed"](qkv, prefix, params)
        return cand.fn(q, k, v, prefix, params).transpose(1, 2)
    if path == "reference":
        return ATTENTION.reference(q, k, v, prefix, params).transpose(1, 2)
    return attention_qkvpacked_triton(qkv, prefix, params)


def _varlen_params(max_seqlen, is_causal, block_size, scale, deterministic) -> tuple:
    """(block_size tensor or None, VarlenAttentionParams): an int block size travels in the params."""
    if isinstance(block_size, torch.Tensor):
        return block_size, VarlenAttentionParams(max_seqlen, is_causal, 1, scale, deterministic)
    return None, VarlenAttentionParams(max_seqlen, is_causal, block_size, scale, deterministic)


def attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    max_seqlen: Optional[int] = None,
    is_causal: bool = False,
    block_size: Union[int, torch.Tensor] = 1,
    prefix_len: Union[None, int, torch.Tensor] = None,
    scale: Optional[float] = None,
    deterministic: bool = True,
    backend: str = "auto",
) -> torch.Tensor:
    """``attention`` over S sequences laid end to end (the layout of FlashAttention's varlen API), each with
    its own AIM mask, and no query ever seeing another sequence's keys.

    Args:
        q, k, v: (T, H, D), fp16 / bf16 / fp32 (float64 on the reference backend), any strides; sequence s
            holds tokens [cu_seqlens[s], cu_seqlens[s + 1]). D a multiple of 8 in [16, 256].
        cu_seqlens: int32 (S + 1,), S >= 1, non-decreasing from 0 to T (int64 is converted). Sequences of
            length 1 (and 0) are allowed.
        max_seqlen: a host int >= every sequence's length: it sizes the grid, and the op then reads nothing
            back from the device (the values of cu_seqlens, block_size and prefix_len are the caller's
            responsibility). On the Triton backend, max_seqlen below a sequence's length gives NaN for that
            sequence: all its output rows, and its rows of the q, k, v gradients, are NaN (never finite and
            wrong); the other sequences are unaffected. None: the op reads cu_seqlens (and the mask tensors)
            on the host once and checks them; under torch.compile, where nothing can be read, it takes T as
            the bound.
        is_causal: False for full attention within each sequence; True for raster-order (block-)causal.
        block_size: an int, or an int tensor (S,) (one block per image: its grid width gives row-causal
            order): with is_causal, query i of s sees key j of s when j // block_size[s] <= i // block_size[s].
        prefix_len: None, an int (the same prefix for every sequence, capped at each one's length) or an
            int tensor (S,) with prefix_len[s] in [0, n_s]: the first tokens of s are visible to every query
            of s.
        scale: softmax scale, default D ** -0.5.
        deterministic: True (default): bit-identical gradients run to run.
        backend: "auto", "triton" or "reference" (as in ``attention``).

    Returns:
        (T, H, D) in the input dtype.

    Visibility in a pack of two images of 4 and 3 tokens, is_causal=True, block_size=2, prefix_len=[1, 0]::

        keys ->   0 1 2 3 | 4 5 6
        query 0   x x . . | . . .
        query 1   x x . . | . . .
        query 2   x x x x | . . .
        query 3   x x x x | . . .
        query 4   . . . . | x x .
        query 5   . . . . | x x .
        query 6   . . . . | x x x
    """
    block, params = _varlen_params(max_seqlen, is_causal, block_size, scale, deterministic)
    return run(ATTENTION_VARLEN, (q, k, v, cu_seqlens, block, prefix_len), params, backend)


def attention_varlen_qkvpacked(
    qkv: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    max_seqlen: Optional[int] = None,
    is_causal: bool = False,
    block_size: Union[int, torch.Tensor] = 1,
    prefix_len: Union[None, int, torch.Tensor] = None,
    scale: Optional[float] = None,
    deterministic: bool = True,
    backend: str = "auto",
) -> torch.Tensor:
    """``attention_varlen`` on a packed (T, 3, H, D) qkv (``linear(x).view(T, 3, H, D)``): q, k, v are
    ``qkv[:, 0]``, ``qkv[:, 1]``, ``qkv[:, 2]``, read through strides (no copy). Returns (T, H, D); on the
    Triton backend the gradient of qkv is one (T, 3, H, D) tensor written by the kernels."""
    block, params = _varlen_params(max_seqlen, is_causal, block_size, scale, deterministic)
    check_tensor(qkv, "qkv", OP_VARLEN_PACKED, ndim=4)
    if qkv.shape[1] != 3:
        raise ValueError(f"{OP_VARLEN_PACKED}: qkv must have shape (T, 3, H, D), got {tuple(qkv.shape)} "
                         "(dim 1 is not 3)")
    (qkv,) = autocast_inputs(ATTENTION_VARLEN, (qkv,))
    q, k, v = unpack_varlen(qkv)
    path, tensors, params = checked(ATTENTION_VARLEN, (q, k, v, cu_seqlens, block, prefix_len), params, backend,
                                    OP_VARLEN_PACKED)
    if path == "measured":
        cand = select(ATTENTION_VARLEN, tensors, params)
        if "packed" in cand.extra:
            return cand.extra["packed"](qkv, *tensors[3:], params)
        return cand.fn(*tensors, params)
    if path == "reference":
        return ATTENTION_VARLEN.reference(*tensors, params)
    return attention_varlen_qkvpacked_triton(qkv, *tensors[3:], params)


def patch_embed(
    images: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    pos_embed: Optional[torch.Tensor] = None,
    *,
    input_scale: Optional[Sequence[float]] = None,
    input_shift: Optional[Sequence[float]] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Fused patch embedding, equal to ``conv2d(images, weight, bias, stride=P).flatten(2).transpose(1, 2) + pos_embed``.

    Args:
        images: (B, C, H, W), H and W multiples of P: float (the GEMM's dtype), or uint8 pixels normalized
            in the kernels by ``input_scale`` / ``input_shift`` (no normalized copy is made).
        weight: (E, C, P, P), exactly ``nn.Conv2d(C, E, P, stride=P).weight``.
        bias: (E,) or None.
        pos_embed: (N, E) or (1, N, E) with N = (H // P) * (W // P), or None.
        input_scale, input_shift: for uint8 images (and only for them, both required): C floats each. The
            GEMM's input for pixel x of channel c is ``x * input_scale[c] + input_shift[c]``, with both
            numbers rounded to float32 and the multiply-add in fp32, then cast to the weight's dtype.
            ``aimkern.data.decode.pixel_affine(C)`` gives the model's ``(x / 255 - mean) / std`` (scale =
            1 / (255 std), shift = -mean / std); ``(1.0,) * C, (0.0,) * C`` the raw values. Integer images
            get no gradient.
        backend: "auto" (the fastest correct path, measured on first use: aimkern.dispatch), "triton" or
            "reference".

    Returns:
        (B, N, E) tokens in raster order, in the dtype of ``images @ weight`` (the weight's for uint8 images).
    """
    params = PatchEmbedParams(input_scale=input_scale, input_shift=input_shift)
    return run(PATCH_EMBED, (images, weight, bias, pos_embed), params, backend)


def linear_cross_entropy(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    target: torch.Tensor,
    *,
    linear_bias: Optional[torch.Tensor] = None,
    reduction: str = "mean",
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    backend: str = "auto",
) -> torch.Tensor:
    """Cross-entropy of ``F.linear(input, linear_weight, linear_bias)`` against ``target``, plus z-loss.

    Args:
        input: (..., E) hidden states.
        linear_weight: (V, E) head weight.  linear_bias: (V,) or None.
        target: (...) integer class ids in [0, V), or ignore_index.
        reduction: "mean" (over non-ignored tokens), "sum" or "none" (shape of target).
        ignore_index, label_smoothing: as in ``F.cross_entropy``.
        z_loss: weight of ``logsumexp(logits) ** 2``, averaged like the loss.
        backend: "auto" (the fastest correct path, measured on first use: aimkern.dispatch), "triton" or
            "reference".

    Returns:
        float32 loss (float64 for float64 inputs): a scalar, or target's shape for reduction="none".
    """
    params = CrossEntropyParams(reduction, ignore_index, float(label_smoothing), float(z_loss))
    return run(CROSS_ENTROPY, (input, linear_weight, target, linear_bias), params, backend)


def next_patch_pixel_loss(
    pred: torch.Tensor,
    images: torch.Tensor,
    *,
    patch_size: int,
    offset: int = 1,
    prefix_len: Union[None, int, torch.Tensor] = None,
    norm_pix: bool = True,
    eps: float = 1e-6,
    backend: str = "auto",
) -> torch.Tensor:
    """AIM's next-patch objective: MSE between pred row i and the (normalized) patch i + offset.

    Args:
        pred: (B, N, P*P*C) predictions, values in MAE/AIM (p, q, c) order.
        images: (B, C, H, W), H and W multiples of patch_size; N = (H // P) * (W // P).
        offset: row i predicts patch i + offset.
        prefix_len: None, an int or an int tensor (B,) in [0, N]: patches j < prefix_len[b] are context,
            not targets.
        norm_pix: standardize each target patch by its mean and unbiased variance (with eps).
        backend: "auto" (the fastest correct path, measured on first use: aimkern.dispatch), "triton" or
            "reference". The Triton path treats the images as data (no gradient): with images that
            require grad, "triton" raises a ValueError and "auto" runs the reference, which
            differentiates through the targets.

    Returns:
        float32 scalar (float64 for float64 inputs): the per-value squared error averaged within each
        patch, then over the counted targets (j >= offset and j >= prefix_len[b]); 0 when none counts.
    """
    params = PixelLossParams(patch_size=patch_size, offset=offset, norm_pix=norm_pix, eps=float(eps))
    return run(PIXEL_LOSS, (pred, images, prefix_len), params, backend)


def next_patch_pixel_loss_varlen(
    pred: torch.Tensor,
    patches: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    offset: int = 1,
    prefix_len: Union[None, int, torch.Tensor] = None,
    norm_pix: bool = True,
    eps: float = 1e-6,
    max_seqlen: Optional[int] = None,
    input_scale: Optional[Sequence[float]] = None,
    input_shift: Optional[Sequence[float]] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """``next_patch_pixel_loss`` over a pack of S images laid end to end (``aimkern.pack_images``).

    Args:
        pred: (T, P*P*C) predictions, values in MAE/AIM (p, q, c) order.
        patches: (T, P*P*C) raw patch values (``PackedImages.patches``), uint8 or float; data (the Triton
            path gives them no gradient; "auto" runs the reference for patches that require grad).
        cu_seqlens: int32 (S + 1,), non-decreasing from 0 to T: image s holds rows [cu[s], cu[s + 1]).
        offset: row i of an image predicts its patch i + offset.
        prefix_len: None, an int (every image) or an int tensor (S,) with prefix_len[s] in [0, n_s].
        norm_pix, eps: standardize each target patch by its mean and unbiased variance (with eps).
        max_seqlen: as ``attention_varlen``'s, a host int >= every image's length (a pack's
            ``max_seqlen``). Given, the op reads nothing on the host: no sync, and cu_seqlens and prefix_len
            are the caller's promise (a pack from ``pack_images`` keeps it). None: the op reads cu_seqlens
            (and prefix_len) on the host once to check them (not under torch.compile).
        input_scale, input_shift: for uint8 patches, None (raw values) or C floats each: the target value
            of pixel x of channel c is ``x * input_scale[c] + input_shift[c]`` (fp32) before norm_pix, as
            ``patch_embed`` normalizes its input (``aimkern.data.decode.pixel_affine(C)`` gives the model's
            ``(x / 255 - mean) / std``), so the loss reads the uint8 pack and no normalized copy is made.
        backend: "auto", "triton" or "reference".

    Target j of image s counts when j >= offset and j >= prefix_len[s], within s: no row predicts a patch of
    another image.

    Returns:
        float32 scalar (float64 for float64 inputs): the per-value squared error averaged within each patch,
        then over the counted targets of the whole pack; 0 when none counts.
    """
    params = PixelLossVarlenParams(offset=offset, norm_pix=norm_pix, eps=float(eps), max_seqlen=max_seqlen,
                                   input_scale=input_scale, input_shift=input_shift)
    return run(PIXEL_LOSS_VARLEN, (pred, patches, cu_seqlens, prefix_len), params, backend)
