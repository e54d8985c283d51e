"""aimkern.patch on Apple's ml-aim and ml-l3m attention modules (and timm's): forward and backward unchanged.

The unpatched modules are tests/apple_modules.py's re-implementations, first held to the outputs and gradients
of Apple's real code stored in tests/fixtures/apple/ (see the README there).
"""
import os

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

import aimkern
from aimkern.integrations.l3m import L3mAttention
from aimkern.integrations.masks import options_from_dense
from aimkern.integrations.ml_aim import MlAimAttention

from apple_modules import Attention, GenericAttention, PrefixCausalAttention

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "apple")
ML_AIM = torch.load(os.path.join(FIX, "ml_aim_attention.pt"), weights_only=True)
L3M = torch.load(os.path.join(FIX, "l3m_attention.pt"), weights_only=True)


def ml_aim_module(name: str) -> nn.Module:
    dim, heads = ML_AIM["dim"], ML_AIM["num_heads"]
    if name == "prefix_causal":
        m = PrefixCausalAttention(dim, num_heads=heads, use_bias=False, num_patches=16)
    else:
        m = Attention(dim, num_heads=heads, use_bias=False, is_causal=name == "attention_causal")
    m.load_state_dict(ML_AIM["cases"][name]["state_dict"])
    return m


def l3m_module(name: str) -> nn.Module:
    case = L3M["cases"][name]
    m = GenericAttention(L3M["dim"], num_heads=L3M["num_heads"], **case["kwargs"])
    m.load_state_dict(case["state_dict"])
    return m


def ml_aim_call(name: str) -> dict:
    case = ML_AIM["cases"][name]
    if name == "prefix_causal":
        return {"mask": case["mask"]}
    if name == "attention_dense_prefix":
        n = case["x"].shape[1]
        prefix = case["prefix_len"]
        keep = torch.arange(n)[None, :] >= prefix[:, None]
        return {"mask": (torch.ones(n, n, dtype=torch.bool).tril() | ~keep[:, None, :])[:, None]}
    return {}


def run(module: nn.Module, case: dict, **call) -> dict:
    """Output and gradients (input, parameters) for the case's input and cotangent."""
    x = case["x"].clone().requires_grad_(True)
    module.zero_grad()
    out = module(x, **call)
    out.backward(case["cotangent"])
    grads = {f"grad.{n.removeprefix('attn.')}": p.grad for n, p in module.named_parameters()}
    return {"out": out.detach(), "grad.x": x.grad, **grads}


def assert_matches(got: dict, case: dict, atol: float = 2e-5) -> None:
    for key, value in got.items():
        err = (value - case[key]).abs().max().item()
        assert err < atol, f"{key}: max abs error {err}"


class Holder(nn.Module):
    """A host model: the patched module is a child (patch swaps children in place)."""

    def __init__(self, attn: nn.Module):
        super().__init__()
        self.attn = attn

    def forward(self, x, **kw):
        return self.attn(x, **kw)


ML_AIM_CASES = sorted(ML_AIM["cases"])
L3M_CASES = sorted(L3M["cases"])


@pytest.mark.parametrize("name", ML_AIM_CASES)
def test_ml_aim_stand_ins_reproduce_apples_code(name):
    assert_matches(run(ml_aim_module(name), ML_AIM["cases"][name], **ml_aim_call(name)), ML_AIM["cases"][name])


@pytest.mark.parametrize("name", L3M_CASES)
def test_l3m_stand_in_reproduces_apples_code(name):
    case = L3M["cases"][name]
    call = {"mask": case["mask"]} if "mask" in case else {}
    assert_matches(run(l3m_module(name), case, **call), case)


@pytest.mark.parametrize("name", ML_AIM_CASES)
def test_patched_ml_aim_attention_equals_apples_forward_and_backward(name):
    host = Holder(ml_aim_module(name))
    params = dict(host.named_parameters())
    aimkern.patch(host)
    assert isinstance(host.attn, MlAimAttention)
    assert dict(host.named_parameters()) == params  # the same parameter objects, the same names
    assert_matches(run(host, ML_AIM["cases"][name], **ml_aim_call(name)), ML_AIM["cases"][name])


