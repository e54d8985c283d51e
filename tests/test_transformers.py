"""attn_implementation="aimkern" in Hugging Face transformers' ViT and Dinov2, randomly initialized (nothing
downloaded), held to transformers' own "sdpa" implementation with the same weights: forward and every
gradient in full attention, and SDPA with aimkern's dense mask (an independent kernel) in causal / prefix
mode. Runs the Triton kernels (the interpreter on CPU). Tiny configs: 16 px images, 4 px patches (N = 17
tokens with the class token), 2 heads of D = 16.
"""
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

from aimkern.integrations import transformers as aimkern_hf  # noqa: E402
from aimkern.reference.attention import attention_mask  # noqa: E402
from conftest import HAS_CUDA  # noqa: E402
from transformers import AttentionInterface, Dinov2Config, Dinov2Model, ViTConfig, ViTModel  # noqa: E402
from transformers.integrations.sdpa_attention import sdpa_attention_forward  # noqa: E402

DEVICE = "cuda" if HAS_CUDA else "cpu"
N = 17  # (16 / 4) ** 2 patches + the class token
COMMON = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=16, patch_size=4,
              initializer_range=0.3)  # larger than default: attention far from uniform, so masks matter
MODELS = {
    "vit": (ViTModel, lambda **kw: ViTConfig(intermediate_size=64, **COMMON, **kw)),
    "dinov2": (Dinov2Model, lambda **kw: Dinov2Config(mlp_ratio=2, **COMMON, **kw)),
}


@pytest.fixture(autouse=True)
def _one_config_per_family(no_autotune):
    """On CUDA: no autotuning of the attention kernels (fewer compiles; the benchmark covers tuning)."""


def build(kind, impl, **cfg):
    cls, make_config = MODELS[kind]
    torch.manual_seed(0)
    return cls._from_config(make_config(**cfg), attn_implementation=impl).to(DEVICE)


def run(model, x, **kw):
    """last_hidden_state and the gradients of every parameter and of the pixels, for one fixed cotangent."""
    x = x.detach().requires_grad_()
    y = model(pixel_values=x, **kw).last_hidden_state
    g = torch.linspace(-1, 1, y.numel(), device=DEVICE).view_as(y)
    grads = torch.autograd.grad(y, [x, *model.parameters()], g, allow_unused=True)  # the pooler is unused
    return y, grads


def assert_match(got, want, atol=2e-5):
    (y, grads), (y_ref, grads_ref) = got, want
    assert (y - y_ref).abs().max().item() < atol
    assert sum(g is not None for g in grads) > 10
    for i, (a, b) in enumerate(zip(grads, grads_ref)):
        if a is None or b is None:
            assert a is None and b is None, f"gradient {i}"
            continue
        assert (a - b).abs().max().item() < atol * max(1.0, b.abs().max().item()), f"gradient {i}"


@pytest.mark.parametrize("kind", MODELS)
def test_full_attention_matches_sdpa(kind):
    aimkern_hf.register(backend="triton")
    model, ref = build(kind, "aimkern"), build(kind, "sdpa")
    assert model.config._attn_implementation == "aimkern"
    ref.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 16, 16, device=DEVICE)
    got, want = run(model, x), run(ref, x)
    assert_match(got, want)
    aimkern_hf.register(is_causal=True, backend="triton")  # the registered function is what runs: can fail
    assert (run(model, x)[0] - want[0]).abs().max().item() > 1e-2


