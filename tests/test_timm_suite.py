"""patch_timm under the paths timm's own tests/test_models.py runs, on tiny ViTs with nothing downloaded.

timm's suite (huggingface/pytorch-image-models, tests/test_models.py) checks forward, backward, grad
checkpointing, forward_intermediates, features_only, FX feature extraction (forward and backward),
TorchScript, and TorchScript of the FX graph. The same paths run here on a patched model and are held to
the unpatched timm model with the same weights. Two variants: the common packed path (q_norm / k_norm are
Identity) and the unpacked path (qk_norm, scale_norm, register tokens, avg pool). CPU: "auto" runs the
reference backend; the last test runs the Triton kernels (interpreter) through FX and TorchScript.
"""
import copy

import pytest
import torch

timm = pytest.importorskip("timm")
fx_extraction = pytest.importorskip("torchvision.models.feature_extraction")

import aimkern  # noqa: E402
from aimkern.integrations.timm import TimmAttention, timm_attention_packed, timm_attention_unpacked  # noqa: E402
from conftest import HAS_CUDA  # noqa: E402
from timm.models import get_notrace_functions, get_notrace_modules  # noqa: E402

DEVICE = "cuda" if HAS_CUDA else "cpu"
VARIANTS = {
    "packed": dict(),
    "qknorm_reg_gap": dict(qk_norm=True, scale_attn_norm=True, class_token=False, reg_tokens=1, global_pool="avg"),
}


@pytest.fixture(autouse=True)
def _one_config_per_family(no_autotune):
    """On CUDA: no autotuning of the attention kernels (fewer compiles; the benchmark covers tuning)."""


def pair(variant, backend="auto", **kw):
    """(timm model, the same weights patched with aimkern), both in eval mode."""
    torch.manual_seed(0)
    args = dict(pretrained=False, img_size=32, depth=2, num_classes=5, **VARIANTS[variant])
    args.update(kw)
    ref = timm.create_model("vit_tiny_patch16_224", **args).to(DEVICE).eval()
    with torch.no_grad():  # non-trivial norms, so the q_norm / k_norm path is really exercised
        for name, p in ref.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    model = aimkern.patch_timm(copy.deepcopy(ref), backend=backend)
    attn = [m for m in model.modules() if isinstance(m, TimmAttention)]
    assert len(attn) == args["depth"] and all(m.packed == (variant == "packed") for m in attn)
    return ref, model


def images(b=2):
    return torch.randn(b, 3, 32, 32, device=DEVICE)


def close(a, b):
    return torch.allclose(a, b, atol=1e-5, rtol=1e-4)


def fx_extractor(model, train=False):
    """timm's test_models._create_fx_model: torchvision's extractor with timm's leaf modules / functions."""
    kw = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions(),
              param_shapes_constant=True)
    train_nodes, eval_nodes = fx_extraction.get_graph_node_names(model, tracer_kwargs=kw)
    assert "blocks.0.attn" in eval_nodes and not any(n.startswith("blocks.0.attn.") for n in eval_nodes)  # a leaf
    return fx_extraction.create_feature_extractor(
        model, train_return_nodes=[train_nodes[-1]], eval_return_nodes=[eval_nodes[-1]], tracer_kwargs=kw
    )


@pytest.mark.parametrize("variant", VARIANTS)
def test_forward_backward_and_checkpointing(variant):
    ref, model = pair(variant)
    ref.train(), model.train()
    x = images()
    y, y_ref = model(x), ref(x)
    assert close(y, y_ref) and not torch.isnan(y).any()
    y.square().mean().backward()
    y_ref.square().mean().backward()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert p.grad is not None and torch.allclose(p.grad, q.grad, atol=1e-5, rtol=1e-3), name
    model.eval().set_grad_checkpointing()
    assert close(model(x), ref.eval()(x))


