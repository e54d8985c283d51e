"""The attention paths added for issued-work budgets: tails, the key-tail kernel, the ordered (deterministic)
and free (deterministic=False) dQ accumulation of the tiled backward, the key-tiled fused backward.

Each is held to the float64 reference with the same error-relative tolerances as tests/test_attention_triton.py,
under the GPU's own tile configs (``gpu_configs``) where the interpreter's smaller tiles would not reach them.
"""
import functools

import pytest
import torch

import aimkern
from aimkern.ops import launch_policy
from aimkern.ops._launch import gpu_configs, interpreting, observe

from test_attention_triton import MASKS, check_attention

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
needs_interpreter = pytest.mark.skipif(not interpreting(), reason="GPU tile configs under the interpreter (CPU runs)")


def _names(fn) -> set:
    with observe() as launches:
        fn()
    return {launch.name for launch in launches}


@needs_interpreter
@pytest.mark.parametrize("mask", ["full", "causal", "prefix_half", "block3_mixed", "block20"])
@pytest.mark.parametrize("n", [196, 80])
def test_gpu_tiles_with_query_and_key_tails(mask, n):
    """N = 196 = 3 x 64 + 4 and N = 80 = 64 + 16: the forward's 16-query tail kernel and 16-key tail tiles,
    the tiled backward's 16-row query tail and its key-tail kernel, with the tile sizes the H200 runs."""
    with gpu_configs(), launch_policy(autotune=False, attention_backward="split"):
        names = _names(lambda: check_attention(2, 2, n, 64, torch.float16, MASKS[mask], DEVICE))
    assert {"attn_fwd_kernel", "attn_fwd_tail_kernel", "attn_bwd_tiled_kernel"} <= names
    assert "attn_bwd_key_tail_kernel" in names


@needs_interpreter
@pytest.mark.parametrize("mask", ["causal", "prefix_half", "block5"])
def test_gpu_tiles_fused_backward(mask):
    """The fused backward with 64-row key tiles (three of them at N = 150): skipped and boundary tiles."""
    with gpu_configs(), launch_policy(autotune=False, attention_backward="fused"):
        names = _names(lambda: check_attention(1, 2, 150, 64, torch.float16, MASKS[mask], DEVICE))
    assert "attn_bwd_fused_kernel" in names


@pytest.mark.parametrize("mask", ["causal", "block3_mixed", "full"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_nondeterministic_variant_matches_the_reference(monkeypatch, mask, dtype):
    import test_attention_triton

    monkeypatch.setattr(test_attention_triton.aimkern, "attention",
                        functools.partial(aimkern.functional.attention, deterministic=False))
    with launch_policy(autotune=False, attention_backward="split"):
        check_attention(2, 2, 53, 32, dtype, MASKS[mask], DEVICE)


def test_deterministic_is_checked():
    q = torch.randn(1, 1, 8, 16)
    with pytest.raises(TypeError, match="deterministic must be a bool"):
        aimkern.attention(q, q, q, deterministic=1, backend="triton")
    with pytest.raises(TypeError, match="deterministic must be a bool"):
        aimkern.attention(q, q, q, deterministic=None, backend="reference")


def test_deterministic_choice_travels_into_the_backward():
    """deterministic=False at forward time runs the free-order kernel in the backward (a constexpr of it)."""
    q, k, v = (torch.randn(1, 1, 40, 16, requires_grad=True) for _ in range(3))
    for det in (True, False):
        with launch_policy(autotune=False, attention_backward="split"):
            o = aimkern.attention(q, k, v, is_causal=True, backend="triton", deterministic=det)
        with observe() as launches:
            o.sum().backward()
        tiled = [la for la in launches if la.name == "attn_bwd_tiled_kernel"]
        assert tiled and all(la.constexprs["DETERMINISTIC"] is det for la in tiled)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU: run-to-run order only varies on real hardware")
@pytest.mark.parametrize("n", [1024, 4096])
def test_gpu_deterministic_backward_is_bit_identical(n):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, n, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    g = torch.randn_like(q)
    runs = []
    for _ in range(3):
        o = aimkern.attention(q, k, v, is_causal=True, prefix_len=n // 3)
        runs.append(torch.autograd.grad(o, (q, k, v), g))
    assert all(torch.equal(a, b) for run in runs[1:] for a, b in zip(runs[0], run))
    free = torch.autograd.grad(aimkern.attention(q, k, v, is_causal=True, prefix_len=n // 3, deterministic=False),
                               (q, k, v), g)
    for a, b in zip(runs[0], free):
        assert (a.float() - b.float()).abs().max().item() <= 2e-2 * b.float().abs().max().item()
