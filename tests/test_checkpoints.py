"""CausalViT.from_checkpoint / save_checkpoint: every layout in, features equal to the source model's, and out.

ml-aim (AIMv1, AIMv2) is checked against golden fixtures made by Apple's own code (tests/fixtures/README.md);
timm and transformers models are built here from the installed packages (2 blocks, random weights).
"""
import os

import numpy as np
import pytest
import torch

from aimkern import CausalViT, ViTConfig
from aimkern.checkpoints import detect_layout, read_file
from aimkern.checkpoints.layouts import from_causal_vit
from aimkern.models.config import mlp_ratio_for

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "apple")
TINY = dict(img_size=28, patch_size=7, dim=64, depth=2, num_heads=4)  # the fixtures' trunk


def fixture(name: str) -> dict:
    return torch.load(os.path.join(FIX, name), weights_only=True)


def randomize_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_((1 + 0.2 * torch.randn(p.shape, generator=g)) if "norm" in name and name.endswith("weight")
                    else 0.1 * torch.randn(p.shape, generator=g))
    return module


def features(model: CausalViT, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval().forward_features(x, is_causal=False)


def close(a, b, atol=2e-5):
    assert a.shape == b.shape
    err = (a - b).abs().max().item()
    assert err < atol, f"max abs error {err}"


# ------------------------------------------------------------------------------------------------------ ml-aim
@pytest.mark.parametrize("name,key,overrides", [
    ("ml_aim_v1.pt", "backbone", dict(img_size=28, head_depth=0)),  # sin-cos: the size is not in the weights
    ("ml_aim_v2.pt", "state_dict", {}),
    ("ml_aim_v2_native.pt", "state_dict", dict(img_size=28)),
])
def test_ml_aim_features_equal_apples_code(name, key, overrides, capsys):
    fx = fixture(name)
    model = CausalViT.from_checkpoint(fx[key], num_heads=fx["num_heads"], **overrides)
    close(features(model, fx["images"]), fx["features"])
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and ("ml-aim-v1" if "v1" in name else "ml-aim-v2") in out[0] and "dim=64" in out[0]


def test_ml_aim_layout_detection_and_inferred_configs():
    v1, v2 = fixture("ml_aim_v1.pt")["backbone"], fixture("ml_aim_v2.pt")["state_dict"]
    assert detect_layout(v1) == "ml-aim-v1" and detect_layout(v2) == "ml-aim-v2"
    c1 = CausalViT.from_checkpoint(v1, num_heads=4, img_size=28, head_depth=0, verbose=False).config
    assert (c1.norm, c1.norm_eps, c1.mlp, c1.pos_embed, c1.patch_norm) == ("layernorm", 1e-6, "gelu", "sincos", True)
    assert (c1.qkv_bias, c1.bias, c1.has_norm_bias, c1.has_patch_bias) == (False, False, True, True)
    c2 = CausalViT.from_checkpoint(v2, num_heads=4, verbose=False).config
    got = (c2.norm, c2.norm_eps, c2.mlp, c2.mlp_hidden_dim, c2.pos_embed)
    assert got == ("rmsnorm", 1e-5, "swiglu", 176, "learned")
    # The fixtures' 64-wide trunks (4 heads of 16) match no released width, and AIM's heads are 128 wide:
    # the head count is not guessed (it once loaded as 64 // 64 = 1 head).
    with pytest.raises(ValueError, match="num_heads="):
        CausalViT.from_checkpoint(v1, verbose=False, img_size=28, head_depth=0)
    with pytest.raises(ValueError, match="num_heads"):  # dim 48: no released model either
        CausalViT.from_checkpoint({k: v[:48] if v.shape and v.shape[0] == 64 else v for k, v in v1.items()},
                                  verbose=False)


def _released_shapes(config: ViTConfig, layout: str) -> dict:
    """The trunk state dict a ``layout`` checkpoint of ``config`` would hold (meta tensors: shapes only)."""
    with torch.device("meta"):
        model = CausalViT(config)
    trunk = {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}
    return from_causal_vit(trunk, layout, swiglu=config.mlp == "swiglu")


_V1 = dict(depth=1, head_depth=0)
_V2 = dict(depth=1, img_size=28)


@pytest.mark.parametrize("preset,overrides,layout,heads", [
    ("aim-600m", dict(_V1, dim=1024, num_heads=8), "ml-aim", 8),  # AIMv1's heads are 128 wide (was 16)
    ("aimv2-large", dict(_V2, dim=2560, num_heads=20), "hf", 20),  # AIMv2's too (was 40)
    ("vit-h14", dict(depth=1), "timm", 16),  # a released ViT width: ViT-H's 16 heads of 80 (was 20)
    ("vit-b16", dict(depth=1), "timm", 12),
])
def test_heads_come_from_released_widths_or_the_familys_head_width(preset, overrides, layout, heads):
    from aimkern.checkpoints.infer import infer_config
    from aimkern.checkpoints.layouts import to_causal_vit

    state = _released_shapes(ViTConfig.from_preset(preset, **overrides), layout)
    found = detect_layout(state)
    assert infer_config(to_causal_vit(state, found)[0], found).num_heads == heads


@pytest.mark.parametrize("config", [
    ViTConfig.from_preset("vit-b16", depth=1, dim=640, num_heads=5),  # a ViT of no released width (was 10)
    # SwiGLU with biased LayerNorms: no released family (a 1024-wide one of 8 heads of 128 loaded as 16)
    ViTConfig.from_preset("vit-b16", depth=1, dim=1024, num_heads=8, mlp="swiglu", norm_bias=True),
])
def test_a_width_no_family_fixes_is_refused_and_num_heads_loads_it(config):
    state = {k: torch.zeros(v.shape) for k, v in _released_shapes(config, "timm").items()}
    with pytest.raises(ValueError, match=r"num_heads=.*preset="):
        CausalViT.from_checkpoint(state, verbose=False)
    model = CausalViT.from_checkpoint(state, num_heads=config.num_heads, verbose=False)
    assert model.config.num_heads == config.num_heads and model.blocks[0].attn.num_heads == config.num_heads


@pytest.mark.parametrize("preset,name,key", [
    ("aim-600m", "ml_aim_v1.pt", "backbone"), ("aim-7b", "ml_aim_v1.pt", "backbone"),
    ("aimv2-large", "ml_aim_v2.pt", "state_dict"), ("aimv2-3b-448", "ml_aim_v2.pt", "state_dict"),
    ("aimv2-large-native", "ml_aim_v2_native.pt", "state_dict"),
])
def test_presets_have_ml_aims_exact_layout(preset, name, key):
    """Shrunk to the fixture's size, each preset loads Apple's weights with strict=True: no key left over, none
    unset, every shape equal; its own names map onto exactly ml-aim's."""
    fx = fixture(name)
    width = {} if preset.startswith("aim-") else dict(mlp_ratio=mlp_ratio_for(64, 176))  # the fixture's SwiGLU
    cfg = ViTConfig.from_preset(preset, **TINY, **width, head_depth=0)
    model = CausalViT.from_checkpoint(fx[key], preset=cfg, verbose=False)
    close(features(model, fx["images"]), fx["features"])
    trunk = {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}
    theirs = from_causal_vit(trunk, "ml-aim", swiglu=cfg.mlp == "swiglu")
    assert {k: tuple(v.shape) for k, v in theirs.items()} == {k: tuple(v.shape) for k, v in fx[key].items()}


def _ml_aim_v1_count(dim: int, depth: int, patch: int = 14) -> int:
    # ml-aim aim-v1: Conv2d(3, dim, patch) + bias, patch LayerNorm; per block 2 LayerNorms, qkv and proj
    # without bias, MLP 4x without bias; post_trunk_norm.
    block = 4 * dim + 3 * dim * dim + dim * dim + 2 * 4 * dim * dim
    return 3 * patch * patch * dim + dim + 2 * dim + depth * block + 2 * dim


@pytest.mark.parametrize("preset,dim,depth", [("aim-600m", 1536, 24), ("aim-1b", 2048, 24), ("aim-3b", 3072, 24),
                                              ("aim-7b", 4096, 32)])
def test_full_size_aim_v1_trunks_count_exactly_as_ml_aim(preset, dim, depth):
    with torch.device("meta"):
        model = CausalViT.from_preset(preset)
    assert model.num_parameters(trunk_only=True) == _ml_aim_v1_count(dim, depth)
    assert model.config.head_depth == 12 and model.config.head_width == 2048  # the pixel head is kept


# ------------------------------------------------------------------------------------------------------ timm
def timm_models():
    import timm
    from timm.models.vision_transformer import VisionTransformer

    small = dict(img_size=28, patch_size=7, embed_dim=64, depth=2, num_heads=4)
    return {
        "aimv2": timm.create_model("aimv2_large_patch14_224", pretrained=False, **small),
        "vit": VisionTransformer(class_token=False, global_pool="avg", fc_norm=False, num_classes=0, **small),
    }


@pytest.mark.parametrize("kind", ["aimv2", "vit"])
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_timm_state_dict_files_load_exactly(kind, suffix, tmp_path):
    from aimkern.checkpoints import write_file

    vit = randomize_(timm_models()[kind]).eval()
    path = str(tmp_path / f"timm{suffix}")
    write_file(vit.state_dict(), path)
    model = CausalViT.from_checkpoint(path, num_heads=4, verbose=False)  # heads: not in the shapes
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        close(features(model, x), vit.forward_features(x))
    assert model.config.norm == ("rmsnorm" if kind == "aimv2" else "layernorm")


def test_timm_classifier_keys_are_not_skipped_silently():
    vit = timm_models()["vit"]
    sd = dict(vit.state_dict(), **{"head.weight": torch.zeros(10, 64), "head.bias": torch.zeros(10)})
    with pytest.raises(ValueError, match=r"map to no CausalViT parameter: \['head.bias', 'head.weight'\]"):
        CausalViT.from_checkpoint(sd, num_heads=4)


# ------------------------------------------------------------------------------------------------------ transformers
def hf_model(native: bool = False, use_head: bool = False):
    from transformers import Aimv2VisionConfig, Aimv2VisionModel

    cfg = Aimv2VisionConfig(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                            image_size=28, patch_size=7, use_head=use_head, is_native=native)
    return randomize_(Aimv2VisionModel(cfg)).eval()


@pytest.mark.parametrize("native", [False, True])
def test_transformers_aimv2_loads_exactly(native, tmp_path):
    from aimkern.checkpoints import write_file

    hf = hf_model(native)
    path = str(tmp_path / "model.safetensors")
    write_file({f"vision_model.{k}": v for k, v in hf.state_dict().items()}, path)  # as inside Aimv2Model
    model = CausalViT.from_checkpoint(path, num_heads=4, **({"img_size": 28} if native else {}), verbose=False)
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        close(features(model, x), hf(pixel_values=x).last_hidden_state)
    assert model.checkpoint_source["layout"] == "hf"


def test_transformers_pooling_head_is_reported():
    with pytest.raises(ValueError, match="head.k_proj.weight"):
        CausalViT.from_checkpoint(hf_model(use_head=True).state_dict(), num_heads=4)
    model = CausalViT.from_checkpoint(hf_model(use_head=True).state_dict(), num_heads=4, strict=False,
                                      verbose=False)
    assert model.config.dim == 64


# ------------------------------------------------------------------------------------------------------ save
def tiny_v2(**kw) -> CausalViT:
    return randomize_(CausalViT(ViTConfig.from_preset("aimv2-large", **TINY, **kw)), 3)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_aimkern_layout_round_trips_everything(suffix, tmp_path):
    model = randomize_(CausalViT.from_preset("aim-600m", **TINY, head_depth=1, head_width=32))
    path = model.save_checkpoint(str(tmp_path / f"m{suffix}"))
    back = CausalViT.from_checkpoint(path, verbose=False)
    assert back.config == model.config and back.checkpoint_source["layout"] == "aimkern"
    for k, v in model.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k


def test_timm_layout_goes_back_to_timm(tmp_path):
    for model in (tiny_v2(), randomize_(CausalViT.from_preset("aim-600m", **TINY, head_depth=0))):
        path = model.save_checkpoint(str(tmp_path / "timm.pth"), layout="timm")
        vit = model.to_timm().eval()
        vit.load_state_dict(read_file(path)[0], strict=True)
        x = torch.randn(2, 3, 28, 28)
        with torch.no_grad():
            close(vit.forward_features(x), features(model, x))


def test_hf_layout_goes_back_to_transformers(tmp_path):
    from transformers import Aimv2VisionModel

    model = tiny_v2()
    model.save_checkpoint(str(tmp_path / "hf"), layout="hf")
    hf = Aimv2VisionModel.from_pretrained(str(tmp_path / "hf")).eval()
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        close(hf(pixel_values=x).last_hidden_state, features(model, x))
    with pytest.raises(ValueError, match="norm='layernorm'"):
        CausalViT.from_preset("vit-tiny").save_checkpoint(str(tmp_path / "x.safetensors"), layout="hf")


def test_ml_aim_layout_writes_apples_names(tmp_path):
    fx = fixture("ml_aim_v1.pt")
    model = CausalViT.from_checkpoint(fx["backbone"], num_heads=4, img_size=28, head_depth=0, verbose=False)
    path = model.save_checkpoint(str(tmp_path / "backbone.pth"), layout="ml-aim")
    written = read_file(path)[0]
    assert written.keys() == fx["backbone"].keys()
    assert all(torch.equal(written[k], fx["backbone"][k]) for k in written)
    with pytest.raises(ValueError, match="neither AIMv1"):
        CausalViT.from_preset("vit-tiny", bias=False, patch_bias=True, patch_norm=True).save_checkpoint(
            str(tmp_path / "y.pth"), layout="ml-aim")


# ------------------------------------------------------------------------------------------------------ strictness
def test_strict_lists_every_problem_and_non_strict_reports_them(capsys):
    sd = dict(fixture("ml_aim_v2.pt")["state_dict"])
    sd["trunk.extra.weight"] = torch.zeros(3)
    del sd["trunk.blocks.1.norm_2.weight"]
    sd["trunk.blocks.0.attn.proj.weight"] = torch.zeros(64, 32)
    with pytest.raises(ValueError) as e:
        CausalViT.from_checkpoint(sd, num_heads=4)
    msg = str(e.value)
    assert "trunk.extra.weight" in msg and "blocks.1.norm2.weight" in msg
    assert "blocks.0.attn.proj.weight: (64, 32)" in msg
    model = CausalViT.from_checkpoint(sd, num_heads=4, strict=False)
    assert "skipped 3 problem(s)" in capsys.readouterr().out
    assert torch.equal(model.blocks[0].norm1.weight.detach(), sd["trunk.blocks.0.norm_1.weight"])


def test_preset_that_does_not_fit_is_an_error():
    with pytest.raises(ValueError, match="CausalViT parameters left unset"):
        CausalViT.from_checkpoint(fixture("ml_aim_v2.pt")["state_dict"], preset=ViTConfig.from_preset(
            "vit-tiny", **TINY))


def test_aimkern_train_checkpoint_with_numpy_rng_loads_weights_only(tmp_path):
    model = CausalViT.from_preset("vit-tiny")
    path = str(tmp_path / "checkpoint.pt")
    torch.save({"model": model.state_dict(), "config": model.config.to_dict(), "step": 3,
                "rng": {"numpy": np.random.get_state(), "torch": torch.get_rng_state()}}, path)
    back = CausalViT.from_checkpoint(path, verbose=False)
    assert back.config == model.config
    assert torch.equal(back.head.out.weight, model.head.out.weight)


@pytest.mark.parametrize("src,exc,match", [
    ("model.ckpt", ValueError, "must end in one of"),
    ("/nonexistent/model.pth", FileNotFoundError, "no checkpoint file"),
    (3, TypeError, "src must be a path or a state dict"),
    ({"a": 1}, ValueError, "state dict of named tensors"),
    ({"foo.weight": torch.zeros(2)}, ValueError, "unrecognized checkpoint layout"),
])
def test_bad_sources(src, exc, match):
    with pytest.raises(exc, match=match):
        CausalViT.from_checkpoint(src)


def test_bad_save_arguments(tmp_path):
    model = CausalViT.from_preset("vit-tiny")
    with pytest.raises(ValueError, match="layout must be one of"):
        model.save_checkpoint(str(tmp_path / "a.pt"), layout="onnx")
    with pytest.raises(ValueError, match="must end in one of"):
        model.save_checkpoint(str(tmp_path / "a.npz"))
    with pytest.raises(TypeError, match="preset must be None"):
        CausalViT.from_checkpoint(model.state_dict(), preset=3)


@pytest.mark.parametrize("preset", ["aim-600m", "aim-3b", "aim-7b", "aimv2-large", "aimv2-huge-336", "aimv2-1b",
                                    "aimv2-3b-448", "aimv2-large-native"])
def test_full_size_configs_are_inferred_from_released_layouts(preset):
    """Released checkpoints' shapes (built on the meta device) give back the preset, heads included."""
    from aimkern.checkpoints.infer import infer_config, matching_preset
    from aimkern.checkpoints.layouts import to_causal_vit

    want = ViTConfig.from_preset(preset)
    with torch.device("meta"):
        model = CausalViT(want)
    trunk = {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}
    released = from_causal_vit(trunk, "ml-aim", swiglu=want.mlp == "swiglu")
    layout = detect_layout(released)
    got = infer_config(to_causal_vit(released, layout)[0], layout)
    assert got.trunk() == want.trunk()
    assert matching_preset(got) == preset


def test_lit_models_vision_encoder_loads_and_its_text_tower_is_reported():
    fx = fixture("ml_aim_v2.pt")
    lit = {f"image_encoder.{k}": v for k, v in fx["state_dict"].items()}
    lit.update({"text_encoder.preprocessor.text_embedding.weight": torch.zeros(10, 8),
                "image_projector.weight": torch.zeros(8, 64)})
    with pytest.raises(ValueError, match="image_projector.weight"):
        CausalViT.from_checkpoint(lit, num_heads=4)
    model = CausalViT.from_checkpoint(lit, num_heads=4, strict=False, verbose=False)
    close(features(model, fx["images"]), fx["features"])


@pytest.mark.parametrize("preset,overrides", [
    ("vit-tiny", {}), ("vit-tiny", dict(head="token", vocab_size=50)),
    ("aim-600m", dict(TINY, head_depth=2, head_width=32)), ("aimv2-large", TINY),
])
def test_a_plain_causal_vit_state_dict_loads_with_its_head(preset, overrides):
    model = randomize_(CausalViT.from_preset(preset, **overrides))
    heads = dict(num_heads=model.config.num_heads)  # not in the shapes
    back = CausalViT.from_checkpoint(model.state_dict(), verbose=False, **heads,
                                     **({"img_size": 28} if model.config.pos_embed == "sincos" else {}))
    assert back.checkpoint_source["layout"] == "aimkern"
    for f in ("head", "head_depth", "head_width", "vocab_size", "norm", "mlp", "has_norm_bias"):
        assert getattr(back.config, f) == getattr(model.config, f), f
    for k, v in model.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k


def test_optional_biases_compare_by_what_they_build(tmp_path):
    """norm_bias / patch_bias None follow ``bias``: a config that spells them out is the same trunk, so a ViT-B/16
    state dict finds its preset, and a preset that spells them out fits a checkpoint that left them None."""
    from aimkern.checkpoints.infer import infer_config, matching_preset

    with torch.device("meta"):
        vit_b = CausalViT.from_preset("vit-b16")
    inferred = infer_config({k: v for k, v in vit_b.state_dict().items() if not k.startswith("head.")}, "timm")
    assert (inferred.patch_bias, vit_b.config.patch_bias) == (True, None)
    assert matching_preset(inferred) == "vit-b16"
    model = CausalViT.from_preset("vit-tiny")
    path = model.save_checkpoint(tmp_path / "tiny.pt")
    spelled = ViTConfig.from_preset("vit-tiny", norm_bias=True, patch_bias=True)
    loaded = CausalViT.from_checkpoint(path, preset=spelled, verbose=False)
    torch.testing.assert_close(loaded.state_dict(), model.state_dict(), rtol=0, atol=0)


def test_a_checkpoint_whose_config_says_head_dim_still_loads():
    """Configs stored before head_dim was renamed head_width load, head included (with a DeprecationWarning)."""
    model = randomize_(CausalViT.from_preset("aim-600m", **TINY, head_depth=1, head_width=32))
    old = model.config.to_dict()
    old["head_dim"] = old.pop("head_width")
    with pytest.warns(DeprecationWarning, match="head_dim"):
        loaded = CausalViT.from_checkpoint({"model": model.state_dict(), "config": old}, verbose=False)
    assert loaded.config == model.config
    torch.testing.assert_close(loaded.state_dict(), model.state_dict(), rtol=0, atol=0)
    with pytest.warns(DeprecationWarning, match="head_dim"):  # the old name as an override, too
        again = CausalViT.from_checkpoint(model.state_dict(), preset="aim-600m", verbose=False, **TINY,
                                          head_depth=1, head_dim=32)
    assert again.config.head_width == 32


def test_the_models_format_methods_load_their_providers_on_first_call(tmp_path):
    """CausalViT's module imports neither aimkern.checkpoints nor the timm conversion (they import it); its
    forwarders find them through aimkern.hooks, which the package root fills before any import."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from aimkern.models.causal_vit import CausalViT\n"
        "assert not any(m.startswith(('aimkern.checkpoints', 'aimkern.integrations')) for m in sys.modules)\n"
        "model = CausalViT.from_preset('vit-tiny')\n"
        f"path = model.save_checkpoint({str(tmp_path / 'm.pt')!r})\n"
        "again = CausalViT.from_checkpoint(path, verbose=False)\n"
        "assert again.config == model.config and 'aimkern.checkpoints.load' in sys.modules\n"
        "print('ok')\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
    from aimkern import hooks

    with pytest.raises(LookupError, match="no module provides it"):
        hooks.provided("CausalViT.to_onnx")
