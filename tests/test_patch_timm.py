"""aimkern.patch_timm: timm ViTs (AIMv2 included) on aimkern attention, weights kept, masks applied.

Models are tiny (img 32 px, 2 blocks, pretrained=False: nothing downloads). The unpatched timm model with a
dense boolean attn_mask is the independent reference for the causal / prefix masks.
"""
import copy
import inspect

import pytest
import torch

timm = pytest.importorskip("timm")

import aimkern  # noqa: E402
from aimkern.integrations.timm import TimmAttention  # noqa: E402
from aimkern.reference.attention import attention_mask  # noqa: E402
from conftest import HAS_CUDA  # noqa: E402
from autograd_graph import graph_node_names  # noqa: E402

HAS_AIMV2 = bool(timm.list_models("aimv2*"))
TIMM_TAKES_MASK = "attn_mask" in inspect.signature(timm.models.vision_transformer.VisionTransformer.forward).parameters
DEVICE = "cuda" if HAS_CUDA else "cpu"
BACKEND = "triton" if HAS_CUDA else "reference"  # the interpreter path is covered by one test below


@pytest.fixture(autouse=True)
def _one_config_per_family(no_autotune):
    """On CUDA: no autotuning (one compile per family); benchmarks/attn_throughput.py checks the tuned picks."""


def tiny_vit(**kw):
    torch.manual_seed(0)
    args = dict(pretrained=False, img_size=32, depth=2, num_classes=5)
    args.update(kw)
    return timm.create_model("vit_tiny_patch16_224", **args).to(DEVICE).eval()


def tiny_aimv2():
    torch.manual_seed(0)
    model = timm.create_model("aimv2_large_patch14_224", pretrained=False, img_size=28, depth=2, embed_dim=64,
                              num_heads=4)
    return model.to(DEVICE).eval()


def images(b=2, size=32):
    return torch.randn(b, 3, size, size, device=DEVICE)


def _n_attention(model):
    return sum(isinstance(m, TimmAttention) for m in model.modules())


def test_full_attention_matches_timm_and_keeps_weights():
    ref = tiny_vit()
    model = aimkern.patch_timm(copy.deepcopy(ref), backend=BACKEND)
    assert _n_attention(model) == 2
    assert list(model.state_dict()) == list(ref.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), ref.state_dict().values()))
    x = images()
    assert torch.allclose(model(x), ref(x), atol=1e-5, rtol=1e-4)


def test_same_parameter_objects_and_gradients():
    ref = tiny_vit()
    before = {name: p for name, p in ref.named_parameters()}
    model = aimkern.patch_timm(ref, backend=BACKEND)  # in place: the very same Parameters
    assert model is ref
    assert all(p is before[name] for name, p in model.named_parameters())
    fresh = tiny_vit()
    x = images()
    model(x).square().sum().backward()
    fresh(x).square().sum().backward()
    for (name, p), q in zip(model.named_parameters(), fresh.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-4, rtol=1e-3), name


@pytest.mark.skipif(not TIMM_TAKES_MASK, reason="this timm's VisionTransformer.forward takes no attn_mask")
@pytest.mark.parametrize(
    "mask",
    [dict(is_causal=True), dict(is_causal=True, block_size=2, prefix_len=1),
     dict(is_causal=True, block_size=2, prefix_len="tensor")],
    ids=["causal", "block_prefix", "per_sample_prefix"],
)
def test_masks_match_timm_with_dense_mask(mask):
    ref = tiny_vit()
    model = copy.deepcopy(ref)
    x = images(3)
    n = ref.patch_embed.num_patches + ref.num_prefix_tokens
    mask = dict(mask)
    if mask.get("prefix_len") == "tensor":
        mask["prefix_len"] = torch.tensor([0, 3, n], device=DEVICE)
    aimkern.patch_timm(model, backend=BACKEND, **mask)
    prefix = mask.get("prefix_len")
    if isinstance(prefix, int):
        prefix = torch.full((3,), prefix, device=DEVICE)
    dense = attention_mask(n, is_causal=True, block_size=mask.get("block_size", 1), prefix_len=prefix, batch=3,
                           device=DEVICE)
    want = ref(x, attn_mask=dense)
    got = model(x)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(got, ref(x), atol=1e-3)  # the mask changes the result: the test can fail


@pytest.mark.skipif(not HAS_AIMV2, reason="this timm has no AIMv2 models")
def test_aimv2_patched():
    ref = tiny_aimv2()
    model = aimkern.patch_timm(copy.deepcopy(ref), backend=BACKEND)
    assert _n_attention(model) == 2
    assert list(model.state_dict()) == list(ref.state_dict())
    x = images(size=28)
    assert torch.allclose(model(x), ref(x), atol=1e-5, rtol=1e-4)


