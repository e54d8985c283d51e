"""The packed pixel loss's reference (aimkern.reference.pixel_loss_varlen) against the dense reference run on
each image alone: packing changes nothing but the weighting, which is by counted targets over the pack."""
import pytest
import torch

from aimkern.data.packing import pack_images
from aimkern.reference.pixel_loss import counted_targets, next_patch_pixel_loss_reference
from aimkern.reference.pixel_loss_varlen import next_patch_pixel_loss_varlen_reference

P = 4
SIZES = [(8, 12), (4, 4), (16, 8), (4, 8)]  # 6, 1, 8, 2 patches


def _images(dtype=torch.float64):
    return [torch.rand(3, h, w, dtype=dtype) * 255 for h, w in SIZES]


def per_image_loop(pred, ims, cu, offset, prefixes, norm_pix):
    """sum_i dense_loss(image i) * counted_i / sum_i counted_i."""
    total, count = 0.0, 0
    for i, im in enumerate(ims):
        a, b = int(cu[i]), int(cu[i + 1])
        prefix = None if prefixes is None else torch.tensor([prefixes[i]])
        loss = next_patch_pixel_loss_reference(pred[None, a:b], im[None], patch_size=P, offset=offset,
                                               prefix_len=prefix, norm_pix=norm_pix)
        n = int(counted_targets(1, b - a, offset, prefix)[0])
        total, count = total + loss * n, count + n
    return total / max(count, 1)


@pytest.mark.parametrize("norm_pix", [True, False])
@pytest.mark.parametrize("offset,prefixes", [(1, None), (1, [2, 0, 8, 1]), (3, [0, 1, 5, 0])])
def test_varlen_loss_equals_the_per_image_dense_loss(offset, prefixes, norm_pix):
    ims = _images()
    pack = pack_images(ims, P, prefix_len=prefixes)
    pred = torch.randn(pack.num_tokens, P * P * 3, dtype=torch.float64, requires_grad=True)
    got = next_patch_pixel_loss_varlen_reference(pred, pack.patches, pack.cu_seqlens, offset=offset,
                                                 prefix_len=pack.prefix_len, norm_pix=norm_pix)
    want = per_image_loop(pred, ims, pack.cu_seqlens, offset, prefixes, norm_pix)
    torch.testing.assert_close(got, want)
    g_got, = torch.autograd.grad(got, pred)
    g_want, = torch.autograd.grad(want, pred)
    torch.testing.assert_close(g_got, g_want)


def test_no_prediction_crosses_a_boundary():
    """The last `offset` rows of every sequence predict nothing (their gradient is exactly 0), and a
    sequence's loss terms do not move when another sequence's patches change."""
    ims = _images()
    pack = pack_images(ims, P)
    pred = torch.randn(pack.num_tokens, P * P * 3, dtype=torch.float64, requires_grad=True)
    offset = 2
    loss = next_patch_pixel_loss_varlen_reference(pred, pack.patches, pack.cu_seqlens, offset=offset)
    grad, = torch.autograd.grad(loss, pred)
    for s in range(len(ims)):
        a, b = int(pack.cu_seqlens[s]), int(pack.cu_seqlens[s + 1])
        assert grad[max(a, b - offset):b].abs().max().item() == 0.0
        if b - a > offset:
            assert grad[a:b - offset].abs().max().item() > 0
    patches = pack.patches.clone()
    patches[:6] = torch.rand(6, P * P * 3, dtype=torch.float64)  # image 0 only
    moved, = torch.autograd.grad(
        next_patch_pixel_loss_varlen_reference(pred, patches, pack.cu_seqlens, offset=offset), pred)
    assert torch.equal(moved[6:], grad[6:])


def test_all_prefix_counts_nothing():
    ims = _images()
    pack = pack_images(ims, P, prefix_len=[6, 1, 8, 2])
    pred = torch.randn(pack.num_tokens, P * P * 3, dtype=torch.float64, requires_grad=True)
    loss = next_patch_pixel_loss_varlen_reference(pred, pack.patches, pack.cu_seqlens, prefix_len=pack.prefix_len)
    assert loss.item() == 0.0
    assert torch.autograd.grad(loss, pred)[0].abs().max().item() == 0.0


def test_uint8_patches_are_their_values():
    ims = [im.round().to(torch.uint8) for im in _images()]
    pack = pack_images(ims, P)
    pred = torch.randn(pack.num_tokens, P * P * 3)
    as_uint8 = next_patch_pixel_loss_varlen_reference(pred, pack.patches, pack.cu_seqlens)
    as_float = next_patch_pixel_loss_varlen_reference(pred, pack.patches.float(), pack.cu_seqlens)
    assert as_uint8.dtype == torch.float32
    torch.testing.assert_close(as_uint8, as_float)


def test_bad_cu_seqlens():
    pred = torch.zeros(5, 48)
    with pytest.raises(ValueError, match="cu_seqlens"):
        next_patch_pixel_loss_varlen_reference(pred, pred, torch.tensor([0, 3, 4], dtype=torch.int32))
