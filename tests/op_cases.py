"""The contract tests' data per op (tests/test_op_contracts.py), keyed by op name: awkward small problems,
the empty batch and the opcheck samples of every ``aimkern::`` custom op.

It lives beside the tests, not in the package: ``aimkern.specs`` holds only what an op needs at run time.

EXAMPLES[op](dtype)    small awkward CPU problems (ragged tiles, every option class, with and without
                       gradients) that the contract tests hold every candidate to the reference on;
EMPTY_BATCH[op](dtype) the problem of an empty batch;
CUSTOM_OPS[op]()       (label, op, args) samples, at least one per custom op of the op's Triton path, for
                       ``torch.library.opcheck``: small CPU tensors, run under Triton's interpreter.
"""
from __future__ import annotations

from typing import Optional

import torch

from aimkern.ops import LaunchPolicy
from aimkern.ops import attention as attn
from aimkern.ops import attention_varlen as avl
from aimkern.ops import cross_entropy as ce
from aimkern.ops import patch_embed as pe
from aimkern.ops import pixel_loss as pl
from aimkern.ops import pixel_loss_varlen as plv
from aimkern.specs import Problem


def problem(op: str, dtype: str, shapes: tuple, params, requires_grad: tuple, dtypes: tuple) -> Problem:
    """A CPU ``Problem``; ``dtypes`` entries of None (for present tensors) mean the problem's dtype."""
    dtypes = tuple(None if s is None else (d or dtype) for s, d in zip(shapes, dtypes))
    return Problem(op=op, device="cpu", dtype=dtype, shapes=tuple(shapes), params=params,
                   requires_grad=tuple(requires_grad), dtypes=dtypes)


