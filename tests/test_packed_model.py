"""CausalViT on packed images: packing changes nothing (issue 29, item 3).

A square image at the config's size gets, in its rows of ``forward_features_packed``, what
``forward_features`` gives it alone, and the same gradients; any order and any neighbours give the same
per-image rows; the positions of other grids are the dense ones (sin-cos) or the learned table resized as
``F.interpolate`` resizes it; padding holds no loss.
"""
import pytest
import torch
import torch.nn.functional as F

from aimkern import CausalViT, pack_images
from aimkern.data.packing import pack_to_budget
from aimkern.models.packed import sample_prefix_len
from aimkern.models.positions import resized_learned_at, sincos_at
from aimkern.nn import sincos_pos_embed_2d

TINY = dict(img_size=16, patch_size=4, dim=32, depth=2, num_heads=2)  # N = 16, head dim 16


def model(pos="sincos", backend="reference", seed=0, **kw):
    torch.manual_seed(seed)
    m = CausalViT.from_preset("vit-tiny", pos_embed=pos, backend=backend, **dict(TINY, **kw)).eval()
    if pos == "learned":  # the init's zeros-then-trunc_normal table is random already; make it smooth too
        with torch.no_grad():
            m.pos_embed.add_(torch.linspace(-1, 1, m.pos_embed.numel()).view_as(m.pos_embed))
    return m


def images(seed=0):
    g = torch.Generator().manual_seed(seed)
    square = [torch.randint(0, 256, (3, 16, 16), generator=g, dtype=torch.uint8) for _ in range(3)]
    other = [torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8) for h, w in ((8, 24), (20, 12), (4, 4))]
    return square, other


def dense_input(imgs):
    from aimkern.data.inputs import model_input

    return model_input(torch.stack(imgs), 3)


def rows(pack, feats, s):
    cu = pack.cu_seqlens.tolist()
    return feats[cu[s]:cu[s + 1]]


@pytest.mark.parametrize("pos", ["sincos", "learned"])
def test_square_rows_equal_dense_forward_and_gradients(pos):
    m = model(pos)
    square, other = images()
    prefix = torch.tensor([3, 1, 9])
    dense = m.forward_features(dense_input(square), prefix_len=prefix)
    g = torch.Generator().manual_seed(1)
    cot = torch.randn(dense.shape, generator=g)
    (dense * cot).sum().backward()
    want = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    m.zero_grad()

    # The squares interleaved with images of other grids: the neighbours get a zero cotangent.
    order = [other[0], square[0], other[1], square[1], square[2], other[2]]
    pack = pack_images(order, 4, prefix_len=[5, 3, 7, 1, 9, 0])
    feats = m.forward_features_packed(pack)
    cot_packed = torch.zeros_like(feats)
    for i, s in enumerate((1, 3, 4)):
        torch.testing.assert_close(rows(pack, feats, s), dense[i], rtol=1e-5, atol=1e-5)
        rows(pack, cot_packed, s).copy_(cot[i])
    (feats * cot_packed).sum().backward()
    got = {n: p.grad for n, p in m.named_parameters() if p.grad is not None}
    assert got.keys() == want.keys()
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-5, msg=lambda s: f"{n}: {s}")


@pytest.mark.parametrize("pos", ["sincos", "learned"])
def test_order_and_neighbours_do_not_change_an_image(pos):
    m = model(pos)
    square, other = images()
    a = [square[0], other[0], other[1], square[1]]
    b = [other[2], square[1], other[1], square[2], other[0], square[0]]
    pa = pack_images(a, 4, prefix_len=[2, 3, 4, 5])
    pb = pack_images(b, 4, prefix_len=[1, 5, 4, 6, 3, 2])
    fa, fb = m.forward_features_packed(pa), m.forward_features_packed(pb)
    for ia, ib in ((0, 5), (1, 4), (2, 2), (3, 1)):  # native-size images too, not only squares
        torch.testing.assert_close(rows(pa, fa, ia), rows(pb, fb, ib), rtol=1e-5, atol=1e-5)
    alone = m.forward_features_packed(pack_images([other[1]], 4, prefix_len=[4]))
    torch.testing.assert_close(rows(pa, fa, 2), alone, rtol=1e-5, atol=1e-5)


