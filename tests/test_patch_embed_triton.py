"""aimkern.patch_embed, Triton backend: outputs and every gradient against float64 references.

Runs under Triton's interpreter on CPU (fp32, fp16) and compiled on CUDA (plus bf16). Tolerances are
relative to the same-dtype PyTorch error (tests/tolerances.py).
"""
from __future__ import annotations

import importlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import aimkern
from aimkern.nn import PatchEmbed
from aimkern.reference.patch_embed import patch_embed_reference

from conftest import HAS_CUDA, requires_cuda
from tolerances import assert_close_relative

DEV = "cuda" if HAS_CUDA else "cpu"
ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
NAMES = ("images", "weight", "bias", "pos_embed")


def make_inputs(b, c, h, w, p, e, dtype, *, bias=True, pos="1NE", pos_dtype=None, images_grad=True):
    """Leaf tensors (images, weight, bias, pos_embed) in ``dtype``; weight scaled so outputs are O(1)."""
    n = (h // p) * (w // p)
    images = torch.randn(b, c, h, w, device=DEV, dtype=dtype)
    weight = (torch.randn(e, c, p, p, device=DEV) * (c * p * p) ** -0.5).to(dtype)
    bias_t = torch.randn(e, device=DEV, dtype=dtype) if bias else None
    pos_t = None
    if pos is not None:
        shape = (1, n, e) if pos == "1NE" else (n, e)
        pos_t = torch.randn(shape, device=DEV, dtype=pos_dtype or dtype)
    for t in (weight, bias_t, pos_t):
        if t is not None:
            t.requires_grad_()
    return [images.requires_grad_(images_grad), weight, bias_t, pos_t]


def run(fn, inputs, grad_out=None):
    """(output, gradients of the inputs that require grad, in NAMES order with None elsewhere)."""
    out = fn(*inputs)
    if grad_out is None:
        grad_out = torch.randn_like(out)
    wanted = [t for t in inputs if t is not None and t.requires_grad]
    grads = iter(torch.autograd.grad(out, wanted, grad_out))
    return out, [next(grads) if t is not None and t.requires_grad else None for t in inputs], grad_out


def check_against_references(inputs, fn=None, grad_out=None):
    """Triton (``fn``) vs the same-dtype reference vs the float64 reference: output and every gradient."""
    fn = fn or (lambda *a: aimkern.patch_embed(*a, backend="triton"))
    out, grads, grad_out = run(fn, inputs, grad_out)
    out_t, grads_t, _ = run(patch_embed_reference, inputs, grad_out)
    inputs64 = [t.detach().double().requires_grad_(t.requires_grad) if t is not None else None for t in inputs]
    out64, grads64, _ = run(patch_embed_reference, inputs64, grad_out.double())
    atol = ATOL[inputs[0].dtype]
    assert out.dtype == out_t.dtype
    assert_close_relative(out, out_t, out64, name="output", atol=atol)
    for name, g, g_t, g64, t in zip(NAMES, grads, grads_t, grads64, inputs):
        if t is None or not t.requires_grad:
            assert g is None
            continue
        assert g.dtype == t.dtype and g.shape == t.shape, name
        assert_close_relative(g, g_t, g64, name=f"d{name}", atol=atol)


SHAPES = [  # (B, C, H, W, P, E): any C, P that is not a power of two, K = C*P*P not a power of two, H != W
    (2, 3, 32, 40, 4, 64),
    (3, 1, 10, 15, 5, 24),  # B = 3: an image chunk of the dW kernel loops over two images
    (1, 4, 28, 14, 14, 40),
    (2, 3, 32, 16, 16, 64),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_fp32_all_gradients(shape):
    check_against_references(make_inputs(*shape, torch.float32))


@pytest.mark.parametrize(
    "bias,pos,images_grad",
    [(False, None, False), (True, "NE", False), (False, "1NE", True), (True, None, True)],
)
def test_optional_parts(bias, pos, images_grad):
    inputs = make_inputs(2, 3, 12, 20, 4, 40, torch.float32, bias=bias, pos=pos, images_grad=images_grad)
    check_against_references(inputs)


@pytest.mark.parametrize("shape", [(2, 3, 32, 40, 4, 64), (1, 4, 28, 14, 14, 40)], ids=lambda s: "x".join(map(str, s)))
def test_fp16(shape):
    check_against_references(make_inputs(*shape, torch.float16))


def test_fp16_images_with_fp32_pos_embed():
    # CausalViT keeps pos_embed in fp32; the kernel adds it in fp32 and returns d(pos) in fp32.
    check_against_references(make_inputs(2, 3, 16, 20, 4, 32, torch.float16, pos_dtype=torch.float32))


def test_only_bias_and_pos_need_grad():
    """The dW-free path (WANT_W off) still gives db and d(pos)."""
    images, weight, bias, pos = make_inputs(2, 3, 16, 12, 4, 24, torch.float32, images_grad=False)
    check_against_references([images, weight.detach(), bias, pos])


# ------------------------------------------------------------------ uint8 images, normalized in the kernels
def uint8_inputs(b, c, h, w, p, e, dtype, pixels=None, **kw):
    """make_inputs with uint8 images (uniform in [0, 255], or ``pixels`` everywhere)."""
    inputs = make_inputs(b, c, h, w, p, e, dtype, images_grad=False, **kw)
    g = torch.Generator().manual_seed(b * 1000 + h * w)
    img = torch.randint(0, 256, (b, c, h, w), generator=g) if pixels is None else torch.full((b, c, h, w), pixels)
    return [img.to(device=DEV, dtype=torch.uint8)] + inputs[1:]


def check_uint8(inputs, scale, shift):
    """Triton on uint8 images vs the reference in the weight's dtype and in float64 (the reference normalizes
    first: ``normalized_images``): output, dW, db, d(pos)."""
    norm = dict(input_scale=scale, input_shift=shift)
    out, grads, grad_out = run(lambda *a: aimkern.patch_embed(*a, **norm, backend="triton"), inputs)
    ref = lambda *a: patch_embed_reference(*a, scale, shift)  # noqa: E731
    out_t, grads_t, _ = run(ref, inputs, grad_out)
    inputs64 = [inputs[0]] + [t.detach().double().requires_grad_(t.requires_grad) if t is not None else None
                              for t in inputs[1:]]
    out64, grads64, _ = run(ref, inputs64, grad_out.double())
    atol = ATOL[inputs[1].dtype]
    assert out.dtype == inputs[1].dtype and grads[0] is None
    assert_close_relative(out, out_t, out64, name="output", atol=atol)
    for name, g, g_t, g64, t in list(zip(NAMES, grads, grads_t, grads64, inputs))[1:]:
        if t is not None:
            assert g.dtype == t.dtype and g.shape == t.shape, name
            assert_close_relative(g, g_t, g64, name=f"d{name}", atol=atol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(3, 3, 12, 20, 4, 40), (2, 1, 10, 15, 5, 24)], ids=lambda s: "x".join(map(str, s)))
def test_uint8_images_against_float64(shape, dtype):
    from aimkern.data.decode import pixel_affine

    check_uint8(uint8_inputs(*shape, dtype), *pixel_affine(shape[1]))


@pytest.mark.parametrize("pixels", [0, 255])
def test_uint8_images_at_the_ends_of_the_range_with_raw_values(pixels):
    """Every pixel 0 or 255, normalized by the model's affine and taken raw (scale 1, shift 0: inputs of 255)."""
    from aimkern.data.decode import pixel_affine

    check_uint8(uint8_inputs(2, 3, 8, 12, 4, 16, torch.float16, pixels=pixels), *pixel_affine(3))
    check_uint8(uint8_inputs(2, 3, 8, 12, 4, 16, torch.float32, pixels=pixels), (1.0,) * 3, (0.0,) * 3)


@pytest.mark.skipif(HAS_CUDA, reason="the GPU runs these tilings natively")
def test_uint8_tokens_and_pixels_past_the_tiles(monkeypatch, cuda_configs):
    """M = 130 tokens (two 64-row tiles and a tail of 2), K = 75 (K tiles of 32 that straddle channels), E = 72
    (an E tail), N = 65 per image (two dW token blocks of 32 and one token), under the interpreter's tables,
    then the GPU's fixed ones with its batch split of the dW partials."""
    from aimkern.data.decode import pixel_affine
    from aimkern.kernels import patch_embed as kern

    inputs = uint8_inputs(2, 3, 325, 5, 5, 72, torch.float32, pos="NE")
    check_uint8(inputs, *pixel_affine(3))
    op = importlib.import_module("aimkern.ops.patch_embed")
    monkeypatch.setattr(op, "interpreting", lambda: False)
    cuda_configs(kern, "forward", "backward_params")
    check_uint8(inputs, *pixel_affine(3))


def test_uint8_arguments_are_checked():
    from aimkern.data.decode import pixel_affine

    images, weight, bias, pos = uint8_inputs(1, 3, 8, 8, 4, 16, torch.float32)
    scale, shift = pixel_affine(3)
    for kw, err, match in [
        ({}, ValueError, "uint8 images need input_scale"),
        (dict(input_scale=scale), ValueError, "go together"),
        (dict(input_scale=scale[:2], input_shift=shift), ValueError, "C=3"),
        (dict(input_scale=torch.tensor(scale), input_shift=shift), TypeError, "tuple"),
        (dict(input_scale=(1.0, True, 1.0), input_shift=shift), TypeError, "floats"),
        (dict(input_scale=scale, input_shift=(0.0, float("inf"), 0.0)), ValueError, "finite"),
    ]:
        for backend in ("triton", "reference"):
            with pytest.raises(err, match=match):
                aimkern.patch_embed(images, weight, bias, pos, **kw, backend=backend)
    with pytest.raises(ValueError, match="normalize uint8 images"):
        aimkern.patch_embed(images.float(), weight, input_scale=scale, input_shift=shift)
    with pytest.raises(TypeError, match="bias"):
        aimkern.patch_embed(images, weight, bias.detach().half(), input_scale=scale, input_shift=shift,
                            backend="triton")
    with pytest.raises(TypeError, match="images"):
        aimkern.patch_embed(images.to(torch.int32), weight, input_scale=scale, input_shift=shift)


def test_uint8_images_under_torch_compile():
    """fullgraph: the affine travels as constant floats into the custom op; forward and dW match eager."""
    from aimkern.data.decode import pixel_affine

    images, weight, bias, pos = uint8_inputs(2, 3, 8, 12, 4, 16, torch.float32)
    scale, shift = pixel_affine(3)

    def f(w):
        return aimkern.patch_embed(images, w, bias.detach(), pos.detach(), input_scale=scale, input_shift=shift,
                                   backend="triton")

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="inductor" if HAS_CUDA else "aot_eager")
    w1, w2 = weight.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    out_c, out_e = compiled(w1), f(w2)
    torch.testing.assert_close(out_c, out_e)
    out_c.square().sum().backward()
    out_e.square().sum().backward()
    torch.testing.assert_close(w1.grad, w2.grad)