@pytest.mark.parametrize("name", L3M_CASES)
def test_patched_l3m_attention_equals_apples_forward_and_backward(name):
    case = L3M["cases"][name]
    host = Holder(l3m_module(name))
    keys = set(host.state_dict())
    aimkern.patch(host)
    assert isinstance(host.attn, L3mAttention) and set(host.state_dict()) == keys
    assert_matches(run(host, case, **({"mask": case["mask"]} if "mask" in case else {})), case)


def test_prefix_mask_runs_on_the_triton_kernels():
    name = "prefix_causal"
    host = aimkern.patch(Holder(ml_aim_module(name)), backend="triton")
    assert_matches(run(host, ML_AIM["cases"][name], **ml_aim_call(name)), ML_AIM["cases"][name], atol=1e-4)


def test_patch_options_apply_where_the_host_gives_no_mask():
    torch.manual_seed(0)
    plain = Attention(32, num_heads=2)
    causal = Attention(32, num_heads=2, is_causal=True)
    causal.load_state_dict(plain.state_dict())
    x = torch.randn(2, 16, 32)
    host = aimkern.patch(Holder(plain), is_causal=True)
    torch.testing.assert_close(host(x), causal(x), atol=2e-5, rtol=0)
    aimkern.patch(host, is_causal=False)  # patching again updates the options
    torch.testing.assert_close(host(x), Attention.forward(plain, x), atol=2e-5, rtol=0)


def test_l3m_block_mask_is_recognised():
    from torch.nn.attention.flex_attention import create_block_mask

    case = L3M["cases"]["prefix_causal"]
    prefix = L3M["prefix_len"]
    b, n = case["x"].shape[:2]

    def prefix_mask(bb, h, q_idx, kv_idx):  # l3m's FlexAttnPrefixAttentionMaskBuilder
        return (kv_idx < prefix[bb]) | (q_idx >= kv_idx)

    block_mask = create_block_mask(prefix_mask, b, None, n, n, device="cpu")
    host = aimkern.patch(Holder(l3m_module("prefix_causal")))
    assert_matches(run(host, case, mask=block_mask), case)


def test_timm_through_patch_is_patch_timm():
    from timm.models.vision_transformer import VisionTransformer

    from aimkern.integrations.timm import TimmAttention

    vit = VisionTransformer(img_size=28, patch_size=7, embed_dim=32, depth=2, num_heads=2, class_token=False,
                            global_pool="avg").eval()
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        want = vit(x)
        aimkern.patch(vit)
        got = vit(x)
    assert all(isinstance(b.attn, TimmAttention) for b in vit.blocks)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=0)
    assert aimkern.patch_timm is aimkern.integrations.timm.patch_timm


@pytest.mark.parametrize("make,call,match", [
    (lambda: ml_aim_module("prefix_causal"), {}, "a mask is required"),
    (lambda: ml_aim_module("prefix_causal"), {"mask": torch.tensor([[False, True] * 8] * 3)}, "leading tokens"),
    (lambda: ml_aim_module("attention"), {"mask": torch.rand(3, 1, 16, 16) > 0.5}, "not prefix-causal"),
    (lambda: ml_aim_module("attention"), {"mask": torch.zeros(3, 1, 16, 16)}, "only boolean masks"),
    (lambda: ml_aim_module("attention_causal"), {"mask": torch.ones(3, 1, 16, 16, dtype=torch.bool)}, "is_causal"),
    (lambda: l3m_module("is_causal"), {"mask": torch.ones(3, 16, 16, dtype=torch.bool)}, "causal"),
    (lambda: l3m_module("full"), {"mask": torch.ones(3, 16, 16, dtype=torch.bool).triu()}, "not prefix-causal"),
    (lambda: l3m_module("full"), {"mask": torch.ones(3, 16, 15, dtype=torch.bool)}, "must be"),
])
def test_masks_without_an_aimkern_equivalent_are_refused(make, call, match):
    host = aimkern.patch(Holder(make()))
    with pytest.raises((ValueError, TypeError), match=match):
        host(torch.randn(3, 16, 32), **call)


