"""timm <-> CausalViT conversion: same features both ways (float64), weights carried, bad models refused.

Every timm model is built randomly initialized (pretrained=False): nothing is downloaded. Norm biases and
position embeddings are randomized too, so a weight that failed to carry over cannot go unnoticed.
"""
import pytest
import torch

from aimkern import CausalViT
from aimkern.models.config import TRUNK_FIELDS

timm = pytest.importorskip("timm")
from timm.models.vision_transformer import VisionTransformer  # noqa: E402

SMALL = dict(img_size=28, patch_size=7, embed_dim=64, depth=2, num_heads=4)  # N = 16, head dim 16


def randomize_(model: torch.nn.Module) -> torch.nn.Module:
    """Non-trivial values everywhere (timm initializes norm biases to 0 and weights to 1)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.2 + (0.5 if p.ndim == 1 else 0.0))
    return model


def images_for(vit, batch: int = 3) -> torch.Tensor:
    size = vit.patch_embed.img_size
    return torch.randn(batch, vit.patch_embed.proj.in_channels, *size, dtype=torch.float64)


def assert_same_features(vit, cv):
    vit, cv = vit.double().eval(), cv.double().eval()
    x = images_for(vit)
    with torch.no_grad():
        want = vit.forward_features(x)
        got = cv.forward_features(x, is_causal=False)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


TIMM_MODELS = {
    # a class-token-free ViT: global_pool="avg" puts timm's final norm after pooling (fc_norm)
    "vit_avg_fc_norm": lambda: VisionTransformer(class_token=False, global_pool="avg", num_classes=0, **SMALL),
    # the same with the norm inside forward_features
    "vit_avg_final_norm": lambda: VisionTransformer(class_token=False, global_pool="avg", fc_norm=False,
                                                    num_classes=10, **SMALL),
    # AIMv2: RMSNorm, SwiGLU, patch norm, no biases except the patch projection's
    "aimv2": lambda: timm.create_model("aimv2_large_patch14_224", pretrained=False, **SMALL),
}


@pytest.mark.parametrize("name", sorted(TIMM_MODELS))
def test_from_timm_features_equal_timm(name):
    vit = randomize_(TIMM_MODELS[name]())
    cv = CausalViT.from_timm(vit)
    assert isinstance(cv, CausalViT)
    assert_same_features(vit, cv)


@pytest.mark.parametrize("name", sorted(TIMM_MODELS))
def test_round_trip_through_to_timm(name):
    vit = randomize_(TIMM_MODELS[name]())
    cv = CausalViT.from_timm(vit)
    back = cv.to_timm()
    assert isinstance(back, VisionTransformer)
    assert_same_features(back, cv)
    trunk = {k: v for k, v in vit.state_dict().items() if not k.startswith("head.")}
    for k, v in trunk.items():
        torch.testing.assert_close(back.state_dict()[k].double(), v.double(), rtol=0, atol=0, msg=k)


def test_aimv2_config_is_recognized():
    cv = CausalViT.from_timm(timm.create_model("aimv2_large_patch14_224", pretrained=False, **SMALL))
    c = cv.config
    got = (c.norm, c.mlp, c.patch_norm, c.bias, c.qkv_bias, c.norm_eps)
    assert got == ("rmsnorm", "swiglu", True, False, False, 1e-5)
    assert c.mlp_hidden_dim == int(64 * 2.75) and (c.img_size, c.patch_size, c.depth, c.num_heads) == (28, 7, 2, 4)
    assert cv.patch_embed.proj.bias is not None  # AIMv2's patch projection keeps its bias
    assert c.patch_bias is True
    fresh = CausalViT(c)  # the converted weights load into a model built from the converted config alone
    fresh.load_state_dict(cv.state_dict(), strict=True)


@pytest.mark.parametrize("preset,overrides", [
    ("vit-tiny", {}),
    # AIMv1 layout: sin-cos positions (a buffer), no biases anywhere, a deep pixel head (not converted)
    ("aim-600m", dict(img_size=28, dim=64, depth=2, num_heads=4, head_depth=1, head_width=32)),
    ("aimv2-large", dict(img_size=28, dim=64, depth=2, num_heads=4)),
])
def test_to_timm_features_equal_causal_vit(preset, overrides):
    cv = randomize_(CausalViT.from_preset(preset, **overrides))
    vit = cv.to_timm()
    assert vit.cls_token is None and vit.global_pool == "avg"
    assert_same_features(vit, cv)
    again = CausalViT.from_timm(vit)
    assert_same_features(vit, again)


def test_overrides_set_the_pretraining_head_and_mask():
    vit = VisionTransformer(class_token=False, global_pool="avg", **SMALL)
    cv = CausalViT.from_timm(vit, head="token", vocab_size=32, block_size=4)
    assert (cv.config.head, cv.config.vocab_size, cv.config.block_size) == ("token", 32, 4)
    images = torch.randn(2, 3, 28, 28)
    loss = cv(images, targets=torch.randint(0, 32, (2, 16)))
    assert torch.isfinite(loss)
    with pytest.raises(ValueError, match="fixed by the timm model"):
        CausalViT.from_timm(vit, dim=128)


@pytest.mark.parametrize("kwargs,match", [
    (dict(class_token=True, global_pool="token"), "class and register tokens"),
    (dict(class_token=False, global_pool="avg", reg_tokens=2), "class and register tokens"),
    (dict(class_token=False, global_pool="avg", init_values=1e-5), "layer scale"),
    (dict(class_token=False, global_pool="avg", qk_norm=True), "q/k norm"),
    (dict(class_token=False, global_pool="avg", pre_norm=True), "pre_norm"),
    (dict(class_token=False, global_pool="avg", act_layer="gelu_tanh"), "exact GELU"),
])
def test_unsupported_timm_models_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CausalViT.from_timm(VisionTransformer(**SMALL, **kwargs))


def test_bad_arguments():
    with pytest.raises(ValueError, match="expected a timm VisionTransformer"):
        CausalViT.from_timm(torch.nn.Linear(2, 2))
    from aimkern.integrations.timm_convert import to_timm

    with pytest.raises(TypeError, match="expected a CausalViT"):
        to_timm(torch.nn.Linear(2, 2))


def test_layernorm_biases_without_linear_biases_are_in_the_config():
    """timm's LayerNorms have a bias even when its linears have none: the config says so (norm_bias), so a
    CausalViT built from the converted config alone takes the converted weights."""
    vit = randomize_(VisionTransformer(class_token=False, global_pool="avg", fc_norm=False, qkv_bias=False,
                                       proj_bias=False, **SMALL))
    cv = CausalViT.from_timm(vit)
    assert (cv.config.bias, cv.config.norm_bias, cv.config.has_norm_bias) == (False, True, True)
    CausalViT(cv.config).load_state_dict(cv.state_dict(), strict=True)
    assert_same_features(vit, cv)


@pytest.mark.parametrize("field", TRUNK_FIELDS)
def test_every_trunk_field_is_fixed_by_the_timm_model(field):
    """The timm conversion and the checkpoint loader share one TRUNK_FIELDS: none of them is an override."""
    vit = VisionTransformer(class_token=False, global_pool="avg", **SMALL)
    with pytest.raises(ValueError, match=f"overrides \\['{field}'\\] are fixed by the timm model"):
        CausalViT.from_timm(vit, **{field: None})