def test_full_attention_features_equal_dense():
    m = model()
    square, other = images()
    feats = m.forward_features_packed(pack_images([other[0], square[2]], 4), is_causal=False)
    dense = m.forward_features(dense_input([square[2]]), is_causal=False)[0]
    torch.testing.assert_close(feats[other[0].shape[1] // 4 * other[0].shape[2] // 4:], dense, rtol=1e-5, atol=1e-5)


def test_pixel_loss_of_a_square_pack_equals_dense_loss_and_padding_adds_nothing():
    m = model()
    square, _ = images()
    prefix = torch.tensor([3, 1, 9])
    dense = m.forward(dense_input(square), prefix_len=prefix)
    packed = m.forward_packed(pack_images(square, 4, prefix_len=prefix))
    torch.testing.assert_close(packed, dense, rtol=1e-5, atol=1e-6)
    padded, taken = pack_to_budget(square, 4, 60, prefix_len=prefix, sequences=5)
    assert taken == [0, 1, 2] and padded.num_tokens == 60 and padded.prefix_len.tolist() == [3, 1, 9, 12, 0]
    torch.testing.assert_close(m.forward_packed(padded), dense, rtol=1e-5, atol=1e-6)


def test_token_loss_of_a_square_pack_equals_dense():
    m = model(head="token", vocab_size=17)
    square, other = images()
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 17, (3, 16), generator=g)
    prefix = torch.tensor([3, 1, 9])
    dense = m.forward(dense_input(square), prefix_len=prefix, targets=ids)
    packed = m.forward_packed(pack_images(square, 4, prefix_len=prefix), targets=ids.reshape(-1))
    torch.testing.assert_close(packed, dense, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="token head needs targets"):
        m.forward_packed(pack_images(square, 4))
    with pytest.raises(ValueError, match=r"\(T,\)"):
        m.forward_packed(pack_images(square, 4), targets=ids)


def test_sincos_rows_are_the_dense_table_of_each_grid():
    for h, w in ((4, 4), (3, 7), (9, 2)):
        pack = pack_images([torch.zeros(1, 4 * h, 4 * w)], 4)
        assert torch.equal(sincos_at(32, pack.coords, pack.max_seqlen), sincos_pos_embed_2d(32, h, w))


def test_learned_table_resized_as_interpolate():
    g = torch.Generator().manual_seed(3)
    table = torch.randn(1, 36, 8, generator=g, dtype=torch.float64, requires_grad=True)
    for h, w in ((6, 6), (3, 9), (11, 4), (1, 1)):
        coords = pack_images([torch.zeros(1, h, w)], 1).coords
        got = resized_learned_at(table, coords, torch.tensor([[h, w]]).expand(h * w, 2), 6)
        want = F.interpolate(table.view(6, 6, 8).permute(2, 0, 1)[None], size=(h, w), mode="bilinear",
                             align_corners=False)[0].permute(1, 2, 0).reshape(h * w, 8)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        if (h, w) == (6, 6):
            assert torch.equal(got, table[0])
        cot = torch.randn(got.shape, generator=g, dtype=torch.float64)
        (dg,) = torch.autograd.grad((got * cot).sum(), table)
        (dw,) = torch.autograd.grad((want * cot).sum(), table)
        torch.testing.assert_close(dg, dw, rtol=1e-6, atol=1e-6)  # weights computed in float32


def test_sampled_prefix_in_range_and_padding_keeps_its_length():
    square, other = images()
    pack, taken = pack_to_budget(other + square, 4, 80, sequences=8)
    gen = torch.Generator().manual_seed(0)
    lengths = pack.seqlens.tolist()
    for _ in range(20):
        prefix = sample_prefix_len(pack, gen).tolist()
        for s, (p, n) in enumerate(zip(prefix, lengths)):
            if s >= pack.num_images:
                assert p == n
            elif n >= 2:
                assert 1 <= p <= n - 1, (s, p, n)


def test_bad_pack_is_refused():
    m = model()
    square, _ = images()
    with pytest.raises(ValueError, match="patch size 8"):
        m.forward_features_packed(pack_images(square, 8))
    with pytest.raises(TypeError, match="PackedImages"):
        m.forward_features_packed(torch.zeros(16, 48))


@pytest.mark.slow
def test_triton_interpreter_rows_equal_reference():
    ref = model(depth=1)
    tri = model(depth=1, backend="triton")
    square, other = images()
    pack = pack_images([other[0], square[0]], 4, prefix_len=[5, 3])
    f_ref, f_tri = ref.forward_features_packed(pack), tri.forward_features_packed(pack)
    torch.testing.assert_close(f_tri, f_ref, rtol=1e-4, atol=1e-4)
    f_ref.square().sum().backward()
    f_tri.square().sum().backward()
    for (n, a), (_, b) in zip(ref.named_parameters(), tri.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-3, atol=1e-4, msg=lambda s: f"{n}: {s}")
    dense = tri.forward_features(dense_input([square[0]]), prefix_len=torch.tensor([3]))[0]
    torch.testing.assert_close(f_tri[12:], dense, rtol=1e-4, atol=1e-4)


def test_aimv2_native_family_rows_equal_dense():
    """AIMv2-native's trunk (patch norm before the positions, RMSNorm, SwiGLU, no biases, sin-cos), shrunk:
    the patch-norm path of the embedding keeps the packed rows equal to the dense ones."""
    torch.manual_seed(0)
    m = CausalViT.from_preset("aimv2-large-native", img_size=28, dim=32, depth=1, num_heads=2, mlp_ratio=2.0,
                              backend="reference").eval()
    g = torch.Generator().manual_seed(4)
    square = [torch.randint(0, 256, (3, 28, 28), generator=g, dtype=torch.uint8) for _ in range(2)]
    other = torch.randint(0, 256, (3, 14, 42), generator=g, dtype=torch.uint8)
    pack = pack_images([other, square[0], square[1]], 14, prefix_len=[1, 2, 3])
    feats = m.forward_features_packed(pack)
    dense = m.forward_features(dense_input(square), prefix_len=torch.tensor([2, 3]))
    torch.testing.assert_close(feats[3:7], dense[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(feats[7:], dense[1], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_compiled_packed_step_does_not_recompile_when_the_pack_changes():
    """torch.compile(fullgraph=True) of the whole packed training step (forward_packed, pixel loss,
    backward through the model) gives one graph for packs of one T, S and max_seqlen whose images differ
    (so cu_seqlens, grid, coords and prefix_len change values), and the eager reference's loss and grads."""
    from dataclasses import replace

    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()
    tri, ref = model(depth=1, backend="triton"), model(depth=1)
    step = torch.compile(tri.forward_packed, backend=counter, fullgraph=True)
    square, other = images()
    for chosen in ([square[0], other[1]], [other[0], other[2], square[1]], [other[1], other[0]]):
        prefix = [max(1, (img.shape[1] // 4) * (img.shape[2] // 4) // 2) for img in chosen]
        pack, taken = pack_to_budget(chosen, 4, 48, prefix_len=prefix, sequences=4)
        assert len(taken) == len(chosen)
        pack = replace(pack, max_seqlen=48)  # a fixed host bound, as the native trainer's packs have
        loss = step(pack)
        grads = torch.autograd.grad(loss, list(tri.parameters()))
        want = ref.forward_packed(pack)
        torch.testing.assert_close(loss, want, rtol=1e-4, atol=1e-5)
        for (name, p), g, w in zip(ref.named_parameters(), grads, torch.autograd.grad(want, list(ref.parameters()))):
            torch.testing.assert_close(g, w, rtol=1e-3, atol=1e-5, msg=lambda s: f"{name}: {s}")
    assert counter.frame_count == 1


# ------------------------------------------------ uint8 patches: normalized inside the fused patch embedding
def two_pass(pack):
    """The pack as the model took it before the normalization was fused: a float32 copy of the normalized
    patches (``model_input`` per channel), then the op on float patches."""
    import dataclasses

    from aimkern.data.inputs import model_input

    t, d = pack.patches.shape
    strip = pack.patches.view(t, d // 3, 3).permute(2, 0, 1).reshape(1, 3, t, d // 3)  # channels as model_input
    x = model_input(strip, 3).reshape(3, t, d // 3).permute(1, 2, 0).reshape(t, d)
    return dataclasses.replace(pack, patches=x)


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=pytest.mark.slow)])
def test_uint8_features_equal_the_two_pass_features(backend):
    """Features and every parameter gradient of a uint8 pack equal those of its normalized float32 copy
    (today's two passes) within the op tolerance; the Triton backend runs the fused kernels."""
    m = model(backend=backend, depth=1)
    square, other = images()
    pack = pack_images([other[0], square[0], other[1]], 4, prefix_len=[5, 3, 4])
    results = []
    for p in (pack, two_pass(pack)):
        assert p.patches.dtype == (torch.uint8 if p is pack else torch.float32)
        m.zero_grad()
        feats = m.forward_features_packed(p)
        feats.square().sum().backward()
        results.append((feats.detach(), {n: q.grad.clone() for n, q in m.named_parameters() if q.grad is not None}))
    (f8, g8), (f32, g32) = results
    torch.testing.assert_close(f8, f32, rtol=1e-5, atol=1e-5)
    assert g8.keys() == g32.keys() and "patch_embed.proj.weight" in g8
    for n in g8:
        torch.testing.assert_close(g8[n], g32[n], rtol=1e-4, atol=1e-5, msg=lambda s: f"{n}: {s}")


@pytest.mark.parametrize("head", ["pixel", "token"])
def test_the_step_makes_no_float_copy_of_the_pack(monkeypatch, head):
    """The patch embedding and the pixel loss get the pack's own uint8 storage (the embedding a strided strip
    view of it, no copy) with the model's normalization as input_scale / input_shift."""
    import aimkern.models.packed as packed_mod
    from aimkern.data.decode import pixel_affine

    m = model(head=head, **(dict(vocab_size=17) if head == "token" else {}))
    square, other = images()
    pack = pack_images([other[0], square[0]], 4, prefix_len=[2, 3])
    seen = []
    hook = m.patch_embed.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append((args[0].dtype, args[0].data_ptr(), kwargs)), with_kwargs=True)
    losses = []
    real_loss = packed_mod.next_patch_pixel_loss_varlen
    monkeypatch.setattr(packed_mod, "next_patch_pixel_loss_varlen",
                        lambda pred, patches, *a, **kw: losses.append((patches, kw)) or real_loss(pred, patches, *a, **kw))
    targets = {"targets": torch.randint(0, 17, (pack.num_tokens,))} if head == "token" else {}
    m.forward_packed(pack, **targets)
    hook.remove()
    (dtype, ptr, kwargs), = seen
    assert dtype == torch.uint8 and ptr == pack.patches.data_ptr()
    assert (kwargs["input_scale"], kwargs["input_shift"]) == pixel_affine(3)
    if head == "pixel":
        (patches, kw), = losses
        assert patches is pack.patches and (kw["input_scale"], kw["input_shift"]) == pixel_affine(3)
    else:
        assert losses == []