@pytest.mark.skipif(HAS_CUDA, reason="CUDA runs the triton backend in every test above")
def test_triton_backend_under_interpreter():
    """The patched model on the Triton kernels (interpreter) equals the reference backend, fwd and bwd."""
    model = aimkern.patch_timm(tiny_vit(depth=1), is_causal=True, block_size=2, prefix_len=1, backend="triton")
    x = images().requires_grad_()
    y = model(x)
    (gx,) = torch.autograd.grad(y.sum(), (x,))
    aimkern.patch_timm(model, is_causal=True, block_size=2, prefix_len=1, backend="reference")
    y_ref = model(x)
    (gx_ref,) = torch.autograd.grad(y_ref.sum(), (x,))
    assert torch.allclose(y, y_ref, atol=1e-5) and torch.allclose(gx, gx_ref, atol=1e-5)


def test_repatch_updates_options_and_call_time_causal():
    model = aimkern.patch_timm(tiny_vit(), backend=BACKEND)
    attn = model.blocks[0].attn
    aimkern.patch_timm(model, is_causal=True, block_size=3, backend=BACKEND)
    assert model.blocks[0].attn is attn and _n_attention(model) == 2  # updated, not wrapped twice
    assert (attn.is_causal, attn.block_size) == (True, 3)
    x = torch.randn(1, 7, attn.attn_dim, device=DEVICE)
    aimkern.patch_timm(model, is_causal=True, backend=BACKEND)
    causal = attn(x)
    aimkern.patch_timm(model, backend=BACKEND)
    full = attn(x)
    assert torch.allclose(attn(x, is_causal=True), causal)  # timm's call-time is_causal=True is honoured
    assert not torch.allclose(full, causal, atol=1e-4)


def test_errors():
    with pytest.raises(ValueError, match="no timm Attention"):
        aimkern.patch_timm(torch.nn.Sequential(torch.nn.Linear(4, 4)))
    with pytest.raises(ValueError, match="block_size"):
        aimkern.patch_timm(tiny_vit(), block_size=0)
    with pytest.raises(TypeError, match="is_causal"):
        aimkern.patch_timm(tiny_vit(), is_causal=1)
    with pytest.raises(ValueError, match="backend"):
        aimkern.patch_timm(tiny_vit(), backend="cuda")
    model = aimkern.patch_timm(tiny_vit(), backend=BACKEND)
    x = torch.randn(1, 5, 192, device=DEVICE)
    with pytest.raises(ValueError, match="attn_mask"):
        model.blocks[0].attn(x, attn_mask=torch.ones(1, 1, 5, 5, dtype=torch.bool, device=DEVICE))
    dropout = aimkern.patch_timm(tiny_vit(attn_drop_rate=0.1), backend=BACKEND).train()
    with pytest.raises(ValueError, match="dropout"):
        dropout(images())
    dropout.eval()(images())  # eval: dropout is off, so it runs


# ------------------------------------------------------------------------------------------ no copies
COPIES = ("Unbind", "Stack", "Cat", "Clone", "Copy", "Permute", "Transpose", "UnsafeView")


def test_patched_block_makes_no_qkv_copies():
    """The common case (q_norm / k_norm Identity) on the kernels: a whole block's graph goes from the qkv
    linear through views to the packed op and back, with no unbind / stack / permute / copy node; the
    packed op's gradient is the qkv linear's output gradient as it stands. The qk_norm model is the
    control that the walk can see a stack (its one, unavoidable, UnbindBackward)."""
    backend = "triton"  # the reference backend unbinds q, k, v itself
    x = torch.randn(2, 5, 192, device=DEVICE)
    block = aimkern.patch_timm(tiny_vit(), backend=backend).blocks[0]
    names = graph_node_names(block(x.requires_grad_()))
    assert "GeneratedBackwardFor_aimkern_attention_fwd_defaultBackward" in names, names
    assert not [n for n in names if n.startswith(COPIES)], names

    control = aimkern.patch_timm(tiny_vit(qk_norm=True), backend=backend).blocks[0]
    names = graph_node_names(control(x))
    assert "GeneratedBackwardFor_aimkern_attention_fwd_defaultBackward" in names
    assert [n for n in names if n.startswith(("Unbind", "Stack"))] == ["UnbindBackward0"], names


def test_qk_norm_path_matches_timm():
    """q_norm / k_norm modules (not Identity): the unpacked path, forward and every gradient vs timm."""
    ref = tiny_vit(qk_norm=True)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "q_norm" in name or "k_norm" in name:
                p.add_(0.5 * torch.randn_like(p))
    model = aimkern.patch_timm(copy.deepcopy(ref), backend=BACKEND)
    assert not model.blocks[0].attn.packed
    x = images()
    y, y_ref = model(x), ref(x)
    assert torch.allclose(y, y_ref, atol=1e-5, rtol=1e-4)
    y.sum().backward()
    y_ref.sum().backward()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-4, rtol=1e-3), name
