"""The reference ops against independent float64 formulations (they define correct for the kernels)."""
import pytest
import torch
import torch.nn.functional as F

import aimkern
from aimkern.reference import attention_mask

# ----------------------------------------------------------------------------------------- attention


def _mask_by_loops(n, is_causal, block_size, prefix):
    m = torch.zeros(len(prefix), 1, n, n, dtype=torch.bool)
    for b, pl in enumerate(prefix):
        for i in range(n):
            for j in range(n):
                m[b, 0, i, j] = j < pl or not is_causal or j // block_size <= i // block_size
    return m


@pytest.mark.parametrize("n", [1, 7, 37])
@pytest.mark.parametrize("is_causal,block_size", [(False, 1), (True, 1), (True, 3), (True, 5)])
@pytest.mark.parametrize("prefix", [None, [0, 0], [3, 7], [40, 2]])
def test_attention_reference_matches_sdpa_with_looped_mask(n, is_causal, block_size, prefix):
    if prefix is not None:
        prefix = [min(p, n) for p in prefix]
    q, k, v = (torch.randn(2, 3, n, 16, dtype=torch.float64) for _ in range(3))
    mask = _mask_by_loops(n, is_causal, block_size, prefix if prefix is not None else [0, 0])
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    pl = torch.tensor(prefix) if prefix is not None else None
    got = aimkern.attention(q, k, v, is_causal=is_causal, block_size=block_size, prefix_len=pl, backend="reference")
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    m = attention_mask(n, is_causal=is_causal, block_size=block_size, prefix_len=pl, batch=2)
    assert torch.equal(m, mask)


def test_attention_token_causal_equals_sdpa_is_causal():
    q, k, v = (torch.randn(2, 2, 13, 32, dtype=torch.float64) for _ in range(3))
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    got = aimkern.attention(q, k, v, is_causal=True, backend="reference")
    torch.testing.assert_close(got, want)


def test_attention_prefix_int_and_scale_and_noncontiguous():
    qkv = torch.randn(2, 9, 3, 2, 24, dtype=torch.float64)  # (B, N, 3, H, D) as a ViT block makes it
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    assert not q.is_contiguous()
    mask = _mask_by_loops(9, True, 1, [4, 4])
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3)
    got = aimkern.attention(q, k, v, is_causal=True, prefix_len=4, scale=0.3, backend="reference")
    torch.testing.assert_close(got, want)


def test_attention_gradients_flow():
    q, k, v = (torch.randn(1, 2, 7, 16, dtype=torch.float64, requires_grad=True) for _ in range(3))
    torch.autograd.gradcheck(
        lambda a, b, c: aimkern.attention(a, b, c, is_causal=True, block_size=2, prefix_len=3, backend="reference"),
        (q, k, v),
        fast_mode=True,
    )


def test_attention_half_precision_keeps_dtype():
    q, k, v = (torch.randn(1, 2, 5, 16, dtype=torch.float16) for _ in range(3))
    assert aimkern.attention(q, k, v, is_causal=True).dtype == torch.float16


# --------------------------------------------------------------------------------------- patch embed