def test_dtype_mismatch_is_a_type_error():
    images, weight, bias, pos = make_inputs(1, 3, 8, 8, 4, 16, torch.float32)
    with pytest.raises(TypeError, match="weight"):
        aimkern.patch_embed(images, weight.detach().half(), bias, pos, backend="triton")
    with pytest.raises(TypeError, match="bias"):
        aimkern.patch_embed(images, weight, bias.detach().half(), pos, backend="triton")


@pytest.mark.parametrize("norm", [False, True])
def test_patch_embed_module_matches_reference_backend(norm):
    """aimkern.nn.PatchEmbed: timm state-dict names, Triton and reference backends agree, gradients too."""
    torch.manual_seed(1)
    kw = dict(patch_size=4, in_chans=3, dim=32, norm_layer=torch.nn.LayerNorm(32) if norm else None)
    tri = PatchEmbed(backend="triton", **kw).to(DEV)
    ref = PatchEmbed(backend="reference", **kw).to(DEV)
    assert {"proj.weight", "proj.bias"} <= set(tri.state_dict())
    ref.load_state_dict(tri.state_dict())
    images = torch.randn(2, 3, 12, 16, device=DEV)
    pos = torch.randn(1, 12, 32, device=DEV)
    out_t, out_r = tri(images, pos), ref(images, pos)
    torch.testing.assert_close(out_t, out_r, rtol=1e-4, atol=1e-4)
    g = torch.randn_like(out_t)
    out_t.backward(g)
    out_r.backward(g)
    for (name, pt), pr in zip(tri.named_parameters(), ref.parameters()):
        torch.testing.assert_close(pt.grad, pr.grad, rtol=1e-4, atol=1e-4, msg=name)