def strided(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The same values in a layout no kernel may assume: memory order reversed (dim 0 is the fastest) and
    neighbours two elements apart. A view of a leaf that requires grad when ``t`` does, so a gradient
    reaches it through its strides."""
    if t is None or t.dim() == 0:
        return t
    rev = tuple(range(t.dim() - 1, -1, -1))
    base = t.detach().permute(rev).contiguous()
    wide = base.new_zeros((*base.shape[:-1], 2 * base.shape[-1]))
    wide[..., ::2] = base
    wide.requires_grad_(t.requires_grad)
    return wide[..., ::2].permute(rev)


# ------------------------------------------------------------------------------------------- attention
def _attention(dtype: str, qshape: tuple, prefix: bool, grad: bool, **options) -> Problem:
    return problem("attention", dtype, (qshape, qshape, qshape, (qshape[0],) if prefix else None),
                   attn.AttentionParams(**options), (grad, grad, grad, False), (None, None, None, "int32"))


def attention_examples(dtype: str) -> list:
    """N = 37 and 19 (ragged tiles), D = 16 and 24 (a padded head dim), every mask kind, both determinisms."""
    return [
        _attention(dtype, (2, 2, 37, 16), True, True, is_causal=True, block_size=3),
        _attention(dtype, (1, 2, 19, 24), False, True, is_causal=True, deterministic=False),
        _attention(dtype, (2, 1, 19, 16), False, True, scale=0.3),
        _attention(dtype, (1, 1, 7, 16), True, False, is_causal=True, block_size=2),
    ]


def attention_custom_ops() -> list:
    """opcheck samples of aimkern::attention_fwd / _bwd in both layouts, with a prefix."""
    out = []
    gen = torch.Generator().manual_seed(0)
    qkv = torch.randn(2, 9, 3, 2, 16, generator=gen)
    prefix = torch.tensor([3, 0], dtype=torch.int32)
    params = attn.AttentionParams(is_causal=True, block_size=2, scale=0.25)
    for layout in attn.LAYOUTS:
        for path in ("fused", "split"):
            scalars = (params, LaunchPolicy(autotune=False, attention_backward=path), layout)
            if layout == "packed":
                tensors = (qkv.clone().requires_grad_(), None, None)
            else:
                tensors = tuple(t.contiguous().requires_grad_() for t in attn.unpack(qkv))
            out.append((f"attention_fwd {layout} {path}", torch.ops.aimkern.attention_fwd,
                        attn.attention_fwd.flat((*tensors, prefix, *scalars))))
            with torch.no_grad():
                o, lse = attn.attention_fwd(*tensors, prefix, *scalars)
            do = torch.randn(o.shape, generator=gen)
            detached = tuple(None if t is None else t.detach() for t in tensors)
            out.append((f"attention_bwd {layout} {path}", torch.ops.aimkern.attention_bwd,
                        attn.attention_bwd.flat((do, *detached, o, lse, prefix, *scalars))))
    return out


# ------------------------------------------------------------------------------------------- cross-entropy
def _ce(dtype: str, lead: tuple, v: int, e: int, bias: bool, grad: bool, **options) -> Problem:
    return problem("linear_cross_entropy", dtype, ((*lead, e), (v, e), lead, (v,) if bias else None),
                   ce.CrossEntropyParams(**options), (grad, grad, False, bias and grad), (None, None, "int64", None))


def cross_entropy_examples(dtype: str) -> list:
    """V = 300 and 517 (no tile divides them), leading dims (2, 37) = 74 tokens (two backward chunks under
    the interpreter), every reduction (the forward-with-gradient op, and the per-token op + backward op),
    label smoothing, z-loss, bias on and off, and no gradient."""
    return [
        _ce(dtype, (2, 37), 517, 48, True, True, label_smoothing=0.1, z_loss=1e-3),
        _ce(dtype, (19,), 300, 80, False, True, reduction="none", z_loss=1e-2),
        _ce(dtype, (13,), 300, 48, True, True, reduction="sum", label_smoothing=0.2),
        _ce(dtype, (5,), 300, 48, True, False),
    ]


def cross_entropy_custom_ops() -> list:
    """opcheck samples of the four cross-entropy ops: per-token forward + backward, forward-with-gradient
    and the fp32 scaling of its saved gradients."""
    gen = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(11, 48, generator=gen), torch.randn(300, 48, generator=gen) * 0.2, torch.randn(300, generator=gen)
    tgt = torch.randint(0, 300, (11,), generator=gen)
    tgt[3] = -100
    params = ce.CrossEntropyParams(label_smoothing=0.1, z_loss=1e-3)
    leaves = tuple(t.clone().requires_grad_() for t in (x, w, b))
    needs = (True, True, True)  # need_dx, need_dw, need_db
    out = [("linear_cross_entropy_fwd", torch.ops.aimkern.linear_cross_entropy_fwd,
            ce.lce_fwd.flat((*leaves, tgt, params, False)))]
    with torch.no_grad():
        _, lse = ce.lce_fwd(x, w, b, tgt, params, False)
    grad = torch.full((), 0.5).expand(11)  # a stride-0 per-token gradient, as the gradient of .sum() is
    out.append(("linear_cross_entropy_bwd", torch.ops.aimkern.linear_cross_entropy_bwd,
                ce.lce_bwd.flat((grad, x, w, b, tgt, lse, params, False, *needs))))
    for reduction in ("mean", "sum"):
        args = (*leaves, tgt, ce.CrossEntropyParams(reduction=reduction), False, *needs)
        out.append((f"linear_cross_entropy_fwd_grad {reduction}", torch.ops.aimkern.linear_cross_entropy_fwd_grad,
                    ce.lce_fwd_grad.flat(args)))
    src = torch.randn(7, 5, generator=gen)
    out.append(("linear_cross_entropy_scale", torch.ops.aimkern.linear_cross_entropy_scale,
                ce.lce_scale.flat((src, torch.tensor(65536.0), torch.tensor(1.0 / 37), torch.float16, False))))
    return out


# ------------------------------------------------------------------------------------------- patch embed
def uint8_params(c: int) -> "pe.PatchEmbedParams":
    """The model's normalization of C-channel uint8 images (C = 1 or 3: ``pixel_affine``)."""
    from aimkern.data.decode import pixel_affine

    scale, shift = pixel_affine(c)
    return pe.PatchEmbedParams(input_scale=scale, input_shift=shift)


def _pe(dtype: str, b: int, c: int, h: int, w: int, p: int, e: int, bias: bool, pos, images_grad: bool,
        uint8: bool = False) -> Problem:
    """uint8: the images are uint8 pixels under the model's normalization (no gradient for them)."""
    n = (h // p) * (w // p)
    pos_shape = None if pos is None else ((1, n, e) if pos == "1NE" else (n, e))
    params = uint8_params(c) if uint8 else pe.PatchEmbedParams()
    return problem("patch_embed", dtype, ((b, c, h, w), (e, c, p, p), (e,) if bias else None, pos_shape),
                   params, (images_grad and not uint8, True, bias, pos is not None),
                   ("uint8" if uint8 else None, None, None, None))


def patch_embed_examples(dtype: str) -> list:
    """K = C*P*P not a power of two, P = 5, H != W, B = 3 (an image chunk of the dW kernel loops), each
    optional part on and off, images with and without a gradient; uint8 images normalized in the kernels
    (C = 3 and 1, with and without bias)."""
    return [
        _pe(dtype, 2, 3, 12, 20, 4, 40, True, "1NE", True),
        _pe(dtype, 3, 1, 10, 15, 5, 24, False, "NE", False),
        _pe(dtype, 1, 4, 8, 8, 4, 16, True, None, True),
        _pe(dtype, 3, 3, 12, 20, 4, 40, True, "1NE", False, uint8=True),
        _pe(dtype, 2, 1, 10, 15, 5, 24, False, "NE", False, uint8=True),
    ]


def patch_embed_custom_ops() -> list:
    """opcheck samples of the three patch-embed ops: forward with bias and position, each backward."""
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, 8, 12, generator=gen)
    weight = torch.randn(16, 3, 4, 4, generator=gen) * 0.2
    bias, pos = torch.randn(16, generator=gen), torch.randn(1, 6, 16, generator=gen)
    grad = torch.randn(2, 6, 16, generator=gen)
    leaves = tuple(t.clone().requires_grad_() for t in (images, weight, bias, pos))
    plain = pe.PatchEmbedParams()
    out = [("patch_embed_fwd", torch.ops.aimkern.patch_embed_fwd, pe.patch_embed_fwd.flat((*leaves, plain, False)))]
    for want_weight, want_pos in ((True, True), (True, False), (False, True)):
        out.append((f"patch_embed_bwd_params w={want_weight} pos={want_pos}", torch.ops.aimkern.patch_embed_bwd_params,
                    pe.patch_embed_bwd_params.flat((grad, images, weight, plain, False, want_weight, want_pos))))
    out.append(("patch_embed_bwd_images", torch.ops.aimkern.patch_embed_bwd_images,
                pe.patch_embed_bwd_images.flat((grad, weight, images, False))))
    # uint8 images, normalized in the kernels: the forward (gradients for weight, bias, pos) and the dW pass
    pixels, norm = torch.randint(0, 256, (2, 3, 8, 12), generator=gen, dtype=torch.uint8), uint8_params(3)
    out.append(("patch_embed_fwd uint8", torch.ops.aimkern.patch_embed_fwd,
                pe.patch_embed_fwd.flat((pixels, *leaves[1:], norm, False))))
    out.append(("patch_embed_bwd_params uint8", torch.ops.aimkern.patch_embed_bwd_params,
                pe.patch_embed_bwd_params.flat((grad, pixels, weight, norm, False, True, True))))
    return out


# ------------------------------------------------------------------------------------------- pixel loss
def _pl(dtype: str, b: int, c: int, h: int, w: int, p: int, prefix: bool, grad: bool, **options) -> Problem:
    n = (h // p) * (w // p)
    return problem("next_patch_pixel_loss", dtype, ((b, n, p * p * c), (b, c, h, w), (b,) if prefix else None),
                   pl.PixelLossParams(patch_size=p, **options), (grad, False, False), (None, None, "int32"))


def pixel_loss_examples(dtype: str) -> list:
    """P = 4 and 5, C = 1 and 3, non-square images, offsets 0 to 3, prefixes, raw and normalized targets."""
    return [
        _pl(dtype, 2, 3, 12, 20, 4, True, True, offset=2),
        _pl(dtype, 2, 1, 10, 15, 5, False, True, norm_pix=False),
        _pl(dtype, 1, 3, 8, 12, 4, True, True, offset=0, eps=0.5),
        _pl(dtype, 2, 3, 8, 8, 4, False, False, offset=3),
    ]


def pixel_loss_custom_ops() -> list:
    """opcheck samples of the pixel-loss forward (with a prefix) and backward."""
    gen = torch.Generator().manual_seed(0)
    pred, images = torch.randn(2, 6, 48, generator=gen), torch.rand(2, 3, 8, 12, generator=gen)
    prefix = torch.tensor([1, 4], dtype=torch.int32)
    scalars = (pl.PixelLossParams(patch_size=4, offset=1), False)
    return [
        ("next_patch_pixel_loss_fwd", torch.ops.aimkern.next_patch_pixel_loss_fwd,
         pl.pixel_loss_fwd.flat((pred.clone().requires_grad_(), images, prefix, *scalars))),
        ("next_patch_pixel_loss_bwd", torch.ops.aimkern.next_patch_pixel_loss_bwd,
         pl.pixel_loss_bwd.flat((torch.tensor(1.5), pred, images, prefix, *scalars))),
    ]


# -------------------------------------------------------------------------------------- varlen (packed)
def _avl(dtype: str, t: int, s: int, h: int, d: int, block: bool, prefix: bool, grad: bool, **options) -> Problem:
    q = (t, h, d)
    return problem("attention_varlen", dtype, (q, q, q, (s + 1,), (s,) if block else None, (s,) if prefix else None),
                   avl.VarlenAttentionParams(**options), (grad, grad, grad, False, False, False),
                   (None, None, None, "int32", "int32", "int32"))


def attention_varlen_examples(dtype: str) -> list:
    """Packs of 2-4 random lengths (length 1 and 0 possible) up to T = 90 (query and key tails), D = 16 and 24,
    per-sequence block sizes and prefixes, an int block size, full attention, both determinisms."""
    return [
        _avl(dtype, 90, 3, 2, 16, True, True, True, is_causal=True),
        _avl(dtype, 40, 4, 1, 24, False, False, True, is_causal=True, block_size=3, deterministic=False),
        _avl(dtype, 30, 2, 2, 16, False, False, True, scale=0.3),
        _avl(dtype, 9, 2, 1, 16, False, True, False, is_causal=True, block_size=2),
    ]


def attention_varlen_custom_ops() -> list:
    """opcheck samples of aimkern::attention_varlen_fwd / _bwd in both layouts, per-sequence masks."""
    out = []
    gen = torch.Generator().manual_seed(0)
    qkv = torch.randn(20, 3, 2, 16, generator=gen)
    cu = torch.tensor([0, 1, 8, 20], dtype=torch.int32)
    block, prefix = torch.tensor([1, 2, 3], dtype=torch.int32), torch.tensor([1, 0, 5], dtype=torch.int32)
    params = avl.VarlenAttentionParams(max_seqlen=16, is_causal=True, scale=0.25)
    for layout in ("thd", "packed"):
        scalars = (params, LaunchPolicy(autotune=False), layout)
        if layout == "packed":
            tensors = (qkv.clone().requires_grad_(), None, None)
        else:
            tensors = tuple(t.contiguous().requires_grad_() for t in avl.unpack(qkv))
        out.append((f"attention_varlen_fwd {layout}", torch.ops.aimkern.attention_varlen_fwd,
                    avl.attention_varlen_fwd.flat((*tensors, cu, block, prefix, *scalars))))
        with torch.no_grad():
            o, lse = avl.attention_varlen_fwd(*tensors, cu, block, prefix, *scalars)
        do = torch.randn(o.shape, generator=gen)
        detached = tuple(None if t is None else t.detach() for t in tensors)
        out.append((f"attention_varlen_bwd {layout}", torch.ops.aimkern.attention_varlen_bwd,
                    avl.attention_varlen_bwd.flat((do, *detached, o, lse, cu, block, prefix, *scalars))))
    return out


def _plv(dtype: str, t: int, s: int, d: int, prefix: bool, grad: bool, patches: Optional[str] = None,
         **options) -> Problem:
    return problem("next_patch_pixel_loss_varlen", dtype, ((t, d), (t, d), (s + 1,), (s,) if prefix else None),
                   plv.PixelLossVarlenParams(**options), (grad, False, False, False), (None, patches, "int32", "int32"))


def pixel_loss_varlen_examples(dtype: str) -> list:
    """Packs of 2-3 random lengths in T = 23-40 (rows of one program span images), D = 48 and 25, uint8 and
    float patches, offsets 0 to 3, prefixes, raw and normalized targets, uint8 normalized per channel."""
    return [
        _plv(dtype, 40, 3, 48, True, True, "uint8", offset=2),
        _plv(dtype, 23, 2, 25, False, True, None, norm_pix=False),
        _plv(dtype, 31, 3, 48, True, True, None, offset=0, eps=0.5),
        _plv(dtype, 17, 2, 48, False, False, "uint8", offset=3),
        # the packed model's targets: uint8 normalized per channel in the kernel (C = 3, and C = 1 on D = 25)
        _plv(dtype, 29, 3, 48, True, True, "uint8", input_scale=(0.0171, 0.0175, 0.0174),
             input_shift=(-2.118, -2.036, -1.804)),
        _plv(dtype, 19, 2, 25, False, True, "uint8", norm_pix=False, input_scale=(0.5,), input_shift=(-60.0,)),
    ]


def pixel_loss_varlen_custom_ops() -> list:
    """opcheck samples of the packed pixel-loss forward (uint8 patches, a prefix; raw and normalized per
    channel) and backward."""
    gen = torch.Generator().manual_seed(0)
    pred, patches = torch.randn(13, 48, generator=gen), (torch.rand(13, 48, generator=gen) * 255).to(torch.uint8)
    cu, prefix = torch.tensor([0, 6, 6, 13], dtype=torch.int32), torch.tensor([1, 0, 2], dtype=torch.int32)
    out = []
    for name, params in (("", plv.PixelLossVarlenParams(offset=1)),
                         (" affine", plv.PixelLossVarlenParams(offset=1, input_scale=(0.02, 0.01, 0.03),
                                                               input_shift=(-2.0, -1.0, 0.5)))):
        scalars = (params, False)
        out += [
            ("next_patch_pixel_loss_varlen_fwd" + name, torch.ops.aimkern.next_patch_pixel_loss_varlen_fwd,
             plv.pixel_loss_varlen_fwd.flat((pred.clone().requires_grad_(), patches, cu, prefix, *scalars))),
            ("next_patch_pixel_loss_varlen_bwd" + name, torch.ops.aimkern.next_patch_pixel_loss_varlen_bwd,
             plv.pixel_loss_varlen_bwd.flat((torch.tensor(1.5), pred, patches, cu, prefix, *scalars))),
        ]
    return out


# ------------------------------------------------------------------------------------------- by op name
EXAMPLES = {"attention": attention_examples, "linear_cross_entropy": cross_entropy_examples,
            "patch_embed": patch_embed_examples, "next_patch_pixel_loss": pixel_loss_examples,
            "attention_varlen": attention_varlen_examples, "next_patch_pixel_loss_varlen": pixel_loss_varlen_examples}
EMPTY_BATCH = {
    "attention": lambda dtype: _attention(dtype, (0, 2, 7, 16), True, True, is_causal=True, block_size=2),
    # "sum": a mean over no token is NaN (0 / 0), like F.cross_entropy, and NaN equals nothing.
    "linear_cross_entropy": lambda dtype: _ce(dtype, (0,), 300, 48, True, True, reduction="sum"),
    "patch_embed": lambda dtype: _pe(dtype, 0, 3, 8, 12, 4, 16, True, "1NE", True),
    "next_patch_pixel_loss": lambda dtype: _pl(dtype, 0, 3, 8, 12, 4, False, True),
    # A pack holds at least one token (T >= 1: the checks refuse an empty pack, naming T).
    "attention_varlen": lambda dtype: None,
    "next_patch_pixel_loss_varlen": lambda dtype: None,
}
CUSTOM_OPS = {"attention": attention_custom_ops, "linear_cross_entropy": cross_entropy_custom_ops,
              "patch_embed": patch_embed_custom_ops, "next_patch_pixel_loss": pixel_loss_custom_ops,
              "attention_varlen": attention_varlen_custom_ops,
              "next_patch_pixel_loss_varlen": pixel_loss_varlen_custom_ops}