def test_bad_patch_arguments():
    with pytest.raises(ValueError, match="found no timm, ml-aim or ml-l3m attention"):
        aimkern.patch(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="pass the model that holds it"):
        aimkern.patch(Attention(32, num_heads=2))
    with pytest.raises(ValueError, match="attn_drop"):
        aimkern.patch(Holder(GenericAttention(32, num_heads=2, attn_drop=0.1)))
    with pytest.raises(TypeError, match="is_causal must be None or a bool"):
        aimkern.patch(Holder(Attention(32, num_heads=2)), is_causal=1)
    with pytest.raises(ValueError, match="aimkern.patch.*backend"):
        aimkern.patch(Holder(Attention(32, num_heads=2)), backend="cuda")
    with pytest.raises(ValueError, match="aimkern.patch: prefix_len must be >= 0"):
        aimkern.patch(Holder(Attention(32, num_heads=2)), prefix_len=-1)


@settings(max_examples=200, deadline=None)
@given(n=st.integers(2, 40), bs=st.integers(1, 12), data=st.data())
def test_dense_masks_are_recognised_exactly(n, bs, data):
    """Every prefix-/block-causal mask gives options of the same mask; a flipped entry gives the flipped mask or
    a ValueError, never a different one."""
    b = data.draw(st.integers(1, 3))
    prefix = torch.tensor(data.draw(st.lists(st.integers(0, n), min_size=b, max_size=b)))
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    mask = (j[None] < prefix[:, None, None]) | ((j // bs) <= (i // bs))[None]

    def rebuild(opts):
        causal, block, p = opts
        if not causal:
            return torch.ones(b, n, n, dtype=torch.bool)
        return (j[None] < p[:, None, None]) | ((j // block) <= (i // block))[None]

    assert torch.equal(rebuild(options_from_dense(mask, n, b, "t")), mask)
    for p_big in (n - 1, n):  # prefixes covering (nearly) every key: the counts change only once, or never
        big = (j[None] < p_big) | ((j // bs) <= (i // bs))[None]
        assert torch.equal(rebuild(options_from_dense(big.expand(b, n, n), n, b, "t")), big.expand(b, n, n))
    flipped = mask.clone()
    bi, qi, ki = data.draw(st.integers(0, b - 1)), data.draw(st.integers(0, n - 1)), data.draw(st.integers(0, n - 1))
    flipped[bi, qi, ki] = ~flipped[bi, qi, ki]
    try:
        opts = options_from_dense(flipped, n, b, "t")
    except ValueError:
        return
    assert torch.equal(rebuild(opts), flipped)


class TwoBlocks(nn.Module):
    """A 2-block pre-norm host like ml-aim's Transformer: each block's attention takes the (B, N) prefix mask."""

    def __init__(self, dim=32, heads=2):
        super().__init__()
        self.blocks = nn.ModuleList(nn.ModuleDict({
            "norm_1": nn.LayerNorm(dim), "attn": PrefixCausalAttention(dim, num_heads=heads, num_patches=16),
            "norm_2": nn.LayerNorm(dim), "mlp": nn.Linear(dim, dim)}) for _ in range(2))

    def forward(self, x, mask):
        for b in self.blocks:
            x = x + b["attn"](b["norm_1"](x), mask=mask)
            x = x + b["mlp"](b["norm_2"](x))
        return x


def test_a_patched_model_trains_like_the_unpatched_one():
    torch.manual_seed(1)
    host, twin = TwoBlocks(), TwoBlocks()
    twin.load_state_dict(host.state_dict())
    aimkern.patch(twin)
    assert sum(isinstance(m, MlAimAttention) for m in twin.modules()) == 2
    x = torch.randn(3, 16, 32)
    mask = torch.arange(16)[None, :] >= torch.tensor([[1], [7], [16]])
    for model in (host, twin):
        model(x, mask).pow(2).sum().backward()
    for (name, p), q in zip(host.named_parameters(), twin.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=5e-5, rtol=1e-5, msg=name)
    torch.testing.assert_close(twin(x, mask), host(x, mask), atol=2e-5, rtol=0)