@pytest.mark.skipif(HAS_CUDA, reason="the GPU runs these tilings natively")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gpu_tilings_under_interpreter(monkeypatch, cuda_configs, dtype):
    """The CUDA launch configs (fixed small-GEMM tiles, the dW tiling and split) computed in the interpreter."""
    from aimkern.kernels import patch_embed as kern

    op = importlib.import_module("aimkern.ops.patch_embed")  # the module (aimkern.ops.patch_embed is shadowed)
    monkeypatch.setattr(op, "interpreting", lambda: False)  # the GPU's batch split of the dW partials
    cuda_configs(kern, "forward", "backward_images", "backward_params")
    check_against_references(make_inputs(3, 3, 12, 20, 4, 40, dtype))


@settings(max_examples=12)
@given(
    b=st.integers(1, 3),
    c=st.sampled_from([1, 3, 4]),
    p=st.sampled_from([2, 3, 4, 5]),
    gh=st.integers(1, 5),
    gw=st.integers(1, 5),
    e=st.sampled_from([8, 24, 40]),
    bias=st.booleans(),
    pos=st.sampled_from([None, "NE", "1NE"]),
    images_grad=st.booleans(),
    half=st.booleans(),
)
def test_fuzz(b, c, p, gh, gw, e, bias, pos, images_grad, half):
    dtype = torch.float16 if half else torch.float32
    inputs = make_inputs(b, c, gh * p, gw * p, p, e, dtype, bias=bias, pos=pos, images_grad=images_grad)
    check_against_references(inputs)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_vit_size(dtype):
    """ViT-B/16 geometry on the GPU (bf16 needs real tensor cores; the interpreter's bf16 dot is wrong)."""
    check_against_references(make_inputs(8, 3, 224, 224, 16, 768, dtype))
    check_against_references(make_inputs(4, 3, 224, 160, 14, 384, dtype, bias=False, pos="NE"))


