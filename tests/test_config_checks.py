"""ViTConfig validates every field with a message naming it; the ops refuse the same inputs on every backend
and name the argument (attention's scale, linear_cross_entropy's z_loss / targets / E / dtypes, patch_embed's
dtypes); the token head, like the pixel head, returns 0 when the prefix leaves no target."""
import pytest
import torch

from aimkern import CausalViT, ViTConfig, attention, linear_cross_entropy, patch_embed
from aimkern.models.config import PRESETS
from aimkern.reference import linear_cross_entropy_reference


def test_every_preset_is_valid():
    for name, cfg in PRESETS.items():
        assert ViTConfig.from_dict(cfg.to_dict()) == cfg, name


@pytest.mark.parametrize("field, value", [
    ("img_size", -32), ("img_size", 32.0), ("patch_size", 0), ("in_chans", 0), ("dim", 0), ("depth", 1.5),
    ("depth", True), ("num_heads", 0), ("block_size", 0), ("head_depth", -1), ("head_width", -1), ("vocab_size", 1),
    ("is_causal", "yes"), ("prefix", 1), ("qkv_bias", None), ("bias", "no"), ("patch_norm", 0), ("norm_pix", "y"),
    ("patch_bias", "yes"), ("mlp_ratio", 0.0), ("mlp_ratio", float("nan")), ("norm_eps", -1e-6), ("norm", "batch"),
    ("mlp", "relu"), ("pos_embed", "rope"), ("head", "mse"), ("backend", "cuda"), ("norm_bias", "yes"),
])
def test_config_refuses_a_bad_field_by_name(field, value):
    with pytest.raises(ValueError, match=f"ViTConfig: {field} "):
        ViTConfig.from_preset("vit-tiny", **{field: value})


def test_norm_bias_is_separate_from_the_linear_bias():
    cfg = ViTConfig.from_preset("vit-tiny", bias=False, norm_bias=True)  # AIMv1: biases on the norms only
    assert cfg.has_norm_bias and not cfg.bias
    model = CausalViT(cfg)
    assert model.blocks[0].norm1.bias is not None and model.blocks[0].attn.proj.bias is None
    assert not ViTConfig.from_preset("vit-tiny", norm_bias=False).has_norm_bias
    with pytest.raises(ValueError, match="norm_bias=True needs norm='layernorm'"):
        ViTConfig.from_preset("vit-tiny", norm="rmsnorm", norm_bias=True)


def test_config_geometry_errors_name_the_fields():
    with pytest.raises(ValueError, match="img_size=30 must be a multiple of patch_size=4"):
        ViTConfig.from_preset("vit-tiny", img_size=30)
    with pytest.raises(ValueError, match="dim=64 must be divisible by num_heads=3"):
        ViTConfig.from_preset("vit-tiny", num_heads=3)


# ------------------------------------------------------------------------------------------------------
def test_attention_scale_must_be_a_real_number():
    q = torch.randn(1, 2, 4, 16)
    with pytest.raises(TypeError, match="scale must be None or a float, got bool"):
        attention(q, q, q, scale=True)
    with pytest.raises(ValueError, match="scale must be a finite float"):
        attention(q, q, q, scale=float("nan"))
    assert torch.allclose(attention(q, q, q, scale=1), attention(q, q, q, scale=1.0))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_cross_entropy_refuses_the_same_inputs_on_both_backends(backend):
    x, w, t = torch.randn(3, 16), torch.randn(5, 16), torch.tensor([1, 2, 3])
    with pytest.raises(ValueError, match="z_loss must be a finite float >= 0"):
        linear_cross_entropy(x, w, t, z_loss=float("nan"), backend=backend)
    with pytest.raises(ValueError, match="label_smoothing"):
        linear_cross_entropy(x, w, t, label_smoothing=float("nan"), backend=backend)
    with pytest.raises(TypeError, match="target must be an integer tensor"):
        linear_cross_entropy(x, w, t.float(), backend=backend)
    with pytest.raises(ValueError, match="E must be >= 1"):
        linear_cross_entropy(torch.randn(3, 0), torch.randn(5, 0), t, backend=backend)
    with pytest.raises(TypeError, match="linear_weight must have input's dtype"):
        linear_cross_entropy(x, w.half(), t, backend=backend)


def test_cross_entropy_reference_function_refuses_float_targets_and_mixed_dtypes():
    x, w = torch.randn(3, 8), torch.randn(5, 8)
    with pytest.raises(TypeError, match="target must be an integer tensor"):
        linear_cross_entropy_reference(x, w, torch.tensor([1.7, 2.0, 3.0]))
    with pytest.raises(TypeError, match="linear_weight must have input's dtype"):
        linear_cross_entropy_reference(x, w.double(), torch.tensor([1, 2, 3]))


def test_patch_embed_reference_names_the_mixed_dtype():
    with pytest.raises(TypeError, match="weight must have images' dtype"):
        patch_embed(torch.randn(1, 3, 8, 8), torch.randn(4, 3, 4, 4).double(), backend="reference")


def test_token_head_refuses_float_targets_and_gives_0_without_targets():
    model = CausalViT.from_preset("vit-tiny", head="token", vocab_size=16).train()
    images, ids = torch.randn(2, 3, 32, 32), torch.randint(0, 16, (2, 64))
    with pytest.raises(TypeError, match="targets must be integer token ids"):
        model(images, targets=ids.float())
    loss = model(images, prefix_len=64, targets=ids)  # the prefix covers every patch: nothing to predict
    assert loss.item() == 0.0
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    pixel = CausalViT.from_preset("vit-tiny")
    assert pixel(images, prefix_len=64).item() == 0.0  # the pixel head's convention
    mean = model(images, prefix_len=3, targets=ids)
    h = model.head.features(model.forward_features(images, prefix_len=3)[:, :63])
    tgt = ids[:, 1:].masked_fill(torch.arange(1, 64).view(1, -1) < 3, -100)
    assert torch.equal(mean, linear_cross_entropy(h, model.head.out.weight, tgt, linear_bias=model.head.out.bias))
