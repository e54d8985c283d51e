"""aimkern.tokenizers.KMeansPatchTokenizer: planted clusters recovered, shapes, save/load, and a CausalViT token
head that trains on its ids (CPU, a few steps)."""
import pytest
import torch

import aimkern
from aimkern.reference import pixel_targets
from aimkern.tokenizers import KMeansPatchTokenizer

P, C = 4, 3
D = P * P * C


def _planted_images(n_images, k, noise=0.05, img=16, seed=0, sequential=False):
    """Images whose P x P patches are each one of k standardized patterns (+ small noise).

    Patterns are drawn at random per patch, or, with ``sequential``, cycle in raster order from a random
    start per image (then the next patch's pattern follows from the current one: learnable).
    Returns images (B, C, img, img) and the planted pattern id of every patch (B, N), raster order.
    """
    g = torch.Generator().manual_seed(seed)
    patterns = torch.randn(k, D, generator=g)
    patterns = (patterns - patterns.mean(1, keepdim=True)) / patterns.std(1, keepdim=True)
    grid = img // P
    if sequential:
        labels = (torch.randint(0, k, (n_images, 1), generator=g) + torch.arange(grid * grid)) % k
    else:
        labels = torch.randint(0, k, (n_images, grid * grid), generator=g)
    patches = patterns[labels] + noise * torch.randn(n_images, grid * grid, D, generator=g)
    # (B, N, P*P*C) in (p, q, c) order -> (B, C, H, W): the inverse of patchify(order="pqc").
    images = patches.reshape(n_images, grid, grid, P, P, C).permute(0, 5, 1, 3, 2, 4).reshape(n_images, C, img, img)
    # A per-patch brightness and contrast change must not change the ids (norm_pix).
    images = images * (1.0 + torch.rand(n_images, 1, 1, 1, generator=g)) + torch.randn(n_images, 1, 1, 1, generator=g)
    return images, labels, patterns


def test_fit_recovers_planted_clusters():
    k = 8
    images, labels, patterns = _planted_images(32, k)
    tok = KMeansPatchTokenizer(vocab_size=k, patch_size=P, chunk_size=100).fit(images)
    ids = tok.encode(images)
    assert ids.shape == labels.shape and ids.dtype == torch.int64
    # One id per planted pattern, and different patterns get different ids: a bijection.
    mapping = {}
    for lab, i in zip(labels.flatten().tolist(), ids.flatten().tolist()):
        assert mapping.setdefault(lab, i) == i, f"pattern {lab} split across ids"
    assert len(set(mapping.values())) == k
    # Each centroid sits on its pattern (noise 0.05 per value averages out).
    for lab, i in mapping.items():
        assert (tok.centroids[i] - patterns[lab]).abs().max() < 0.1
    assert tok.inertia_[-1] <= tok.inertia_[0]


def test_fit_from_an_iterable_of_batches_with_a_patch_cap():
    images, labels, _ = _planted_images(32, 4, seed=1)
    batches = [(images[:16], None), (images[16:], None)]  # (images, labels) pairs like a DataLoader's
    tok = KMeansPatchTokenizer(vocab_size=4, patch_size=P).fit(batches, max_patches=300)
    ids = tok.encode(images)
    for lab in range(4):
        assert ids[labels == lab].unique().numel() == 1
    assert ids.unique().numel() == 4


def test_encode_decode_shapes_and_values():
    images, labels, _ = _planted_images(6, 8, seed=2)
    tok = KMeansPatchTokenizer(vocab_size=8, patch_size=P).fit(images)
    ids = tok.encode(images[:3])
    assert ids.shape == (3, (16 // P) ** 2)
    patches = tok.decode(ids)
    assert patches.shape == (3, 16, D) and patches.dtype == torch.float32
    # Decoded patches are the normalized pixels up to the planted noise.
    assert (patches - pixel_targets(images[:3], P)).abs().max() < 0.5
    with pytest.raises(ValueError, match="ids must be in"):
        tok.decode(torch.tensor([[8]]))
    with pytest.raises(ValueError, match="multiples of patch_size"):
        tok.encode(torch.randn(1, C, 10, 16))
    with pytest.raises(ValueError, match="channels"):
        tok.encode(torch.randn(1, 1, 16, 16))


def test_chunked_assignment_equals_brute_force():
    x = torch.randn(257, D)
    tok = KMeansPatchTokenizer(vocab_size=37, patch_size=P, chunk_size=10)
    c = torch.randn(37, D)
    ids, d2 = tok.assign(x, c)
    full = torch.cdist(x.double(), c.double()) ** 2
    assert torch.equal(ids, full.argmin(1))
    torch.testing.assert_close(d2.double(), full.min(1).values, rtol=1e-4, atol=1e-4)


def test_kmeans_pp_seeding_spreads_over_clusters():
    # Seeds alone (no Lloyd step) already land in distinct planted clusters: k-means++ at work.
    images, labels, patterns = _planted_images(16, 6, seed=3)
    tok = KMeansPatchTokenizer(vocab_size=6, patch_size=P, iters=0).fit(images)
    nearest = torch.cdist(tok.centroids, patterns).argmin(1)
    assert nearest.unique().numel() == 6


def test_save_load_round_trip(tmp_path):
    images, _, _ = _planted_images(8, 8, seed=4)
    tok = KMeansPatchTokenizer(vocab_size=8, patch_size=P).fit(images)
    path = tmp_path / "tok.pt"
    tok.save(path)
    raw = torch.load(path, weights_only=True)  # a plain dict: safe to load
    assert raw["vocab_size"] == 8 and raw["centroids"].shape == (8, D)
    back = KMeansPatchTokenizer.load(path)
    assert torch.equal(back.centroids, tok.centroids)
    assert (back.vocab_size, back.patch_size, back.in_chans, back.norm_pix) == (8, P, C, True)
    assert torch.equal(back.encode(images), tok.encode(images))


def test_bad_arguments():
    with pytest.raises(ValueError, match="vocab_size"):
        KMeansPatchTokenizer(vocab_size=1)
    with pytest.raises(ValueError, match="at least vocab_size"):
        KMeansPatchTokenizer(vocab_size=64, patch_size=P).fit(torch.randn(1, C, 16, 16))
    with pytest.raises(RuntimeError, match="fit"):
        KMeansPatchTokenizer(vocab_size=8, patch_size=P).encode(torch.randn(1, C, 16, 16))


def test_causal_vit_token_head_trains_on_tokenizer_ids():
    # End to end on CPU: fit the tokenizer, encode the images, train vit-tiny's token head on the ids (the
    # token head calls aimkern.linear_cross_entropy with ignore_index for prefix patches).
    torch.manual_seed(0)
    vocab = 16
    model = aimkern.CausalViT.from_preset("vit-tiny", head="token", vocab_size=vocab)
    cfg = model.config
    images, _, _ = _planted_images(4, vocab, img=cfg.img_size, seed=5, sequential=True)
    tok = KMeansPatchTokenizer(vocab_size=vocab, patch_size=cfg.patch_size).fit(images)
    targets = tok.encode(images)
    assert targets.shape == (4, cfg.num_patches)

    def eval_loss():
        model.eval()  # no prefix sampling: every next patch is a target
        with torch.no_grad():
            return model(images, targets=targets).item()

    before = eval_loss()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(8):
        loss = model(images, targets=targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = eval_loss()
    assert before == pytest.approx(torch.log(torch.tensor(float(vocab))).item(), rel=0.2)  # chance at init
    assert after < 0.7 * before, f"token loss did not fall: {before:.3f} -> {after:.3f}"
