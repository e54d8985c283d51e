"""Issue 26's attention bugs at the sizes that meet them on a GPU (compiled kernels, the device's own tables).

* NaN dQ at very negative logsumexp: N = 577 (128-key tiles over K_END = 576, plus the key-tail kernel) and
  N = 1000 (a last key tile of 104 real rows), fp16 and bf16.
* B * H = 70,000 (CUDA's grid axis 1 stops at 65,535): forward and both backward paths, q/k/v and packed qkv.
* Small heads (D <= 32) at N = 257..768: the path choice must hand the launch only what it can run.

The interpreter versions (CPU) are in tests/test_attention_hostile.py. Run by benchmarks/gpu_check.sh.
"""
import importlib

import pytest
import torch

import aimkern
from aimkern import attention_qkvpacked
from aimkern.ops import launch_policy
from conftest import requires_cuda
from test_attention_hostile import check_against_reference, shifted_qkv

pytestmark = [pytest.mark.gpu, requires_cuda]
attention_op = importlib.import_module("aimkern.ops.attention")  # (aimkern.ops.attention is also the function)


@pytest.fixture(autouse=True)
def _one_config_per_family(no_autotune):
    """The table's first config of each family: one compile each."""


# ------------------------------------------------------------------------ 2. very negative logsumexp
@pytest.mark.parametrize("n", [577, 1000])
@pytest.mark.parametrize("dtype,c", [(torch.float16, 1.6), (torch.bfloat16, 3.5)], ids=["fp16", "bf16"])
@pytest.mark.parametrize("mask", [{}, dict(is_causal=True, prefix_len="N")], ids=["full", "prefixN"])
def test_gpu_very_negative_lse(n, dtype, c, mask):
    """lse < -11 (fp16) or < -88 (bf16, fp32's exponent range): every dQ row finite and within the
    error-relative tolerance of the float64 reference (the tiled backward; the fused one refuses N > 256)."""
    q, k, v = shifted_qkv((2, 4, n, 64), dtype, c, "cuda")
    kw = dict(mask, prefix_len=n) if mask.get("prefix_len") == "N" else mask
    lo, hi = check_against_reference(q, k, v, **kw)
    assert hi < (-11 if dtype == torch.float16 else -88), f"lse in [{lo:.1f}, {hi:.1f}]"


# ------------------------------------------------------------------------------- 4. B * H > 65,535
def _packed_matches(qkv: torch.Tensor, mask: dict, o_ref: torch.Tensor, grads_ref: tuple, g: torch.Tensor):
    """attention_qkvpacked on the same values: the same kernels through strides, so the same bits."""
    qkv = qkv.detach().requires_grad_()
    o = attention_qkvpacked(qkv, backend="triton", **mask)
    (dqkv,) = torch.autograd.grad(o, qkv, g.transpose(1, 2))
    assert torch.equal(o, o_ref.transpose(1, 2)), (o.double() - o_ref.transpose(1, 2).double()).abs().max()
    for i, ref in enumerate(grads_ref):
        assert torch.equal(dqkv[:, :, i], ref.transpose(1, 2)), f"packed gradient {i} differs"


@pytest.mark.parametrize("path", ["fused", "split"])
def test_gpu_70000_heads(path):
    """B = 7,000, H = 10, N = 80 (a 16-query forward tail and a 16-key backward tail), D = 16, block-causal
    with a different prefix per sample: every head lands on its own (batch, head) slice."""
    many_heads(7000, 10, 80, 16, path, "cuda")


def many_heads(b, h, n, d, path, device):
    torch.manual_seed(0)
    mask = dict(is_causal=True, block_size=3, prefix_len=torch.randint(0, n + 1, (b,), device=device))
    qkv = torch.randn(b, n, 3, h, d, device=device, dtype=torch.float16)
    q, k, v = (t.detach().requires_grad_() for t in attention_op.unpack(qkv))
    with launch_policy(attention_backward=path):
        check_against_reference(q, k, v, **mask)
        o = aimkern.attention(q, k, v, backend="triton", **mask)
        g = torch.randn_like(o)
        grads = torch.autograd.grad(o, (q, k, v), g)
        _packed_matches(qkv, mask, o, grads, g)


# ---------------------------------------------------------- 6. small heads past four 64-key tiles
@pytest.mark.parametrize("d,n,dtype", [(16, 768, torch.float16), (16, 257, torch.bfloat16), (32, 300, torch.float16),
                                       (32, 384, torch.bfloat16), (32, 256, torch.float16), (16, 256, torch.bfloat16)])
def test_gpu_small_heads(d, n, dtype):
    """D <= 32: the fused backward at most takes 4 key tiles of 64 (N <= 256); past that the tiled one runs
    (the choice used to take N = 257..384 at D = 32 and 257..768 at D = 16 on sm_90, and the launch then
    refused). Where both can run they agree with the reference; forcing the fused one past it is refused."""
    small_heads(d, n, dtype, torch.device("cuda"))


def small_heads(d, n, dtype, dev):
    fits = attention_op.fused_backward_fits(d, dtype, n, dev)
    assert not (fits and n > 256)
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, n, d, device=dev, dtype=dtype, requires_grad=True) for _ in range(3))
    check_against_reference(q, k, v, is_causal=True)  # "auto": the path the choice makes
    for path in ("fused", "split") if fits else ("split",):
        with launch_policy(attention_backward=path):
            check_against_reference(q, k, v, is_causal=True)
    if not fits:
        with pytest.raises(ValueError, match="attention_backward='fused'"), launch_policy(attention_backward="fused"):
            aimkern.attention(q, k, v, backend="triton", is_causal=True)