@pytest.mark.parametrize("c,p,h,w", [(3, 4, 8, 12), (1, 5, 10, 5), (4, 2, 6, 6)])
@pytest.mark.parametrize("with_bias,with_pos", [(True, True), (False, False), (True, False)])
def test_patch_embed_reference_matches_conv2d(c, p, h, w, with_bias, with_pos):
    e = 10
    images = torch.randn(2, c, h, w, dtype=torch.float64)
    weight = torch.randn(e, c, p, p, dtype=torch.float64)
    bias = torch.randn(e, dtype=torch.float64) if with_bias else None
    n = (h // p) * (w // p)
    pos = torch.randn(1, n, e, dtype=torch.float64) if with_pos else None
    want = F.conv2d(images, weight, bias, stride=p).flatten(2).transpose(1, 2)
    if pos is not None:
        want = want + pos
    got = aimkern.patch_embed(images, weight, bias, pos, backend="reference")
    torch.testing.assert_close(got, want)
    if pos is not None:  # (N, E) is accepted as well as (1, N, E)
        torch.testing.assert_close(aimkern.patch_embed(images, weight, bias, pos[0], backend="reference"), want)


# ------------------------------------------------------------------------------------ cross-entropy


def _ce_by_formula(x, w, b, t, reduction, ignore_index, eps, z):
    logits = x.reshape(-1, x.shape[-1]) @ w.T + (0 if b is None else b)
    t = t.reshape(-1)
    logp = logits - logits.logsumexp(-1, keepdim=True)
    keep = t != ignore_index
    safe_t = torch.where(keep, t, torch.zeros_like(t))
    nll = -logp.gather(1, safe_t[:, None])[:, 0]
    smooth = -logp.mean(-1)
    per = (1 - eps) * nll + eps * smooth + z * logits.logsumexp(-1) ** 2
    per = torch.where(keep, per, torch.zeros_like(per))
    if reduction == "none":
        return per
    return per.sum() if reduction == "sum" else per.sum() / keep.sum()


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("eps,z", [(0.0, 0.0), (0.1, 0.0), (0.0, 1e-3), (0.2, 1e-2)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_linear_cross_entropy_reference_matches_formula(reduction, eps, z, with_bias):
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    w = torch.randn(37, 16, dtype=torch.float64)
    b = torch.randn(37, dtype=torch.float64) if with_bias else None
    t = torch.randint(0, 37, (3, 5))
    t[0, 1] = t[2, 4] = -100
    got = aimkern.linear_cross_entropy(
        x, w, t, linear_bias=b, reduction=reduction, label_smoothing=eps, z_loss=z, backend="reference"
    )
    want = _ce_by_formula(x, w, b, t, reduction, -100, eps, z)
    torch.testing.assert_close(got.reshape(-1), want.reshape(-1))
    if reduction == "none":
        assert got.shape == t.shape


def test_linear_cross_entropy_matches_torch_builtin_when_present():
    if not hasattr(F, "linear_cross_entropy"):
        pytest.skip("this torch has no F.linear_cross_entropy (torch >= 2.13)")
    x = torch.randn(11, 24, dtype=torch.float64)
    w = torch.randn(50, 24, dtype=torch.float64)
    t = torch.randint(0, 50, (11,))
    want = F.linear_cross_entropy(x, w, t)
    got = aimkern.linear_cross_entropy(x, w, t, backend="reference")
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8])
def test_linear_cross_entropy_accepts_narrow_integer_targets(dtype):
    x = torch.randn(6, 8, dtype=torch.float64)
    w = torch.randn(5, 8, dtype=torch.float64)
    t = torch.randint(0, 5, (6,))
    want = aimkern.linear_cross_entropy(x, w, t)
    torch.testing.assert_close(aimkern.linear_cross_entropy(x, w, t.to(dtype)), want)


def test_linear_cross_entropy_all_ignored_mean_is_nan_like_torch():
    x = torch.randn(4, 8, dtype=torch.float64)
    w = torch.randn(5, 8, dtype=torch.float64)
    t = torch.full((4,), -100)
    assert torch.isnan(aimkern.linear_cross_entropy(x, w, t))
    assert aimkern.linear_cross_entropy(x, w, t, reduction="sum").item() == 0.0


# -------------------------------------------------------------------------------------- pixel loss


def _pixel_loss_by_loops(pred, images, p, offset, prefix, norm_pix, eps):
    b, c, h, w = images.shape
    gw = w // p
    total, count = 0.0, 0
    for bi in range(b):
        for j in range(pred.shape[1]):
            if j < offset or j < prefix[bi]:
                continue
            r, col = divmod(j, gw)
            t = images[bi, :, r * p : (r + 1) * p, col * p : (col + 1) * p].permute(1, 2, 0).reshape(-1)
            if norm_pix:
                t = (t - t.mean()) / torch.sqrt(t.var(unbiased=True) + eps)
            total = total + ((pred[bi, j - offset] - t) ** 2).mean()
            count += 1
    return total / max(count, 1) if count else torch.zeros((), dtype=pred.dtype)


@pytest.mark.parametrize("c,p,h,w", [(3, 4, 8, 12), (1, 5, 10, 15), (4, 2, 4, 6)])
@pytest.mark.parametrize("offset", [1, 2, 4])
@pytest.mark.parametrize("prefix", [None, [0, 3]])
@pytest.mark.parametrize("norm_pix", [True, False])
def test_pixel_loss_reference_matches_loops(c, p, h, w, offset, prefix, norm_pix):
    images = torch.randn(2, c, h, w, dtype=torch.float64)
    n = (h // p) * (w // p)
    pred = torch.randn(2, n, p * p * c, dtype=torch.float64)
    pl = torch.tensor(prefix) if prefix is not None else None
    got = aimkern.next_patch_pixel_loss(
        pred, images, patch_size=p, offset=offset, prefix_len=pl, norm_pix=norm_pix, eps=1e-6, backend="reference"
    )
    want = _pixel_loss_by_loops(pred, images, p, offset, prefix or [0, 0], norm_pix, 1e-6)
    torch.testing.assert_close(got, torch.as_tensor(want, dtype=got.dtype))


@pytest.mark.parametrize("offset", [0, 1, 3, 9])
@pytest.mark.parametrize("prefix", [None, [0, 2, 8, 5]])
def test_counted_targets_is_the_target_mask_count(offset, prefix):
    from aimkern.reference import counted_targets, target_mask

    pl = torch.tensor(prefix) if prefix is not None else None
    want = target_mask(4, 8, offset, pl, "cpu").sum(1)
    assert torch.equal(counted_targets(4, 8, offset, pl), want)


def test_target_mask_takes_an_int_prefix_like_a_tensor_of_it():
    from aimkern.reference import counted_targets, target_mask

    assert torch.equal(target_mask(3, 8, 1, 5, "cpu"), target_mask(3, 8, 1, torch.full((3,), 5), "cpu"))
    assert target_mask(3, 8, 1, 5, "cpu")[0].tolist() == [False] * 5 + [True] * 3
    assert torch.equal(counted_targets(3, 8, 1, 5, "cpu"), torch.full((3,), 3))


def test_pixel_loss_nothing_counted_is_zero_with_zero_grad():
    images = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    pred = torch.randn(2, 4, 48, dtype=torch.float64, requires_grad=True)
    loss = aimkern.next_patch_pixel_loss(pred, images, patch_size=4, prefix_len=4)
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(pred.grad) == 0


def test_pixel_loss_gradient_matches_finite_differences():
    images = torch.randn(2, 1, 4, 6, dtype=torch.float64)
    pred = torch.randn(2, 6, 4, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(
        lambda x: aimkern.next_patch_pixel_loss(x, images, patch_size=2, offset=2, prefix_len=torch.tensor([1, 4])),
        (pred,),
    )
