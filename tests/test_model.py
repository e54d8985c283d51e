"""CausalViT and ViTConfig: shapes, presets, parameter counts, causality, learning, errors."""
import pytest
import torch

import aimkern
from aimkern import CausalViT, ViTConfig


def tiny(**overrides) -> CausalViT:
    return CausalViT.from_preset("vit-tiny", **overrides)


def images_for(model: CausalViT, batch: int = 2) -> torch.Tensor:
    c = model.config
    return torch.randn(batch, c.in_chans, c.img_size, c.img_size)


# Published trunk sizes (no prediction head). AIM: El-Nouby et al. 2024; ViT: Dosovitskiy et al. / timm;
# AIMv2-L: Fini et al. 2024. aim-600m's trunk is about 0.68B (its name counts the head too).
PUBLISHED_TRUNK_PARAMS = {
    "vit-b16": 86e6,
    "vit-l16": 304e6,
    "vit-h14": 632e6,
    "aim-600m": 0.68e9,
    "aim-1b": 1.2e9,
    "aim-3b": 2.7e9,
    "aim-7b": 6.5e9,
    "aimv2-large": 309e6,
}


@pytest.mark.parametrize("name,published", sorted(PUBLISHED_TRUNK_PARAMS.items()))
def test_preset_trunk_parameter_counts_match_published(name, published):
    with torch.device("meta"):  # no memory: aim-7b alone would need 26 GB
        model = CausalViT.from_preset(name)
    got = model.num_parameters(trunk_only=True)
    assert abs(got - published) / published < 0.02, f"{name}: {got / 1e6:.1f}M vs published {published / 1e6:.0f}M"


def test_every_preset_builds_and_names_are_checked():
    for name in aimkern.PRESETS:
        cfg = ViTConfig.from_preset(name)
        assert cfg.num_patches == (cfg.img_size // cfg.patch_size) ** 2
    with pytest.raises(ValueError, match="unknown preset"):
        ViTConfig.from_preset("vit-gigantic")


def test_aim_presets_follow_the_paper():
    cfg = ViTConfig.from_preset("aim-600m")
    assert (cfg.dim, cfg.depth, cfg.num_heads, cfg.patch_size, cfg.img_size) == (1536, 24, 12, 14, 224)
    assert not cfg.qkv_bias and not cfg.bias and cfg.pos_embed == "sincos"
    assert (cfg.head, cfg.head_depth, cfg.head_width) == ("pixel", 12, 2048)
    v2 = ViTConfig.from_preset("aimv2-large")
    assert (v2.norm, v2.mlp, v2.patch_norm, v2.bias) == ("rmsnorm", "swiglu", True, False)


@pytest.mark.parametrize(
    "overrides,match",
    [
        (dict(img_size=30), "multiple of patch_size"),
        (dict(dim=66), "divisible by num_heads"),
        (dict(dim=40, num_heads=4), "head dim"),
        (dict(norm="batchnorm"), "norm must be"),
        (dict(mlp="relu"), "mlp must be"),
        (dict(head="class"), "head must be"),
        (dict(backend="cuda"), "backend must be"),
        (dict(block_size=64), "no next patch"),
    ],
)
def test_config_rejects_bad_values(overrides, match):
    with pytest.raises(ValueError, match=match):
        ViTConfig.from_preset("vit-tiny", **overrides)


def test_config_round_trips_through_dict():
    cfg = ViTConfig.from_preset("aimv2-large")
    assert ViTConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown fields"):
        ViTConfig.from_dict({"width": 3})


def test_head_width_keeps_head_dim_as_a_deprecated_alias():
    """ViTConfig.head_dim (the prediction head's width, not Attention.head_dim) is head_width now; the old name
    is read and written for one release, each time with a DeprecationWarning."""
    import dataclasses

    for build in (lambda: ViTConfig(head_dim=48), lambda: ViTConfig.from_preset("aim-600m", head_dim=48),
                  lambda: ViTConfig.from_dict({"head_depth": 1, "head_dim": 48}),
                  lambda: dataclasses.replace(ViTConfig(), head_dim=48)):
        with pytest.warns(DeprecationWarning, match="head_dim= is deprecated, renamed head_width="):
            cfg = build()
        assert cfg.head_width == 48
    old = ViTConfig.from_preset("aim-600m").to_dict()
    assert "head_dim" not in old and old["head_width"] == 2048
    old["head_dim"] = old.pop("head_width")  # a config written before the rename
    with pytest.warns(DeprecationWarning):
        assert ViTConfig.from_dict(old) == ViTConfig.from_preset("aim-600m")
    with pytest.warns(DeprecationWarning, match="ViTConfig.head_dim is deprecated"):
        assert cfg.head_dim == 48
    with pytest.warns(DeprecationWarning):
        cfg.head_dim = 64
    assert cfg.head_width == 64
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="head_dim=32 and head_width=64 disagree"):
        ViTConfig(head_width=64, head_dim=32)
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="disagree"):
        ViTConfig.from_preset("vit-tiny", head_width=64, head_dim=32)
    with pytest.warns(DeprecationWarning):
        model = CausalViT.from_preset("aim-600m", img_size=28, dim=64, depth=1, num_heads=4, head_depth=1,
                                      head_dim=32)
    assert model.head.out.weight.shape[1] == 32 and model.blocks[0].attn.head_dim == 16


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        dict(norm="rmsnorm", mlp="swiglu", qkv_bias=False, bias=False, patch_norm=True),
        dict(pos_embed="sincos", head_depth=2, head_width=96),
        dict(block_size=8, in_chans=1),
    ],
)
def test_forward_shapes_and_finite_loss(overrides):
    model = tiny(**overrides)
    x = images_for(model)
    feats = model.forward_features(x)
    assert feats.shape == (2, model.config.num_patches, model.config.dim)
    loss = model(x)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_forward_rejects_wrong_image_shape():
    model = tiny()
    with pytest.raises(ValueError, match="images must be"):
        model(torch.randn(2, 3, 16, 16))