# ------------------------------------------------------- inputs that once gave silent wrong results
@pytest.mark.skipif(HAS_CUDA, reason="the interpreter's bf16 tl.dot is what is refused")
def test_bf16_under_the_interpreter_is_refused():
    images, weight, bias, pos = make_inputs(1, 3, 8, 8, 4, 16, torch.float32)
    with pytest.raises(TypeError, match="bfloat16"):
        aimkern.patch_embed(images.bfloat16(), weight.bfloat16(), backend="triton")
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(TypeError, match="bfloat16"):
        aimkern.patch_embed(images, weight, bias, pos, backend="triton")
    from aimkern.specs.patch_embed import SPEC
    from op_cases import EXAMPLES

    assert "bfloat16" in SPEC.candidate("triton").unsupported(EXAMPLES["patch_embed"]("bfloat16")[0])


@pytest.mark.parametrize("layout", ["strided", "expanded"])
def test_bias_and_pos_embed_in_any_layout_reach_the_kernel(layout):
    # The custom op is what torch.compile graphs and direct callers run: it reads bias and pos_embed through
    # their strides, so no caller has to copy them first.
    from aimkern.ops.patch_embed import PatchEmbedParams, patch_embed_fwd

    images, weight, bias, pos = (t.detach() if t is not None else None
                                 for t in make_inputs(2, 3, 12, 8, 4, 24, torch.float32))
    if layout == "strided":
        bias_in = torch.stack([bias, -bias], dim=1)[:, 0]  # stride 2
        pos_in = torch.stack([pos, -pos], dim=-1)[..., 0]
    else:
        bias_in = bias[:1].expand(24)  # stride 0
        pos_in = pos[:, :1].expand(pos.shape)
    got = patch_embed_fwd(images, weight, bias_in, pos_in, PatchEmbedParams(), aimkern.ops.LaunchPolicy().autotune)
    want = patch_embed_reference(images.double(), weight.double(), bias_in.double(), pos_in.double())
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    check_against_references([images, weight.requires_grad_(), bias_in.clone().requires_grad_(), pos_in])
