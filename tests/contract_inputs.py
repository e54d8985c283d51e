"""Inputs of the contract tests that look for trouble (tests/test_contract_*.py): memory layouts and hostile
values, per op. The oracle that judges them is tests/contract_check.py.

Layouts (``lay_out``), applied to every tensor argument (integer ones included) and incoming gradient:

    strided     a column of a wider tensor: t == wide[..., 1] of a (..., 3) tensor (stride 3, offset 1)
    offset      a contiguous slice that starts 5 elements into its storage
    transposed  memory order reversed (dim 0 fastest), for tensors of 2 or more dims
    expanded    stride 0 along the first dim longer than 1 (that dim's first slice, repeated)

Hostile values (``hostile``): one list of named cases per op, each a Problem, its tensors and the incoming
gradient (``contract_check.Upstream``).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from aimkern.ops._launch import kernels
from aimkern.specs import get_spec
from op_cases import problem as _problem


def make_problem(op: str, dtype: str, shapes: tuple, options: dict, requires_grad: tuple, dtypes: tuple):
    """A CPU ``Problem`` whose params are the op's params dataclass with ``options``."""
    return _problem(op, dtype, shapes, get_spec(op).params_type(**options), requires_grad, dtypes)

LAYOUTS = ("strided", "offset", "transposed", "expanded")
OFFSET = 5
FP16_HALF_MAX = 0.5 * torch.finfo(torch.float16).max  # 32752


