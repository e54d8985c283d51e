"""aimkern.attention_qkvpacked: a ViT block's packed (B, N, 3, H, D) qkv in, (B, N, H, D) out.

Held to three things: the same output and qkv gradient as ``aimkern.attention`` on the unbound views (bit for
bit on Triton: the same kernels run, only the output strides differ), the float64 reference within the
same-dtype PyTorch error (tests/tolerances.py), and the gradient being one packed tensor written by the
backward kernels (no Unbind/Stack node in the autograd graph). Both backward paths (fused short-N and split
long-N) are forced the way tests/test_attention_triton.py forces them.
"""
import pytest
import torch
import torch.nn.functional as F

import aimkern
from aimkern import attention_qkvpacked
from aimkern.reference.attention import attention_mask, attention_reference
from conftest import HAS_CUDA
from test_attention_triton import ATOL, MASKS, _mask_kwargs, _reference_kwargs, torch_same_dtype
from autograd_graph import graph_node_names
from tolerances import assert_close_relative


@pytest.fixture(autouse=True)
def _one_config_per_family(no_autotune):
    """On CUDA: no autotuning (one compile per family); benchmarks/attn_throughput.py checks the tuned picks."""


def _unpack(qkv):
    return qkv.permute(2, 0, 3, 1, 4).unbind(0)  # q, k, v (B, H, N, D) views


def _graph_nodes(t: torch.Tensor) -> set:
    return set(graph_node_names(t))


# ----------------------------------------------------------------------- values: unpacked, reference
CASES = [  # (dtype, path, mask) x (N, D) below: every mask with both dtypes and both backward paths
    (torch.float32, "split", "block3_mixed"),
    (torch.float32, "fused", "causal"),
    (torch.float32, "fused", "block3_mixed"),
    (torch.float16, "fused", "block3_mixed"),
    (torch.float16, "split", "full"),
    (torch.float16, "split", "prefix_half"),
]


@pytest.mark.parametrize("n,d", [(7, 16), (37, 80)], ids=["N7-D16", "N37-D80"])
@pytest.mark.parametrize("dtype,path,mask", CASES, ids=lambda c: str(c).replace("torch.", ""))
def test_matches_unpacked_and_reference(dtype, path, mask, n, d, use_policy, device):
    use_policy(attention_backward=path)
    b, h = 2, 2
    kw = _mask_kwargs(MASKS[mask], b, n, device)
    qkv = torch.randn(b, n, 3, h, d, device=device, dtype=dtype, requires_grad=True)
    o = attention_qkvpacked(qkv, backend="triton", **kw)
    assert o.shape == (b, n, h, d) and o.dtype == dtype and o.is_contiguous()
    g = torch.randn_like(o)
    (dqkv,) = torch.autograd.grad(o, (qkv,), g)
    assert dqkv.shape == qkv.shape and dqkv.is_contiguous()

    o_unpacked = aimkern.attention(*_unpack(qkv), backend="triton", **kw)
    (dqkv_unpacked,) = torch.autograd.grad(o_unpacked, (qkv,), g.transpose(1, 2))
    assert torch.equal(o, o_unpacked.transpose(1, 2))
    assert torch.equal(dqkv, dqkv_unpacked)

    def run(dt):
        x = qkv.detach().to(dt).requires_grad_()
        fn = attention_reference if dt == torch.float64 else torch_same_dtype
        out = fn(*_unpack(x), **(_reference_kwargs(kw) if dt == torch.float64 else kw)).transpose(1, 2)
        return out, torch.autograd.grad(out, (x,), g.to(dt))[0]

    (ref, dref), (same, dsame) = run(torch.float64), run(dtype)
    label = f"({dtype}, {path}, N={n}, D={d}, {mask})"
    assert_close_relative(o, same, ref, name=f"o {label}", atol=ATOL[dtype])
    for i, name in enumerate(("dq", "dk", "dv")):
        assert_close_relative(dqkv[:, :, i], dsame[:, :, i], dref[:, :, i], name=f"{name} {label}", atol=ATOL[dtype])