def _last_row_perturbed(model, x):
    g = model.config.grid_size
    p = model.config.patch_size
    y = x.clone()
    y[:, :, (g - 1) * p :, :] += torch.randn_like(y[:, :, (g - 1) * p :, :])
    return y


@pytest.mark.parametrize("block_size", [1, 8])
def test_causality_last_row_does_not_leak_backwards(block_size):
    model = tiny(block_size=block_size).eval()
    x = images_for(model)
    y = _last_row_perturbed(model, x)
    g = model.config.grid_size
    earlier = g * (g - 1)  # tokens before the last row of patches
    with torch.no_grad():
        fx, fy = model.forward_features(x), model.forward_features(y)
    torch.testing.assert_close(fx[:, :earlier], fy[:, :earlier], rtol=0, atol=1e-6)
    assert (fx[:, earlier:] - fy[:, earlier:]).abs().max() > 1e-3


def test_full_prefix_and_full_attention_see_the_last_row():
    model = tiny().eval()
    x = images_for(model)
    y = _last_row_perturbed(model, x)
    n = model.config.num_patches
    with torch.no_grad():
        for kwargs in (dict(prefix_len=n), dict(is_causal=False)):
            diff = (model.forward_features(x, **kwargs)[:, 0] - model.forward_features(y, **kwargs)[:, 0]).abs().max()
            assert diff > 1e-4, kwargs


def test_prefix_tokens_are_bidirectional_within_the_prefix():
    model = tiny().eval()
    x = images_for(model)
    y = x.clone()
    y[:, :, :4, 4:8] += 1.0  # patch 1 (first row, second column)
    with torch.no_grad():
        a, b = model.forward_features(x, prefix_len=2), model.forward_features(y, prefix_len=2)
        c, d = model.forward_features(x, prefix_len=1), model.forward_features(y, prefix_len=1)
    assert (a[:, 0] - b[:, 0]).abs().max() > 1e-4  # token 0 sees patch 1 inside a prefix of 2
    torch.testing.assert_close(c[:, 0], d[:, 0], rtol=0, atol=1e-6)  # but not with a prefix of 1


def test_sample_prefix_len_is_in_range_and_training_uses_it():
    model = tiny()
    pl = model.sample_prefix_len(1000)
    n = model.config.num_patches
    assert pl.shape == (1000,) and pl.min() >= 1 and pl.max() <= n - 1
    assert len(torch.unique(pl)) > n // 2  # spread over the range
    x = images_for(model)
    torch.manual_seed(1)
    a = model(x)
    torch.manual_seed(2)
    b = model(x)
    assert a.item() != b.item()  # a different prefix per call in training mode
    model.eval()
    assert model(x).item() == model(x).item()  # no sampling in eval mode


