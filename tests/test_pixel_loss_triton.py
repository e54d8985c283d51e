"""aimkern.next_patch_pixel_loss, Triton backend: loss and d(pred) against float64 references.

Runs under Triton's interpreter on CPU (fp32, fp16) and compiled on CUDA (plus bf16). Tolerances are
relative to the same-dtype PyTorch error (tests/tolerances.py).
"""
from __future__ import annotations


import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import aimkern
from aimkern.reference.pixel_loss import next_patch_pixel_loss_reference

from conftest import HAS_CUDA, requires_cuda
from tolerances import assert_close_relative

DEV = "cuda" if HAS_CUDA else "cpu"
GRAD_SCALE = 1.7  # d(loss) != 1, so a kernel that ignores the incoming gradient fails


def make_inputs(b, c, h, w, p, dtype):
    n = (h // p) * (w // p)
    images = torch.rand(b, c, h, w, device=DEV, dtype=dtype)  # pixel-like, non-zero mean
    pred = torch.randn(b, n, p * p * c, device=DEV, dtype=dtype).requires_grad_()
    return pred, images


def loss_and_grad(fn, pred, images, **kw):
    loss = fn(pred, images, **kw)
    (dpred,) = torch.autograd.grad(loss * GRAD_SCALE, pred)
    return loss, dpred


def triton_loss(pred, images, **kw):
    return aimkern.next_patch_pixel_loss(pred, images, backend="triton", **kw)


def reference_loss(pred, images, *, prefix_len=None, **kw):
    if isinstance(prefix_len, int):
        prefix_len = torch.full((pred.shape[0],), prefix_len, device=pred.device)
    return next_patch_pixel_loss_reference(pred, images, prefix_len=prefix_len, **kw)


def check_against_references(pred, images, fn=triton_loss, **kw):
    loss, dpred = loss_and_grad(fn, pred, images, **kw)
    loss_t, dpred_t = loss_and_grad(reference_loss, pred, images, **kw)
    pred64 = pred.detach().double().requires_grad_()
    loss64, dpred64 = loss_and_grad(reference_loss, pred64, images.double(), **kw)
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert dpred.dtype == pred.dtype and dpred.shape == pred.shape
    assert_close_relative(loss, loss_t, loss64, name="loss", atol=1e-6 * max(1.0, loss64.abs().item()))
    # d(pred) entries are ~ 1 / (P*P*C * count): the absolute slack scales with them.
    atol = 1e-4 * dpred64.abs().max().item() + 1e-12
    assert_close_relative(dpred, dpred_t, dpred64, name="dpred", atol=atol)
    return loss64, dpred64


SHAPES = [  # (B, C, H, W, P): any C, P in {4, 5, 14, 16}, non-square images
    (2, 3, 32, 40, 4),
    (2, 1, 10, 15, 5),
    (1, 4, 28, 14, 14),
    (2, 3, 16, 48, 16),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("norm_pix", [True, False])
def test_fp32(shape, norm_pix):
    check_against_references(*make_inputs(*shape, torch.float32), patch_size=shape[-1], norm_pix=norm_pix)


@pytest.mark.parametrize("offset", [1, 2, 3, 4])
def test_offsets_with_per_sample_prefix(offset):
    pred, images = make_inputs(2, 3, 32, 40, 4, torch.float32)  # N = 80
    prefix = torch.tensor([0, 37], device=DEV)  # 0 (no prefix) and a prefix past the offset
    check_against_references(pred, images, patch_size=4, offset=offset, prefix_len=prefix)


@pytest.mark.parametrize("prefix_len", [0, 1, 5, "tensor"])
def test_prefix_forms(prefix_len):
    pred, images = make_inputs(2, 1, 10, 15, 5, torch.float32)  # N = 6
    if prefix_len == "tensor":
        # One sample with no target at all; a strided int32 view, as a sliced batch would pass it.
        prefix_len = torch.tensor([6, 0, 4, 0], device=DEV, dtype=torch.int32)[::2]
    check_against_references(pred, images, patch_size=5, offset=2, prefix_len=prefix_len)


@pytest.mark.parametrize("kw", [dict(prefix_len=6), dict(offset=6), dict(offset=9, prefix_len=0)])
def test_no_counted_target_gives_zero_loss_and_zero_grad(kw):
    pred, images = make_inputs(2, 1, 10, 15, 5, torch.float32)  # N = 6
    loss, dpred = loss_and_grad(triton_loss, pred, images, patch_size=5, **kw)
    assert loss.item() == 0.0 and torch.count_nonzero(dpred) == 0
    loss64, _ = check_against_references(pred, images, patch_size=5, **kw)
    assert loss64.item() == 0.0


def test_offset_zero_predicts_own_patch():
    pred, images = make_inputs(1, 3, 12, 8, 4, torch.float32)
    check_against_references(pred, images, patch_size=4, offset=0, prefix_len=1, norm_pix=False)


@pytest.mark.parametrize("shape", [(2, 3, 32, 40, 4), (1, 4, 28, 14, 14)], ids=lambda s: "x".join(map(str, s)))
def test_fp16(shape):
    pred, images = make_inputs(*shape, torch.float16)
    prefix = torch.tensor([1] * shape[0], device=DEV)
    check_against_references(pred, images, patch_size=shape[-1], offset=1, prefix_len=prefix)


def test_eps_matters():
    """A flat target patch (variance 0) is normalized through eps exactly as in the reference."""
    pred, images = make_inputs(2, 3, 8, 12, 4, torch.float32)
    images[:, :, :4, 4:8] = 0.25  # patch 1 is constant
    for eps in (1e-6, 0.5):
        check_against_references(pred, images, patch_size=4, eps=eps)






def test_images_requiring_grad_are_refused():
    pred, images = make_inputs(1, 3, 8, 8, 4, torch.float32)
    images.requires_grad_()
    with pytest.raises(ValueError, match="images"):
        triton_loss(pred, images, patch_size=4)
    with torch.no_grad():  # no gradient can flow: nothing to refuse
        loss = triton_loss(pred, images, patch_size=4)
    torch.testing.assert_close(loss, reference_loss(pred.detach(), images.detach(), patch_size=4))


def test_pred_without_grad():
    pred, images = make_inputs(2, 3, 8, 8, 4, torch.float32)
    loss = triton_loss(pred.detach(), images, patch_size=4)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, reference_loss(pred.detach(), images, patch_size=4))


@pytest.mark.skipif(HAS_CUDA, reason="the GPU runs this tiling natively")
def test_gpu_tiling_under_interpreter(cuda_configs):
    """The CUDA launch config (rows per program, block of values) computed in the interpreter."""
    from aimkern.kernels import pixel_loss as kern

    cuda_configs(kern, "loss")
    pred, images = make_inputs(2, 3, 16, 48, 16, torch.float32)
    check_against_references(pred, images, patch_size=16, prefix_len=torch.tensor([0, 1], device=DEV))


@settings(max_examples=12)
@given(
    b=st.integers(1, 2),
    c=st.sampled_from([1, 3, 4]),
    p=st.sampled_from([2, 3, 4, 5]),
    gh=st.integers(1, 5),
    gw=st.integers(1, 5),
    offset=st.integers(0, 4),
    prefix=st.one_of(st.none(), st.integers(0, 25)),
    norm_pix=st.booleans(),
    half=st.booleans(),
)
def test_fuzz(b, c, p, gh, gw, offset, prefix, norm_pix, half):
    pred, images = make_inputs(b, c, gh * p, gw * p, p, torch.float16 if half else torch.float32)
    prefix = None if prefix is None else min(prefix, gh * gw)
    check_against_references(pred, images, patch_size=p, offset=offset, prefix_len=prefix, norm_pix=norm_pix)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_aim_size(dtype):
    """AIM geometry on the GPU: 224 px, P = 14 and 16, per-sample prefixes."""
    for p in (14, 16):
        pred, images = make_inputs(8, 3, 224, 224, p, dtype)
        n = pred.shape[1]
        prefix = torch.randint(0, n, (8,), device=DEV)
        check_against_references(pred, images, patch_size=p, prefix_len=prefix)


@requires_cuda
def test_auto_backend_falls_back_to_reference_for_images_with_grad():
    pred, images = make_inputs(2, 3, 32, 32, 16, torch.float32)
    images.requires_grad_()
    loss = aimkern.next_patch_pixel_loss(pred, images, patch_size=16)  # auto: Triton cannot give dImages
    (dimages,) = torch.autograd.grad(loss, images)
    assert dimages.abs().sum() > 0


@pytest.mark.parametrize("layout", ["strided", "expanded", "offset"])
def test_prefix_tensor_in_any_layout_reaches_the_kernel(layout):
    # The custom op (what torch.compile graphs and direct callers run) reads prefix_len through its stride.
    from aimkern.ops.pixel_loss import PixelLossParams, pixel_loss_fwd

    pred, images = make_inputs(3, 1, 10, 15, 5, torch.float32)  # N = 6
    base = torch.tensor([1, 5, 0, 2, 4, 3], device=DEV, dtype=torch.int32)
    prefix = {"strided": base[::2], "expanded": base[1:2].expand(3), "offset": base[3:]}[layout]
    params, autotune = PixelLossParams(patch_size=5), aimkern.ops.LaunchPolicy().autotune
    got = pixel_loss_fwd(pred.detach(), images, prefix, params, autotune)
    want = reference_loss(pred.detach().double(), images.double(), patch_size=5, prefix_len=prefix.long())
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    check_against_references(pred, images, patch_size=5, prefix_len=prefix)