@pytest.mark.parametrize("path", ["fused", "split"])
def test_strided_qkv_and_expanded_gradient(path, use_policy, device):
    """A qkv that is not (B, N, 3, H, D)-contiguous, and the stride-0 gradient of .sum(): the kernels read
    both through strides, and the gradient still comes back as one packed contiguous tensor."""
    use_policy(attention_backward=path)
    base = torch.randn(3, 2, 13, 2, 24, device=device, requires_grad=True)  # (3, B, N, H, D + 8)
    qkv = base[..., :16].permute(1, 2, 0, 3, 4)  # (B, N, 3, H, D) view, stride 1 only on D
    kw = dict(is_causal=True, block_size=2, prefix_len=torch.tensor([5, 0], device=device))
    o = attention_qkvpacked(qkv, backend="triton", **kw)
    (dqkv,) = torch.autograd.grad(o.sum(), (qkv,))
    assert dqkv.shape == (2, 13, 3, 2, 16) and dqkv.is_contiguous()
    x = qkv.detach().double().requires_grad_()
    ref = attention_reference(*_unpack(x), **_reference_kwargs(kw)).transpose(1, 2)
    (dref,) = torch.autograd.grad(ref.sum(), (x,))
    assert (o.double() - ref).abs().max().item() < 1e-5
    assert (dqkv.double() - dref).abs().max().item() < 1e-5


def test_gradient_is_written_packed_not_stacked(device):
    """The packed op's graph goes straight from the kernel's backward to qkv; the unbind path (the old
    nn.Attention) stacks dq, dk, dv in UnbindBackward, which is what the packed op removes."""
    qkv = torch.randn(1, 9, 3, 2, 16, device=device, requires_grad=True)
    packed = _graph_nodes(attention_qkvpacked(qkv, is_causal=True, backend="triton"))
    unpacked = _graph_nodes(aimkern.attention(*_unpack(qkv), is_causal=True, backend="triton"))
    assert any(name.startswith("Unbind") for name in unpacked)  # the control: this check can see a stack
    assert not any(name.startswith(("Unbind", "Stack", "Permute", "Clone", "Copy")) for name in packed), packed
    assert packed == {"GeneratedBackwardFor_aimkern_attention_fwd_defaultBackward", "AccumulateGrad"}


def test_reference_backend_matches_attention(device):
    qkv = torch.randn(2, 11, 3, 2, 16, device=device, dtype=torch.float64)
    prefix = torch.tensor([3, 11], device=device)
    got = attention_qkvpacked(qkv, is_causal=True, block_size=2, prefix_len=prefix, backend="reference")
    want = aimkern.attention(*_unpack(qkv), is_causal=True, block_size=2, prefix_len=prefix, backend="reference")
    assert got.shape == (2, 11, 2, 16) and torch.equal(got, want.transpose(1, 2))


def test_autocast_casts_qkv(device):
    """Custom ops are invisible to autocast: the op applies its rule itself, as aimkern.attention does."""
    dtype = torch.float16 if HAS_CUDA else torch.bfloat16  # CPU: reference backend (no bf16 interpreter dots)
    backend = "triton" if HAS_CUDA else "reference"
    qkv = torch.randn(1, 5, 3, 2, 16, device=device)
    with torch.autocast(torch.device(device).type, dtype=dtype):
        o = attention_qkvpacked(qkv, is_causal=True, backend=backend)
        want = aimkern.attention(*_unpack(qkv), is_causal=True, backend=backend)
    assert o.dtype == dtype and want.dtype == dtype
    assert torch.equal(o, want.transpose(1, 2))