def test_pixel_loss_falls_when_overfitting_one_batch():
    torch.manual_seed(0)
    model = tiny(prefix=False)
    x = images_for(model, batch=4)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        loss = model(x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses[::8]


def test_token_head_loss_falls_and_needs_targets():
    torch.manual_seed(0)
    model = tiny(head="token", vocab_size=16, prefix=False)
    x = images_for(model, batch=4)
    n = model.config.num_patches
    targets = torch.randint(0, 16, (4, n))
    with pytest.raises(ValueError, match="targets"):
        model(x)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(40):
        loss = model(x, targets=targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = loss.item() if first is None else first
    assert loss.item() < 0.7 * first


def test_token_head_ignores_prefix_targets():
    model = tiny(head="token", vocab_size=16).eval()
    x = images_for(model)
    n = model.config.num_patches
    targets = torch.randint(0, 16, (2, n))
    other = targets.clone()
    other[:, :10] = (other[:, :10] + 1) % 16  # change only targets inside a prefix of 10
    with torch.no_grad():
        assert model(x, prefix_len=10, targets=targets).item() == model(x, prefix_len=10, targets=other).item()
        assert model(x, prefix_len=1, targets=targets).item() != model(x, prefix_len=1, targets=other).item()


def test_token_head_counts_the_targets_past_each_images_prefix():
    """Per-image prefixes: the loss is the mean cross entropy over targets j >= max(block_size, prefix_len[b])."""
    model = tiny(head="token", vocab_size=16, block_size=2, backend="reference").eval().double()
    x = images_for(model).double()
    n, offset = model.config.num_patches, 2
    targets = torch.randint(0, 16, (2, n))
    prefix = torch.tensor([5, 40])
    with torch.no_grad():
        got = model(x, prefix_len=prefix, targets=targets)
        logits = model.head(model.forward_features(x, prefix_len=prefix))[:, : n - offset]
        ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets[:, offset:], reduction="none")
        counted = torch.arange(offset, n).view(1, -1) >= prefix.view(-1, 1)
    torch.testing.assert_close(got, ce[counted].mean())


def test_attention_module_matches_sdpa_reference():
    attn = aimkern.nn.Attention(32, num_heads=2, qkv_bias=True, is_causal=True).double()
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    qkv = attn.qkv(x).view(2, 9, 3, 2, 16).permute(2, 0, 3, 1, 4)
    o = torch.nn.functional.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], is_causal=True)
    want = attn.proj(o.transpose(1, 2).reshape(2, 9, 32))
    torch.testing.assert_close(attn(x), want)


def test_patch_embed_module_loads_conv_state_dict():
    conv = torch.nn.Conv2d(3, 16, 4, stride=4)
    pe = aimkern.nn.PatchEmbed(4, 3, 16)
    pe.load_state_dict({"proj.weight": conv.weight, "proj.bias": conv.bias})
    x = torch.randn(2, 3, 8, 12)
    torch.testing.assert_close(pe(x), conv(x).flatten(2).transpose(1, 2))


def _loss_and_grads(model, x, **kwargs):
    model.zero_grad()
    loss = model(x, **kwargs)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("head", ["pixel", "token"])
def test_triton_backend_matches_reference_end_to_end(head, device):
    # Every op of the model swapped to the Triton kernels (the interpreter on CPU) through config.backend.
    torch.manual_seed(0)
    ref = tiny(backend="reference", head=head, vocab_size=32, block_size=2).to(device)
    tri = tiny(backend="triton", head=head, vocab_size=32, block_size=2).to(device)
    tri.load_state_dict(ref.state_dict())
    x = images_for(ref).to(device)
    kwargs = dict(prefix_len=torch.tensor([5, 30], device=device))
    if head == "token":
        kwargs["targets"] = torch.randint(0, 32, (2, ref.config.num_patches), device=device)
    loss_r, grads_r = _loss_and_grads(ref, x, **kwargs)
    loss_t, grads_t = _loss_and_grads(tri, x, **kwargs)
    torch.testing.assert_close(loss_t, loss_r, rtol=1e-4, atol=1e-5)
    for name in grads_r:
        torch.testing.assert_close(grads_t[name], grads_r[name], rtol=1e-3, atol=1e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_whole_model_compiles_without_graph_breaks(backend, device):
    model = tiny(backend=backend).to(device)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = images_for(model).to(device)
    prefix = torch.tensor([3, 20], device=device)
    want = model(x, prefix_len=prefix)
    got = compiled(x, prefix_len=prefix)
    got.backward()
    torch.testing.assert_close(got, want)
    assert model.blocks[0].attn.qkv.weight.grad is not None