def _dense_reference(mask):
    """transformers' SDPA function with a fixed dense boolean mask (B, 1, N, N): the masked reference."""

    def fn(module, query, key, value, attention_mask, **kwargs):
        assert attention_mask is None
        return sdpa_attention_forward(module, query, key, value, mask, **kwargs)

    return fn


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize(
    "mask",
    [dict(is_causal=True), dict(is_causal=True, block_size=4, prefix_len=1),
     dict(is_causal=True, block_size=4, prefix_len="tensor")],
    ids=["causal", "block4_prefix1", "per_sample_prefix"],
)
def test_masks_match_sdpa_with_dense_mask(kind, mask):
    mask = dict(mask)
    if mask.get("prefix_len") == "tensor":
        mask["prefix_len"] = torch.tensor([0, 9], device=DEVICE)
    prefix = mask.get("prefix_len")
    if isinstance(prefix, int):
        prefix = torch.full((2,), prefix, device=DEVICE)
    dense = attention_mask(N, is_causal=True, block_size=mask.get("block_size", 1), prefix_len=prefix, batch=2,
                           device=DEVICE)
    aimkern_hf.register(backend="triton", **mask)
    AttentionInterface.register("aimkern_test_dense", _dense_reference(dense))
    model, ref = build(kind, "aimkern"), build(kind, "aimkern_test_dense")
    ref.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 16, 16, device=DEVICE)
    got, want = run(model, x), run(ref, x)
    assert_match(got, want)
    if torch.is_tensor(mask.get("prefix_len")):  # per call: the models pass forward's **kwargs to the attention
        aimkern_hf.register(backend="triton", is_causal=True, block_size=mask["block_size"])
        y = model(pixel_values=x, prefix_len=mask["prefix_len"]).last_hidden_state
        assert torch.allclose(y, want[0], atol=2e-5)


def test_scaling_and_per_call_prefix():
    """``scaling`` from the model is used (not D ** -0.5); a prefix_len keyword reaching the attention wins."""
    fn = aimkern_hf.register(is_causal=True, prefix_len=2, backend="triton")
    q, k, v = torch.randn(3, 2, 2, N, 16, device=DEVICE).unbind(0)
    module = torch.nn.Module()
    o, weights = fn(module, q, k, v, None, scaling=0.7)
    dense = attention_mask(N, is_causal=True, prefix_len=torch.tensor([2, 2], device=DEVICE), batch=2, device=DEVICE)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=dense, scale=0.7)
    assert weights is None and o.shape == (2, N, 2, 16)
    assert torch.allclose(o, want.transpose(1, 2), atol=1e-5)
    o5, _ = fn(module, q, k, v, None, scaling=0.7, prefix_len=5)
    dense5 = attention_mask(N, is_causal=True, prefix_len=torch.tensor([5, 5], device=DEVICE), batch=2, device=DEVICE)
    want5 = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=dense5, scale=0.7)
    assert torch.allclose(o5, want5.transpose(1, 2), atol=1e-5) and not torch.allclose(o5, o, atol=1e-3)


def test_errors_dropout_and_masks():
    aimkern_hf.register(backend="triton")
    model = build("vit", "aimkern", attention_probs_dropout_prob=0.1)
    x = torch.randn(2, 3, 16, 16, device=DEVICE)
    with pytest.raises(ValueError, match="dropout"):
        model.train()(pixel_values=x)
    model.eval()(pixel_values=x)  # eval: the model passes dropout=0

    padding = torch.ones(2, N, dtype=torch.long, device=DEVICE)
    model(pixel_values=x, attention_mask=padding)  # no padding: transformers' mask builder gives None
    padding[1, -3:] = 0
    with pytest.raises(ValueError, match="cannot express"):
        model(pixel_values=x, attention_mask=padding)

    fn = aimkern_hf.register(is_causal=True, backend="triton")
    q = torch.randn(1, 2, N, 16, device=DEVICE)
    module = torch.nn.Module()
    causal = attention_mask(N, is_causal=True, device=DEVICE)
    additive = torch.zeros(1, 1, N, N, device=DEVICE).masked_fill(~causal, float("-inf"))
    o_bool, _ = fn(module, q, q, q, causal)  # a dense mask equal to the registered one is accepted
    o_add, _ = fn(module, q, q, q, additive)
    assert torch.equal(o_bool, fn(module, q, q, q, None)[0]) and torch.equal(o_add, o_bool)
    with pytest.raises(ValueError, match="bias"):
        fn(module, q, q, q, additive + 0.5 * causal)
    with pytest.raises(ValueError, match="grouped-query"):
        fn(module, q, q[:, :1], q[:, :1], None)
    with pytest.raises(ValueError, match="self-attention"):
        fn(module, q, q[:, :, :5], q[:, :, :5], None)
    with pytest.raises(ValueError, match="block_size"):
        aimkern_hf.register(block_size=0)


def test_import_aimkern_without_transformers():
    code = (
        "import sys; sys.modules['transformers'] = None\n"  # makes `import transformers` raise ImportError
        "import aimkern, aimkern.integrations.transformers as hf\n"
        "try:\n    hf.register()\nexcept ImportError as e:\n    assert 'pip install' in str(e); print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