@pytest.mark.parametrize("variant", VARIANTS)
def test_forward_intermediates_and_features_only(variant):
    ref, model = pair(variant)
    x = images(1)
    out, inter = model.forward_intermediates(x, output_fmt="NCHW")
    out_ref, inter_ref = ref.forward_intermediates(x, output_fmt="NCHW")
    assert close(out, out_ref) and close(out, model.forward_features(x))
    assert len(inter) == len(inter_ref) == 2 and all(close(a, b) for a, b in zip(inter, inter_ref))
    torch.manual_seed(0)  # features_only wraps the ViT (FeatureGetterNet); patch_timm finds the blocks inside
    feats_ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=3, features_only=True,
                                  **VARIANTS[variant]).to(DEVICE).eval()
    feats = aimkern.patch_timm(copy.deepcopy(feats_ref))
    got, want = feats(x), feats_ref(x)
    assert len(got) == len(feats.feature_info.channels()) and all(close(a, b) for a, b in zip(got, want))


@pytest.mark.parametrize("variant", VARIANTS)
def test_fx_feature_extraction_forward_backward_and_script(variant):
    """timm's test_model_forward_fx / backward_fx / forward_fx_torchscript: TimmAttention is a leaf."""
    ref, model = pair(variant)
    x = images(1)
    fx_model = fx_extractor(model)
    (got,) = fx_model(x).values()
    assert close(got, ref(x))
    scripted = torch.jit.script(fx_extractor(model))
    (got_script,) = scripted(x).values()
    assert close(got_script, got)

    train_fx = fx_extractor(model.train(), train=True)
    (y,) = train_fx(images()).values()
    y.mean().backward()
    assert all(p.grad is not None for p in train_fx.parameters())


@pytest.mark.parametrize("variant", VARIANTS)
def test_plain_fx_trace_goes_through(variant):
    """torch.fx.symbolic_trace without timm's leaf list: the kernel call is one wrapped function node, and its
    runtime checks (here: an explicit attn_mask) still run when the graph runs."""
    ref, model = pair(variant)
    gm = torch.fx.symbolic_trace(model)
    fn = timm_attention_packed if variant == "packed" else timm_attention_unpacked
    assert sum(node.op == "call_function" and node.target is fn for node in gm.graph.nodes) == 2
    x = images()
    assert close(gm(x), ref(x))
    n = model.patch_embed.num_patches + model.num_prefix_tokens
    with pytest.raises(ValueError, match="attn_mask"):
        gm(x, attn_mask=torch.ones(n, n, dtype=torch.bool, device=DEVICE))


@pytest.mark.parametrize("variant", VARIANTS)
def test_torchscript(variant):
    """timm's test_model_forward_torchscript: the block is compiled; the kernel call runs in Python."""
    ref, model = pair(variant)
    with timm.layers.set_scriptable(True):
        scripted = torch.jit.script(model)
    x = images()
    assert close(scripted(x), ref(x))
    scripted_attn = getattr(scripted.blocks, "0").attn  # (indexing a scripted Sequential gives the Python one)
    assert isinstance(scripted_attn, torch.jit.ScriptModule) and scripted_attn.original_name == "TimmAttention"
    with pytest.raises(RuntimeError, match="attn_mask"):  # the Python error, raised through the interpreter
        scripted_attn(torch.randn(1, 5, 192, device=DEVICE), torch.ones(5, 5, dtype=torch.bool, device=DEVICE))


def test_triton_backend_through_fx_and_torchscript():
    """The Triton kernels (interpreter on CPU) behind FX and TorchScript, with a block-causal prefix mask."""
    _, model = pair("packed", backend="triton", depth=1)
    aimkern.patch_timm(model, is_causal=True, block_size=2, prefix_len=1, backend="triton")
    x = images()
    want = model(x)
    (got_fx,) = fx_extractor(model)(x).values()
    got_script = torch.jit.script(model)(x)
    assert close(got_fx, want) and close(got_script, want)
    aimkern.patch_timm(model, backend="triton")  # the leaf reads the options at run time: full attention now
    assert not close(model(x), want)