# ---------------------------------------------------------------------------------------------- layouts
def _junk(t: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    """``n`` values a kernel must never read, plausible for ``t``: for integer tensors t's own values
    shuffled (valid class ids / prefix lengths, so a wrong read is a wrong result, not a refused input)."""
    if t.is_floating_point():
        return (torch.randn(n, generator=gen) * 3.0 + 1.0).to(t.dtype)
    flat = t.reshape(-1)
    if flat.numel() == 0:
        return torch.zeros(n, dtype=t.dtype)
    idx = torch.randint(0, flat.numel(), (n,), generator=gen)
    return flat[idx].roll(1)


def lay_out(t: torch.Tensor, layout: Optional[str], gen: torch.Generator, requires_grad: bool) -> torch.Tensor:
    """A view with ``t``'s values (expanded: its first slice repeated) in ``layout``, made from a fresh leaf
    that requires grad when asked (the view then receives the gradient through its strides)."""
    t = t.detach()
    rg = bool(requires_grad and t.is_floating_point())
    if layout is None or t.dim() == 0 or t.numel() == 0:
        return t.clone().requires_grad_(rg)
    if layout == "strided":
        wide = torch.stack([_junk(t, t.numel(), gen).view(t.shape), t, _junk(t, t.numel(), gen).view(t.shape)], -1)
        return wide.requires_grad_(rg)[..., 1]
    if layout == "offset":
        flat = torch.cat([_junk(t, OFFSET, gen), t.reshape(-1)])
        return flat.requires_grad_(rg)[OFFSET:].view(t.shape)
    if layout == "transposed":
        if t.dim() < 2:
            return t.clone().requires_grad_(rg)
        rev = tuple(range(t.dim() - 1, -1, -1))
        return t.permute(rev).contiguous().requires_grad_(rg).permute(rev)
    if layout == "expanded":
        dim = next((d for d, s in enumerate(t.shape) if s > 1), None)
        if dim is None:
            return t.clone().requires_grad_(rg)
        return t.narrow(dim, 0, 1).clone().requires_grad_(rg).expand(t.shape)
    raise ValueError(f"unknown layout {layout!r}; have {LAYOUTS}")


# An expanded cu_seqlens (its first offset repeated) is not a pack: the layouts test hands it over plainly.
NOT_LAID_OUT = {("expanded", "cu_seqlens")}


def layouts_of(tensor_args, layout: str) -> tuple:
    """``layout`` per tensor argument (None where ``NOT_LAID_OUT``), then the incoming gradient's."""
    return tuple(None if (layout, name) in NOT_LAID_OUT else layout for name in tensor_args) + (layout,)


def applies(layout: str, t: Optional[torch.Tensor]) -> bool:
    """Whether ``layout`` changes how ``t`` is handed over (1-D tensors have no transposed layout)."""
    if t is None or t.dim() == 0 or t.numel() == 0:
        return False
    if layout == "transposed":
        return t.dim() >= 2
    if layout == "expanded":
        return any(s > 1 for s in t.shape)
    return True


# --------------------------------------------------------------------------------------------- helpers
def _randn(shape, gen, dtype, scale=1.0, shift=0.0) -> torch.Tensor:
    return (torch.randn(shape, generator=gen) * scale + shift).to(dtype)


def _uniform(shape, gen, dtype, bound) -> torch.Tensor:
    return ((torch.rand(shape, generator=gen) * 2 - 1) * bound).to(dtype)


# ------------------------------------------------------------------------------------------- attention
def attention_problem(dtype: str, shape: tuple, *, prefix: bool, grad: bool = True, **options):
    opts = dict(is_causal=False, block_size=1, scale=None, deterministic=True)
    opts.update(options)
    return make_problem("attention", dtype, (shape, shape, shape, (shape[0],) if prefix else None), opts,
                        (grad, grad, grad, False), (None, None, None, "int32"))


def attention_bwd_block_n(n: int, d: int, fp32: bool, config: str) -> int:
    """BLOCK_N (key rows) of the tiled backward's key tiles at N = n under ``config``'s tiles."""
    choice = kernels("attention").backward_tiled(d, fp32, n)
    return (choice.interpreter if config == "interp" else choice.configs[0]).kwargs["BLOCK_N"]


def ragged_key_sizes(d: int, fp32: bool, config: str) -> tuple:
    """(N whose last key tile holds 1 key, N whose last key tile holds BLOCK_N - 1 keys), the smallest past
    one whole tile, from the backward's tables (for the key-tail kernel's range the same holds: its tile
    of 16 or 32 keys is then mostly padding)."""
    one = short = None
    for n in range(2, 2048):
        bn = attention_bwd_block_n(n, d, fp32, config)
        if n > bn and n % bn == 1 and one is None:
            one = n
        if n > bn and n % bn == bn - 1 and short is None:
            short = n
        if one and short:
            return one, short
    raise AssertionError("no ragged key tile sizes under N = 2048")


def _shifted_qk(shape, gen, dtype, lse_sign: float):
    """q = 0.3 randn + c, k = 0.3 randn -/+ c with c such that the logits are about -/+ (ln(dtype max) + 10):
    exp(-lse) then overflows the dtype (softmax ignores the shared shift: such rows are legitimate)."""
    d = shape[-1]
    target = math.log(torch.finfo(dtype).max) + 10.0  # fp16: 21, fp32: 99
    c = math.sqrt(target / math.sqrt(d))  # logit = D**-0.5 * q.k ~ D**-0.5 * D * (+/- c^2)
    return _randn(shape, gen, dtype, 0.3, c), _randn(shape, gen, dtype, 0.3, lse_sign * c)


def attention_cases(dtype: str, config: str, d: int = 16) -> list:
    """(name, problem, tensors, Upstream) of attention's hostile values at N with ragged key tails."""
    from contract_check import Upstream

    dt = getattr(torch, dtype)
    n1, n2 = ragged_key_sizes(d, dtype == "float32", config)
    gen = torch.Generator().manual_seed(3)
    out = []
    for name, n, sign in (("lse-very-negative-tail1", n1, -1.0), ("lse-very-negative-tailB-1", n2, -1.0),
                          ("lse-very-positive-tail1", n1, 1.0)):
        shape = (1, 1, n, d)
        q, k = _shifted_qk(shape, gen, dt, sign)
        out.append((name, attention_problem(dtype, shape, prefix=False), (q, k, _randn(shape, gen, dt), None),
                    Upstream()))
    shape = (1, 1, n1, d)
    q = _randn(shape, gen, dt)
    q[:, :, ::2] = 0  # every other query: all its visible logits are 0
    out.append(("equal-visible-logits", attention_problem(dtype, shape, prefix=True, is_causal=True),
                (q, _randn(shape, gen, dt), _randn(shape, gen, dt), torch.tensor([3], dtype=torch.int32)),
                Upstream()))
    if dtype != "float16":
        return out  # the rest probe fp16's range
    out.append(("v-at-half-fp16-max", attention_problem(dtype, shape, prefix=False, is_causal=True),
                (_randn(shape, gen, dt), _randn(shape, gen, dt), _uniform(shape, gen, dt, FP16_HALF_MAX), None),
                Upstream(scale=2.0**-4)))
    out.append(("q-at-half-fp16-max", attention_problem(dtype, shape, prefix=False),
                (_uniform(shape, gen, dt, FP16_HALF_MAX), _randn(shape, gen, dt, 1.0 / FP16_HALF_MAX),
                 _randn(shape, gen, dt), None), Upstream()))
    out.append(("gradscaler-upstream", attention_problem(dtype, shape, prefix=False, is_causal=True),
                (_randn(shape, gen, dt), _randn(shape, gen, dt), _randn(shape, gen, dt), None), Upstream(scale=256.0)))
    return out


# ---------------------------------------------------------------------------------------- cross-entropy
IGNORE = -100


def ce_problem(dtype: str, lead: tuple, v: int, e: int, *, bias: bool = True, grad: bool = True, **options):
    opts = dict(reduction="mean", ignore_index=IGNORE, label_smoothing=0.0, z_loss=0.0)
    opts.update(options)
    return make_problem("linear_cross_entropy", dtype, ((*lead, e), (v, e), lead, (v,) if bias else None), opts,
                        (grad, grad, False, bias and grad), (None, None, "int64", None))


def ce_inputs(problem, gen, *, x_scale=1.0, w_scale=None, bias_values=None, target=None) -> tuple:
    (x_shape, (v, e), lead, b_shape), dt = problem.shapes, problem.torch_dtype
    x = _randn(x_shape, gen, dt, x_scale)
    w = _randn((v, e), gen, dt, e**-0.5 if w_scale is None else w_scale)
    b = None if b_shape is None else (bias_values.to(dt) if bias_values is not None else _randn((v,), gen, dt))
    t = target if target is not None else torch.randint(0, v, lead, generator=gen)
    return x, w, t, b


def ce_confident(problem, gen, margin: float = 12.0) -> tuple:
    """A well-trained head: every token's target logit about ``margin`` above the rest (p(target) ~ 1 - 1e-4:
    the gradient is the small difference of p and the one-hot target)."""
    (x_shape, (v, e), lead, _), dt = problem.shapes, problem.torch_dtype
    w = torch.randn(v, e, generator=gen)
    w = w / w.norm(dim=1, keepdim=True)
    t = torch.randint(0, v, lead, generator=gen)
    x = margin * w[t] + 0.3 * torch.randn(x_shape, generator=gen)
    return x.to(dt), w.to(dt), t, None


def ce_cases(dtype: str, config: str) -> list:
    from contract_check import Upstream

    gen = torch.Generator().manual_seed(5)
    lead, v, e = (37,), 300, 48
    out = []
    pm30 = 30.0 * torch.where(torch.rand(v, generator=gen) < 0.5, -1.0, 1.0)  # logits near +30 and -30
    for reduction in ("mean", "none"):
        p = ce_problem(dtype, lead, v, e, reduction=reduction, label_smoothing=0.1, z_loss=1e-3)
        out.append((f"logits-pm30-{reduction}", p, ce_inputs(p, gen, w_scale=0.5 * e**-0.5, bias_values=pm30),
                    Upstream()))
    p = ce_problem(dtype, lead, v, e, label_smoothing=0.1, z_loss=1e-3)
    one = torch.full(lead, IGNORE)
    one[17] = 42
    out.append(("ignore-all-but-one", p, ce_inputs(p, gen, target=one), Upstream()))
    for reduction in ("mean", "sum"):
        p = ce_problem(dtype, lead, v, e, reduction=reduction, label_smoothing=0.1, z_loss=1e-3)
        out.append((f"ignore-all-{reduction}", p, ce_inputs(p, gen, target=torch.full(lead, IGNORE)), Upstream()))
    p = ce_problem(dtype, lead, v, e, bias=False)
    out.append(("confident-head", p, ce_confident(p, gen), Upstream(value=32768.0)))
    if dtype != "float16":
        return out  # the rest probe fp16's range
    p = ce_problem(dtype, lead, v, e)
    out.append(("gradscaler-65536", p, ce_inputs(p, gen), Upstream(value=65536.0)))
    out.append(("x-at-half-fp16-max", p, ce_inputs(p, gen, x_scale=FP16_HALF_MAX / 4, w_scale=4 / FP16_HALF_MAX),
                Upstream()))
    return out


# ------------------------------------------------------------------------------------------ patch embed
def patch_problem(dtype: str, b: int, c: int, h: int, w: int, p: int, e: int, *, images_grad: bool = True,
                  uint8: bool = False):
    """uint8: uint8 images under the model's normalization (``pixel_affine``), which need no gradient."""
    from aimkern.data.decode import pixel_affine

    n = (h // p) * (w // p)
    scale, shift = pixel_affine(c) if uint8 else (None, None)
    return make_problem("patch_embed", dtype, ((b, c, h, w), (e, c, p, p), (e,), (1, n, e)),
                        dict(input_scale=scale, input_shift=shift), (images_grad and not uint8, True, True, True),
                        ("uint8" if uint8 else None, None, None, None))


def patch_inputs(problem, gen, *, images_max=None, weight_scale=None, offsets_max=None, pixels=None) -> tuple:
    """images, weight, bias, pos_embed: normal (weight times K**-0.5), or uniform up to ``images_max`` /
    ``offsets_max`` (bias and pos_embed) where given; uint8 images uniform in [0, 255], or all ``pixels``
    where given (an int, or a (B, C, H, W) pattern)."""
    (i_shape, w_shape, b_shape, p_shape), dt = problem.shapes, problem.torch_dtype
    k = w_shape[1] * w_shape[2] * w_shape[3]
    if problem.dtype_of(0) == torch.uint8:
        images = (torch.randint(0, 256, i_shape, generator=gen) if pixels is None
                  else torch.as_tensor(pixels).expand(i_shape)).to(torch.uint8).contiguous()
    else:
        images = _uniform(i_shape, gen, dt, images_max) if images_max else _randn(i_shape, gen, dt)
    weight = _randn(w_shape, gen, dt, weight_scale or k**-0.5)
    if offsets_max:
        return images, weight, _uniform(b_shape, gen, dt, offsets_max), _uniform(p_shape, gen, dt, offsets_max)
    return images, weight, _randn(b_shape, gen, dt), _randn(p_shape, gen, dt)


def patch_cases(dtype: str, config: str) -> list:
    """uint8 images at the ends of their range (0 everywhere, 255 everywhere, a 0 / 255 checkerboard: every
    normalized input at its most negative or most positive value), then fp16's range."""
    from contract_check import Upstream

    gen = torch.Generator().manual_seed(9)
    u8 = patch_problem(dtype, 3, 3, 12, 20, 4, 40, uint8=True)
    board = (torch.arange(12).view(12, 1) + torch.arange(20)) % 2 * 255
    out = [(f"uint8-{name}", u8, patch_inputs(u8, gen, pixels=value), Upstream())
           for name, value in (("all-0", 0), ("all-255", 255), ("checkerboard-0-255", board))]
    p = patch_problem(dtype, 2, 3, 12, 20, 4, 40)
    k = 3 * 4 * 4
    if dtype != "float16":
        return out  # the rest probe fp16's range
    return out + [
        ("images-at-half-fp16-max", p, patch_inputs(p, gen, images_max=FP16_HALF_MAX,
                                                    weight_scale=1.0 / (FP16_HALF_MAX * k)), Upstream(scale=2.0**-8)),
        ("bias-and-pos-at-quarter-fp16-max", p, patch_inputs(p, gen, offsets_max=FP16_HALF_MAX / 2), Upstream()),
        ("gradscaler-upstream", p, patch_inputs(p, gen), Upstream(scale=256.0)),
    ]


# ------------------------------------------------------------------------------------------- pixel loss
def pixel_problem(dtype: str, b: int, c: int, h: int, w: int, p: int, *, prefix: bool = True, **options):
    opts = dict(patch_size=p, offset=1, norm_pix=True, eps=1e-6)
    opts.update(options)
    n = (h // p) * (w // p)
    return make_problem("next_patch_pixel_loss", dtype, ((b, n, p * p * c), (b, c, h, w), (b,) if prefix else None),
                        opts, (True, False, False), (None, None, "int32"))


def _patchwise(values: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, GH, GW) -> (B, C, GH * p, GW * p): each value fills its p x p patch."""
    return values.repeat_interleave(p, dim=2).repeat_interleave(p, dim=3)


def pixel_cases(dtype: str, config: str) -> list:
    from contract_check import Upstream

    gen = torch.Generator().manual_seed(13)
    dt = getattr(torch, dtype)
    b, c, h, w, p = 2, 3, 12, 20, 4
    prob = pixel_problem(dtype, b, c, h, w, p)
    prefix = torch.tensor([2, 0], dtype=torch.int32)
    pred = _randn(prob.shapes[0], gen, dt)
    const = _patchwise(torch.rand(b, 1, h // p, w // p, generator=gen).expand(b, c, h // p, w // p), p)
    near = const + 1e-3 * torch.randn(const.shape, generator=gen)
    out = [
        ("constant-patches", prob, (pred, const.to(dt), prefix), Upstream()),
        ("near-constant-patches", prob, (pred, near.to(dt), prefix), Upstream()),
    ]
    if dtype != "float16":
        return out  # the rest probe fp16's range
    return out + [
        ("pred-at-half-fp16-max", prob, (_uniform(prob.shapes[0], gen, dt, FP16_HALF_MAX),
                                         _randn(prob.shapes[1], gen, dt), prefix), Upstream()),
        ("gradscaler-65536", prob, (pred, _randn(prob.shapes[1], gen, dt), prefix), Upstream(value=65536.0)),
    ]


# -------------------------------------------------------------------------------------- varlen (packed)
def _cu(lengths) -> torch.Tensor:
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)


def varlen_problem(dtype: str, lengths, h: int, d: int, *, block: bool = True, prefix: bool = True, **options):
    t, s = sum(lengths), len(lengths)
    q = (t, h, d)
    return make_problem("attention_varlen", dtype, (q, q, q, (s + 1,), (s,) if block else None,
                                                    (s,) if prefix else None),
                        options, (True, True, True, False, False, False), (None, None, None, "int32", "int32", "int32"))


def varlen_cases(dtype: str, config: str) -> list:
    """Packs that probe the sequence bounds: only length-1 and empty sequences (every row its own softmax of
    one key), and peaked scores (q, k scaled by 6: one key takes nearly all the weight) across a tail."""
    from contract_check import Upstream

    gen = torch.Generator().manual_seed(19)
    dt = getattr(torch, dtype)
    ones = [1, 1, 0, 1, 1]
    p1 = varlen_problem(dtype, ones, 2, 16, is_causal=True)
    t1 = (*(_randn(p1.shapes[0], gen, dt) for _ in range(3)), _cu(ones), torch.tensor([1, 2, 1, 3, 1], dtype=torch.int32),
          torch.tensor([0, 1, 0, 1, 0], dtype=torch.int32))
    mixed = [3, 70, 9]
    p2 = varlen_problem(dtype, mixed, 1, 16, is_causal=True)
    t2 = (_randn(p2.shapes[0], gen, dt, scale=6.0), _randn(p2.shapes[0], gen, dt, scale=6.0),
          _randn(p2.shapes[0], gen, dt), _cu(mixed), torch.tensor([1, 7, 2], dtype=torch.int32),
          torch.tensor([3, 10, 0], dtype=torch.int32))
    return [("one-token-sequences", p1, t1, Upstream()), ("peaked-scores", p2, t2, Upstream())]


def pixel_varlen_problem(dtype: str, lengths, d: int, *, patches: Optional[str] = None, **options):
    t, s = sum(lengths), len(lengths)
    return make_problem("next_patch_pixel_loss_varlen", dtype, ((t, d), (t, d), (s + 1,), (s,)), options,
                        (True, False, False, False), (None, patches, "int32", "int32"))


def pixel_varlen_cases(dtype: str, config: str) -> list:
    """Constant uint8 patches (zero variance: eps alone normalizes), and a pack where no target counts."""
    from contract_check import Upstream

    gen = torch.Generator().manual_seed(23)
    dt = getattr(torch, dtype)
    lengths = [5, 1, 8]
    prob = pixel_varlen_problem(dtype, lengths, 48, patches="uint8")
    const = (torch.rand(14, 1, generator=gen) * 255).to(torch.uint8).expand(14, 48).contiguous()
    pred = _randn(prob.shapes[0], gen, dt)
    return [
        ("constant-patches", prob, (pred, const, _cu(lengths), torch.tensor([1, 0, 2], dtype=torch.int32)),
         Upstream()),
        ("no-target-counts", prob, (pred, const, _cu(lengths), torch.tensor([5, 1, 8], dtype=torch.int32)),
         Upstream()),
    ]


# ------------------------------------------------------------------------------------------ small cases
def small_cases(op: str, dtype: str) -> list:
    """(label, problem, tensors) of plain random values, small and ragged (cheap under the interpreter), every
    tensor argument present: what the layout and autograd-mode tests run."""
    gen = torch.Generator().manual_seed(17)
    dt = getattr(torch, dtype)
    if op == "attention":
        shape = (2, 1, 21, 16)
        p = attention_problem(dtype, shape, prefix=True, is_causal=True, block_size=3)
        return [("prefix-block3", p, (*(_randn(shape, gen, dt) for _ in range(3)),
                                      torch.tensor([5, 13], dtype=torch.int32)))]
    if op == "linear_cross_entropy":
        out = []
        for reduction, z in (("mean", 1e-3), ("none", 0.0)):  # (torch's fused candidate has no z-loss)
            p = ce_problem(dtype, (2, 11), 150, 40, reduction=reduction, label_smoothing=0.1, z_loss=z)
            x, w, t, b = ce_inputs(p, gen)
            t.view(-1)[::7] = IGNORE
            out.append((reduction, p, (x, w, t, b)))
        return out
    if op == "patch_embed":
        p = patch_problem(dtype, 2, 3, 12, 20, 4, 40)
        u8 = patch_problem(dtype, 2, 3, 12, 20, 4, 40, uint8=True)
        return [("bias-pos", p, patch_inputs(p, gen)), ("uint8-bias-pos", u8, patch_inputs(u8, gen))]
    if op == "next_patch_pixel_loss":
        p = pixel_problem(dtype, 2, 3, 12, 20, 4, offset=2)
        return [("prefix-offset2", p, (_randn(p.shapes[0], gen, dt), _randn(p.shapes[1], gen, dt),
                                       torch.tensor([3, 9], dtype=torch.int32)))]
    if op == "attention_varlen":
        lengths = [1, 13, 7]
        p = varlen_problem(dtype, lengths, 1, 16, is_causal=True)
        return [("prefix-blocks", p, (*(_randn(p.shapes[0], gen, dt) for _ in range(3)), _cu(lengths),
                                      torch.tensor([1, 3, 2], dtype=torch.int32),
                                      torch.tensor([1, 5, 0], dtype=torch.int32)))]
    if op == "next_patch_pixel_loss_varlen":
        lengths = [6, 1, 9]
        p = pixel_varlen_problem(dtype, lengths, 48, patches="uint8", offset=2)
        patches = (torch.rand(16, 48, generator=gen) * 255).to(torch.uint8)
        return [("prefix-offset2", p, (_randn(p.shapes[0], gen, dt), patches, _cu(lengths),
                                       torch.tensor([1, 0, 2], dtype=torch.int32)))]
    raise KeyError(op)


HOSTILE = {"attention": attention_cases, "linear_cross_entropy": ce_cases, "patch_embed": patch_cases,
           "next_patch_pixel_loss": pixel_cases, "attention_varlen": varlen_cases,
           "next_patch_pixel_loss_varlen": pixel_varlen_cases}


def hostile(op: str, dtype: str, config: str) -> list:
    """(name, problem, tensors, Upstream) cases of ``op``'s hostile values in ``dtype``: the cases about
    fp16's range (half its maximum, a GradScaler's scale) in fp16 only."""
    return HOSTILE[op](dtype, config)


def hostile_names(op: str, dtype: str) -> list:
    return [name for name, *_ in hostile(op, dtype, "interp")]
