"""The public ``aimkern.next_patch_pixel_loss_varlen``: the fused Triton kernel (interpreter on CPU) against
the float64 reference (loss and d(pred)), uint8 and float patches, prefixes, rows that predict across an
image boundary, strided inputs and the checks at the boundary."""
import pytest
import torch

import aimkern
from aimkern.ops._launch import interpreting
from tolerances import assert_close_relative

needs_interpreter = pytest.mark.skipif(not interpreting(), reason="the Triton path on CPU runs under the interpreter")
D = 48  # P = 4, C = 3


def pack(lengths, patch_dtype=torch.uint8, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = sum(lengths)
    raw = torch.rand(t, D, generator=g) * 255
    patches = raw.round().to(torch.uint8) if patch_dtype == torch.uint8 else raw.to(patch_dtype)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    return torch.randn(t, D, generator=g), patches, cu


def loss_and_grad(pred, patches, cu, dtype, backend, **kw):
    x = pred.to(dtype).requires_grad_()
    loss = aimkern.next_patch_pixel_loss_varlen(x, patches, cu, backend=backend, **kw)
    return loss, torch.autograd.grad(loss, x)[0]


@needs_interpreter
@pytest.mark.parametrize("patch_dtype", [torch.uint8, torch.float32], ids=["uint8", "fp32"])
@pytest.mark.parametrize("kw", [dict(), dict(offset=2, prefix_len=torch.tensor([0, 1, 3, 0, 9])),
                                dict(prefix_len=2, norm_pix=False)], ids=["plain", "offset2-prefix", "int-raw"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_triton_matches_float64_reference(dtype, kw, patch_dtype):
    """Lengths 1, 7, 13, 0 and 9 in one pack: one program's rows span several images."""
    pred, patches, cu = pack([1, 7, 13, 0, 9], patch_dtype)
    got = loss_and_grad(pred, patches, cu, dtype, "triton", **kw)
    ref = loss_and_grad(pred, patches.double() if patch_dtype != torch.uint8 else patches, cu, torch.float64,
                        "reference", **kw)
    same = loss_and_grad(pred, patches, cu, dtype, "reference", **kw)
    atol = 1e-5 if dtype == torch.float32 else 1e-3
    assert got[0].dtype == torch.float32 and got[1].dtype == dtype
    for name, g, s, r in zip(("loss", "dpred"), got, same, ref):
        # the floor scales with the values above 1 (the raw uint8 loss is ~2e4), as the spec's Tolerance does
        assert_close_relative(g, s, r, name=name, atol=atol * max(1.0, r.abs().max().item()))


@needs_interpreter
def test_no_row_predicts_across_a_boundary():
    """The last `offset` rows of each image predict nothing (zero gradient), and another image's patches
    change nothing of an image's gradient rows."""
    pred, patches, cu = pack([6, 5, 8], torch.float32)
    _, g = loss_and_grad(pred, patches, cu, torch.float32, "triton", offset=2)
    for end in (6, 11, 19):
        assert g[end - 2:end].abs().max().item() == 0.0 and g[end - 3].abs().max().item() > 0
    patches2 = patches.clone()
    patches2[6:11] = 0.0  # the second image's patches
    _, g2 = loss_and_grad(pred, patches2, cu, torch.float32, "triton", offset=2)
    # Rows of the first and third images only change through the shared mean's count (unchanged here).
    assert torch.equal(g[:6], g2[:6]) and torch.equal(g[11:], g2[11:])


@needs_interpreter
def test_no_target_counts_gives_zero_and_zero_gradient():
    pred, patches, cu = pack([3, 2], torch.float32)
    loss, g = loss_and_grad(pred, patches, cu, torch.float32, "triton", prefix_len=torch.tensor([3, 2]))
    assert loss.item() == 0.0 and g.abs().max().item() == 0.0


@needs_interpreter
def test_strided_pred_and_patches():
    pred, patches, cu = pack([4, 9], torch.float32)
    wide = torch.zeros(13, 2 * D)
    wide[:, ::2] = patches
    x = pred.t().contiguous().t()  # column-major pred
    a = aimkern.next_patch_pixel_loss_varlen(x, wide[:, ::2], cu, backend="triton")
    b = aimkern.next_patch_pixel_loss_varlen(pred, patches, cu, backend="triton")
    assert torch.equal(a, b)


def test_bad_inputs_name_the_argument():
    pred, patches, cu = pack([3, 4], torch.float32)
    cases = [
        ((pred[:, :8], patches, cu), {}, ValueError, "pred and patches"),
        ((pred, patches, cu.float()), {}, TypeError, "cu_seqlens"),
        ((pred, patches, torch.tensor([0, 3, 6], dtype=torch.int32)), {}, ValueError, "cu_seqlens"),
        ((pred, patches, cu), dict(prefix_len=torch.tensor([4, 0])), ValueError, "prefix_len"),
        ((pred, patches, cu), dict(prefix_len=torch.tensor([1])), ValueError, "prefix_len"),
        ((pred, patches, cu), dict(offset=-1), ValueError, "offset"),
        ((pred, patches.to(torch.int32), cu), {}, TypeError, "patches"),
        ((pred.long(), patches, cu), {}, TypeError, "pred"),
        ((pred, patches, cu), dict(max_seqlen=0), ValueError, "max_seqlen"),
        ((pred, patches, cu), dict(input_scale=(1.0, 1.0, 1.0), input_shift=(0.0,) * 3), ValueError, "uint8"),
        ((pred, patches.to(torch.uint8), cu), dict(input_scale=(1.0,) * 3), ValueError, "together"),
        ((pred, patches.to(torch.uint8), cu), dict(input_scale=(1.0,) * 5, input_shift=(0.0,) * 5), ValueError,
         "C floats"),
        ((pred, patches.to(torch.uint8), cu), dict(input_scale=(1.0, float("nan"), 1.0), input_shift=(0.0,) * 3),
         ValueError, "finite"),
        ((pred, patches.to(torch.uint8), cu), dict(input_scale=1.0, input_shift=0.0), ValueError, "C floats"),
        ((pred, patches, cu), dict(max_seqlen=True), ValueError, "max_seqlen"),
    ]
    for args, kw, exc, word in cases:
        with pytest.raises(exc, match=word):
            aimkern.next_patch_pixel_loss_varlen(*args, backend="reference", **kw)


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=needs_interpreter)])
def test_max_seqlen_reads_nothing_on_the_host(monkeypatch, backend):
    """With max_seqlen (a pack's host bound) the op skips its host read of cu_seqlens and prefix_len (a sync
    per training step on CUDA) and computes the same loss and gradient; without it, it reads them once."""
    from aimkern.specs import attention_varlen, pixel_loss_varlen

    pred, patches, cu = pack([5, 1, 9, 4])
    prefix = torch.tensor([2, 0, 3, 4])
    want = loss_and_grad(pred, patches, cu, torch.float32, backend, prefix_len=prefix)
    reads = []

    def counting(*args, **kw):
        reads.append(args)
        return attention_varlen.check_values(*args, **kw)

    monkeypatch.setattr(pixel_loss_varlen, "check_values", counting)
    got = loss_and_grad(pred, patches, cu, torch.float32, backend, prefix_len=prefix, max_seqlen=9)
    assert reads == []
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    loss_and_grad(pred, patches, cu, torch.float32, backend, prefix_len=prefix)
    assert len(reads) == 1


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=needs_interpreter)])
@pytest.mark.parametrize("norm_pix", [True, False], ids=["norm_pix", "raw"])
def test_input_affine_equals_the_normalized_copy(backend, norm_pix):
    """uint8 patches with the model's input normalization (pixel_affine) give the loss and d(pred) of the
    float32 copy normalized per channel beforehand (what the packed model passed before), within fp32
    rounding, and the float64 reference's within the op tolerance."""
    from aimkern.data.decode import pixel_affine

    pred, patches, cu = pack([5, 1, 9, 4])
    scale, shift = pixel_affine(3)
    copy = (patches.view(-1, D // 3, 3).float() * torch.tensor(scale) + torch.tensor(shift)).view(-1, D)
    kw = dict(prefix_len=torch.tensor([2, 0, 3, 1]), norm_pix=norm_pix)
    got = loss_and_grad(pred, patches, cu, torch.float32, backend, input_scale=scale, input_shift=shift, **kw)
    want = loss_and_grad(pred, copy, cu, torch.float32, backend, **kw)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-7)
    ref = loss_and_grad(pred, patches, cu, torch.float64, "reference", input_scale=scale, input_shift=shift, **kw)
    same = loss_and_grad(pred, patches, cu, torch.float32, "reference", input_scale=scale, input_shift=shift, **kw)
    for g, s, r in zip(got, same, ref):
        assert_close_relative(g, s, r)