# ----------------------------------------------------------------------------------------- compile
def test_torch_compile_fullgraph(device):
    backend = "inductor" if HAS_CUDA else "aot_eager"

    def f(qkv, prefix):
        o = attention_qkvpacked(qkv, is_causal=True, block_size=2, prefix_len=prefix, backend="triton")
        return (o.reshape(o.shape[0], o.shape[1], -1) ** 2).sum()

    qkv = torch.randn(2, 19, 3, 2, 16, device=device, requires_grad=True)
    prefix = torch.tensor([3, 19], device=device)
    compiled = torch.compile(f, fullgraph=True, backend=backend)
    (got,) = torch.autograd.grad(compiled(qkv, prefix), (qkv,))
    (want,) = torch.autograd.grad(f(qkv, prefix), (qkv,))
    assert got.shape == qkv.shape
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------- nn.Attention
def _sdpa_attention(mod, x, prefix_len, block_size):
    """The same block in plain PyTorch: linear, SDPA with an explicit boolean mask, linear."""
    b, n, c = x.shape
    h = mod.num_heads
    q, k, v = mod.qkv(x).view(b, n, 3, h, c // h).permute(2, 0, 3, 1, 4)
    mask = attention_mask(n, is_causal=True, block_size=block_size, prefix_len=prefix_len, batch=b, device=x.device)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return mod.proj(o.transpose(1, 2).reshape(b, n, c))


@pytest.mark.parametrize("backend,dtype", [("reference", torch.float64), ("triton", torch.float32)])
def test_nn_attention_matches_sdpa(backend, dtype, device):
    """nn.Attention (now on attention_qkvpacked) vs the same weights through SDPA in float64: output, input
    gradient and every parameter gradient, within the same-dtype SDPA error."""
    mod = aimkern.nn.Attention(32, num_heads=2, qkv_bias=True, is_causal=True, block_size=3, backend=backend)
    mod = mod.to(device=device, dtype=dtype)
    x = torch.randn(2, 13, 32, device=device, dtype=dtype, requires_grad=True)
    prefix = torch.tensor([0, 5], device=device)
    y = mod(x, prefix_len=prefix)
    assert y.shape == x.shape and y.dtype == dtype
    if backend == "triton":  # the block runs the packed op: no unbind of qkv, so no stack in backward
        assert not any(name.startswith(("Unbind", "Stack")) for name in _graph_nodes(y))
    g = torch.randn_like(y)
    params = list(mod.parameters())
    got = torch.autograd.grad(y, [x, *params], g)

    def run(dt):
        m = aimkern.nn.Attention(32, num_heads=2, qkv_bias=True).to(device=device, dtype=dt)
        m.load_state_dict(mod.state_dict())
        xx = x.detach().to(dt).requires_grad_()
        out = _sdpa_attention(m, xx, prefix, 3)
        return out, torch.autograd.grad(out, [xx, *m.parameters()], g.to(dt))

    (ref, ref_grads), (same, same_grads) = run(torch.float64), run(dtype)
    assert_close_relative(y, same, ref, name=f"y ({backend})", atol=1e-5)
    names = ["x"] + [name for name, _ in mod.named_parameters()]
    for name, a, s, r in zip(names, got, same_grads, ref_grads):
        assert_close_relative(a, s, r, name=f"d{name} ({backend})", atol=1e-5)


# --------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "make,kw,err,match",
    [
        (lambda dev: torch.randn(2, 5, 6, 16, device=dev), {}, ValueError, r"qkv must have 5 dimensions"),
        (lambda dev: torch.randn(2, 5, 2, 2, 16, device=dev), {}, ValueError, r"dim 2 is not 3"),
        (lambda dev: torch.randn(2, 5, 4, 2, 16, device=dev), {}, ValueError, r"\(B, N, 3, H, D\)"),
        (lambda dev: torch.randn(2, 5, 3, 2, 12, device=dev), {}, ValueError, r"attention_qkvpacked: head dim D"),
        (lambda dev: torch.ones(2, 5, 3, 2, 16, device=dev, dtype=torch.int32), {}, TypeError, r"q must be one of"),
        (lambda dev: torch.randn(2, 5, 3, 2, 16, device=dev), dict(is_causal=True, prefix_len=torch.tensor([1])),
         ValueError, r"prefix_len must have shape \(B,\)"),
        (lambda dev: torch.randn(2, 5, 3, 2, 16, device=dev), dict(is_causal=True, prefix_len=6), ValueError,
         r"prefix_len must be in \[0, N=5\]"),
        (lambda dev: torch.randn(2, 5, 3, 2, 16, device=dev), dict(block_size=0), ValueError, r"block_size"),
        (lambda dev: torch.randn(2, 5, 3, 2, 16, device=dev), dict(backend="cuda"), ValueError, r"backend"),
        (lambda dev: [[1.0]], {}, TypeError, r"qkv must be a torch.Tensor"),
    ],
    ids=["rank4", "dim2-is-2", "dim2-is-4", "D12", "int-dtype", "prefix-shape", "prefix-range", "block0",
         "backend"] + ["not-a-tensor"],
)
def test_bad_input(make, kw, err, match, device):
    kw = dict(kw)
    backend = kw.pop("backend", "triton")
    with pytest.raises(err, match=match):
        attention_qkvpacked(make(device), backend=backend, **kw)
