"""aimkern.attention on the Triton kernels (interpreter on CPU, compiled on CUDA) vs a float64 reference.

Output and dq, dk, dv are held to ``err <= 2 * err(PyTorch in the same dtype) + atol`` (tests/tolerances.py),
where PyTorch's same-dtype attention is the plain math (scores, softmax, weighted sum) in that dtype. Both
backward paths are covered: the fused one-program-per-head path (short N) and the split dK/dV + dQ path,
forced through ``aimkern.ops.launch_policy(attention_backward=...)``.
"""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import aimkern
from aimkern.reference.attention import attention_mask, attention_reference
from conftest import HAS_CUDA, requires_cuda
from tolerances import assert_close_relative

ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
PATHS = ("fused", "split")

# name -> mask options; prefix "mixed" becomes a per-sample tensor, ints are scaled by N below.
MASKS = {
    "full": dict(),
    "causal": dict(is_causal=True),
    "block5": dict(is_causal=True, block_size=5),
    "block20": dict(is_causal=True, block_size=20),  # wider than a tile: whole tiles in one causal block
    "prefix_half": dict(is_causal=True, prefix_len="half"),
    "prefix_0": dict(is_causal=True, prefix_len=0),
    "prefix_N": dict(is_causal=True, prefix_len="N"),
    "block3_mixed": dict(is_causal=True, block_size=3, prefix_len="mixed"),
}


@pytest.fixture(autouse=True)
def _one_config_per_family(no_autotune):
    """On CUDA: no autotuning (one compile per family); benchmarks/attn_throughput.py checks the tuned picks."""


@pytest.fixture(params=PATHS)
def path(request, use_policy):
    """Run the test on one backward path (the interpreter runs the fused path at any N; on CUDA it is
    refused where a head does not fit on chip)."""
    use_policy(attention_backward=request.param)
    return request.param


def _prefix(spec, b, n, device):
    if spec == "half":
        return n // 2
    if spec == "N":
        return n
    if spec == "mixed":  # every sample different: none, a third, all, one
        vals = [0, n // 3, n, 1]
        return torch.tensor([vals[i % len(vals)] for i in range(b)], device=device, dtype=torch.int64)
    return spec


def _mask_kwargs(mask: dict, b: int, n: int, device) -> dict:
    kw = dict(mask)
    if "prefix_len" in kw:
        kw["prefix_len"] = _prefix(kw["prefix_len"], b, n, device)
    return kw


def torch_same_dtype(q, k, v, *, is_causal=False, block_size=1, prefix_len=None):
    """Plain attention computed entirely in the inputs' dtype: the error budget the kernel is held to."""
    b, _, n, d = q.shape
    s = (q @ k.transpose(-1, -2)) * d**-0.5
    if is_causal or prefix_len is not None:
        if isinstance(prefix_len, int):
            prefix_len = torch.full((b,), prefix_len, device=q.device)
        mask = attention_mask(n, is_causal=is_causal, block_size=block_size, prefix_len=prefix_len, batch=b,
                              device=q.device)
        s = s.masked_fill(~mask, float("-inf"))
    return s.softmax(-1) @ v


def _reference_kwargs(kw):
    kw = dict(kw)
    if isinstance(kw.get("prefix_len"), int):
        kw["prefix_len"] = torch.tensor([kw["prefix_len"]])
    return kw


def make_qkv(b, h, n, d, dtype, device, layout="contiguous"):
    """q, k, v (B, H, N, D) in the requested memory layout; returned with the leaf(s) they view."""
    if layout == "contiguous":
        leaves = [torch.randn(b, h, n, d, device=device, dtype=dtype, requires_grad=True) for _ in range(3)]
        return leaves, leaves
    if layout == "packed":  # nn.Attention / timm: qkv (B, N, 3, H, D), q, k, v strided views of it
        qkv = torch.randn(b, n, 3, h, d, device=device, dtype=dtype, requires_grad=True)
        return list(qkv.permute(2, 0, 3, 1, 4).unbind(0)), [qkv]
    if layout == "d_major":  # head dim not the fastest axis: stride_d = N
        leaves = [torch.randn(b, h, d, n, device=device, dtype=dtype, requires_grad=True) for _ in range(3)]
        return [t.transpose(-1, -2) for t in leaves], leaves
    raise ValueError(layout)


def check_attention(b, h, n, d, dtype, mask: dict, device, layout="contiguous", grad="random"):
    kw = _mask_kwargs(mask, b, n, device)
    (q, k, v), _ = make_qkv(b, h, n, d, dtype, device, layout)
    o = aimkern.attention(q, k, v, backend="triton", **kw)
    assert o.dtype == dtype and o.shape == (b, h, n, d)
    if grad == "random":
        g = torch.randn_like(o)
        dq, dk, dv = torch.autograd.grad(o, (q, k, v), g)
    else:  # the gradient of .sum(): a stride-0 expanded tensor reaches the backward
        g = torch.ones_like(o)
        dq, dk, dv = torch.autograd.grad(o.sum(), (q, k, v))

    def run(dt):
        xs = [t.detach().to(dt).requires_grad_() for t in (q, k, v)]
        if dt == torch.float64:
            out = attention_reference(*xs, **_reference_kwargs(kw))
        else:
            out = torch_same_dtype(*xs, **kw)
        return (out, *torch.autograd.grad(out, xs, g.to(dt)))

    ref, same = run(torch.float64), run(dtype)
    for name, got, s, r in zip(("o", "dq", "dk", "dv"), (o, dq, dk, dv), same, ref):
        assert_close_relative(got, s, r, name=f"{name} ({dtype}, N={n}, D={d}, {mask})", atol=ATOL[dtype])
    return o


# --------------------------------------------------------------------------------------------- masks
# fp32 on the fused path is covered by the layout, gradient and fuzz tests below (kept out for time).
@pytest.mark.parametrize("dtype,path_name", [(torch.float32, "split"), (torch.float16, "split"),
                                             (torch.float16, "fused")], ids=["fp32-split", "fp16-split", "fp16-fused"])
@pytest.mark.parametrize("mask", list(MASKS.values()), ids=list(MASKS))
def test_masks(mask, dtype, path_name, use_policy, device):
    use_policy(attention_backward=path_name)
    check_attention(2, 1, 37, 80, dtype, mask, device)


@pytest.mark.parametrize("n", [1, 7, 37])
@pytest.mark.parametrize("d", [16, 80])
def test_awkward_shapes(n, d, path, device):
    mask = dict(is_causal=True, block_size=3, prefix_len="mixed")
    check_attention(2, 2, n, d, torch.float16, mask, device)


def test_n197_split_path(device):
    """N = 197 (ViT-B/16 with a class token), block-causal with a per-sample prefix, several key tiles."""
    check_attention(2, 1, 197, 80, torch.float16, dict(is_causal=True, block_size=14, prefix_len="mixed"), device)


def test_block_size_at_least_n_is_full(device):
    check_attention(1, 2, 7, 16, torch.float32, dict(is_causal=True, block_size=7), device)
    check_attention(1, 2, 7, 16, torch.float32, dict(is_causal=True, block_size=100, prefix_len=2), device)


def test_scale(device):
    q, k, v = (torch.randn(1, 2, 23, 16, device=device) for _ in range(3))
    got = aimkern.attention(q, k, v, is_causal=True, block_size=4, scale=0.3, backend="triton")
    ref = attention_reference(q.double(), k.double(), v.double(), is_causal=True, block_size=4, scale=0.3)
    assert (got.double() - ref).abs().max().item() < 1e-5


# ---------------------------------------------------------------------------------- layouts, strides
# Generic strided inputs, stride-0 gradients and torch.compile: tests/test_op_contracts.py. Here: q, k, v as
# aliasing views of one packed qkv (autograd sums three gradients into one leaf).
def test_strided_inputs(path, device):
    check_attention(2, 2, 37, 16, torch.float32, dict(is_causal=True, prefix_len="mixed"), device, layout="packed")




def test_output_is_bnhd_memory(device):
    """o.transpose(1, 2) is contiguous, so nn.Attention's reshape to (B, N, H * D) is free."""
    (q, k, v), _ = make_qkv(2, 3, 7, 16, torch.float32, device, layout="packed")
    o = aimkern.attention(q, k, v, is_causal=True, backend="triton")
    assert o.transpose(1, 2).is_contiguous()
    dq, dk, dv = torch.autograd.grad(o, (q, k, v), torch.randn_like(o))
    assert all(t.shape == q.shape for t in (dq, dk, dv))


# ------------------------------------------------------------------------------------- tile skipping
def _interpret_tile(n):
    import aimkern.kernels.attention as kern

    return kern._interpret_tile(n)


@pytest.mark.skipif(HAS_CUDA, reason="tile sizes are autotuned on CUDA; the interpreter's are fixed")
@pytest.mark.parametrize("prefix", [None, "small"])
def test_invisible_key_tiles_are_never_read(prefix, use_policy, device):
    """Keys no query of a tile can see are NaN: that tile's output and dq stay exact, so they were never read."""
    use_policy(attention_backward="split")  # the fused path reads all K by design
    n, tile = 64, _interpret_tile(64)
    cut = 2 * tile  # queries < cut, causal, prefix <= cut - tile: keys >= cut are in invisible tiles
    prefix_len = None if prefix is None else torch.tensor([tile + 3, 0])
    q, k, v = (torch.randn(2, 1, n, 16, device=device) for _ in range(3))
    k[:, :, cut:], v[:, :, cut:] = float("nan"), float("nan")
    q.requires_grad_()
    o = aimkern.attention(q, k, v, is_causal=True, prefix_len=prefix_len, backend="triton")
    g = torch.randn_like(o)
    (dq,) = torch.autograd.grad(o, (q,), g)
    qs = q[:, :, :cut].detach().double().requires_grad_()
    ref = attention_reference(qs, k[:, :, :cut].double(), v[:, :, :cut].double(), is_causal=True, prefix_len=prefix_len)
    (dq_ref,) = torch.autograd.grad(ref, (qs,), g[:, :, :cut].double())
    assert torch.isnan(o[:, :, cut:]).all()  # the poison is real: later queries do read it
    assert (o[:, :, :cut].double() - ref).abs().max().item() < 1e-5
    assert (dq[:, :, :cut].double() - dq_ref).abs().max().item() < 1e-5


@pytest.mark.skipif(HAS_CUDA, reason="tile sizes are autotuned on CUDA; the interpreter's are fixed")
def test_query_tiles_seeing_no_key_are_skipped_in_dkdv(use_policy, device):
    """Causal: queries of the first tile see no key of later tiles, so NaN there must not reach their dk, dv."""
    use_policy(attention_backward="split")
    n, tile = 48, _interpret_tile(48)
    q, k, v = (torch.randn(1, 2, n, 16, device=device) for _ in range(3))
    q[:, :, :tile] = float("nan")
    k.requires_grad_()
    v.requires_grad_()
    o = aimkern.attention(q, k, v, is_causal=True, backend="triton")
    g = torch.randn_like(o)
    dk, dv = torch.autograd.grad(o, (k, v), g)
    kk, vv = k.detach().double().requires_grad_(), v.detach().double().requires_grad_()
    qq = q.double().nan_to_num(0.0)
    ref = attention_reference(qq, kk, vv, is_causal=True)
    gg = g.double().clone()
    gg[:, :, :tile] = 0  # the poisoned queries' own rows are NaN; keys past the first tile never meet them
    dk_ref, dv_ref = torch.autograd.grad(ref, (kk, vv), gg)
    assert torch.isnan(dk[:, :, :tile]).any()
    assert (dk[:, :, tile:].double() - dk_ref[:, :, tile:]).abs().max().item() < 1e-5
    assert (dv[:, :, tile:].double() - dv_ref[:, :, tile:]).abs().max().item() < 1e-5


# ---------------------------------------------------------------------------- determinism, compile
def test_backward_is_deterministic(path, device):
    (q, k, v), _ = make_qkv(2, 1, 37, 16, torch.float16, device)
    kw = dict(is_causal=True, block_size=3, prefix_len=torch.tensor([5, 30], device=device))
    g = torch.randn(2, 1, 37, 16, device=device, dtype=torch.float16)
    first = torch.autograd.grad(aimkern.attention(q, k, v, backend="triton", **kw), (q, k, v), g)
    second = torch.autograd.grad(aimkern.attention(q, k, v, backend="triton", **kw), (q, k, v), g)
    assert all(torch.equal(a, b) for a, b in zip(first, second))




def test_nn_attention_uses_the_kernel(device):
    torch.manual_seed(0)
    mod = aimkern.nn.Attention(32, num_heads=2, qkv_bias=True, is_causal=True, block_size=3, backend="triton")
    mod = mod.to(device)
    x = torch.randn(2, 11, 32, device=device, requires_grad=True)
    prefix = torch.tensor([0, 4], device=device)
    y = mod(x, prefix_len=prefix)
    (gx,) = torch.autograd.grad(y.sum(), (x,))
    mod.backend = "reference"
    y_ref = mod(x, prefix_len=prefix)
    (gx_ref,) = torch.autograd.grad(y_ref.sum(), (x,))
    assert torch.allclose(y, y_ref, atol=1e-5) and torch.allclose(gx, gx_ref, atol=1e-5)


@pytest.mark.skipif(HAS_CUDA, reason="the interpreter's bf16 dot is what is refused")
def test_bf16_under_interpreter_is_refused():
    q = torch.randn(1, 1, 4, 16, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="bfloat16"):
        aimkern.attention(q, q, q, backend="triton")


# ------------------------------------------------------------------------------------------- fuzz
@settings(max_examples=12)
@given(
    n=st.integers(1, 40),
    d=st.sampled_from([16, 24, 80]),
    b=st.integers(1, 2),
    is_causal=st.booleans(),
    block_size=st.integers(1, 12),
    prefix=st.sampled_from([None, "int", "tensor"]),
    fp16=st.booleans(),
    fused=st.booleans(),
    layout=st.sampled_from(["contiguous", "packed", "d_major"]),
    seed=st.integers(0, 2**16),
)
def test_fuzz(n, d, b, is_causal, block_size, prefix, fp16, fused, layout, seed):
    from aimkern.kernels.attention import fused_backward_fits
    from aimkern.ops import launch_policy

    torch.manual_seed(seed)
    device = "cuda" if HAS_CUDA else "cpu"
    if prefix == "int":
        prefix_len = seed % (n + 1)
    elif prefix == "tensor":
        prefix_len = torch.randint(0, n + 1, (b,), device=device)
    else:
        prefix_len = None
    mask = dict(is_causal=is_causal, block_size=block_size, prefix_len=prefix_len)
    dtype = torch.float16 if fp16 else torch.float32
    path = "fused" if fused and (not HAS_CUDA or fused_backward_fits(d, not fp16, n)) else "split"
    with launch_policy(attention_backward=path):
        check_attention(b, 1, n, d, dtype, mask, device, layout=layout)


# ------------------------------------------------------------------------------- GPU only (compiled)
# Sizes: ViT-B/16 at 224 px with and without a class token (fused backward), a long sequence at D = 128,
# and D = 80 (a padded head dim). Kept few: every (dtype, D, mask class) is a compile on a fresh GPU.
GPU_SHAPES = [(4, 12, 196, 64), (4, 12, 256, 64), (2, 4, 1024, 128), (2, 4, 1024, 80)]


@requires_cuda
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("mask", ["causal", "block3_mixed", "full"])
def test_gpu_bf16_vit_shapes(shape, mask):
    check_attention(*shape, torch.bfloat16, MASKS[mask], "cuda")


@requires_cuda
def test_gpu_fp16_and_packed():
    check_attention(4, 12, 197, 64, torch.float16, MASKS["block3_mixed"], "cuda", layout="packed")
    check_attention(2, 4, 1024, 64, torch.float16, MASKS["prefix_half"], "cuda", layout="packed")


@requires_cuda
@pytest.mark.parametrize("d", [24, 256])
def test_gpu_head_dims(d):
    check_attention(2, 2, 300, d, torch.bfloat16, MASKS["block3_mixed"], "cuda")


@requires_cuda
def test_gpu_long_prefix_fp32():
    check_attention(1, 2, 1100, 64, torch.float32, dict(is_causal=True, block_size=16, prefix_len="mixed"), "cuda")


# ------------------------------------------------------------------------- fp32 accumulation, long N
def _mean_err(x, ref):
    return (x.double() - ref).abs().mean().item()


def _rounded_accumulator_attention(q, k, v, tile: int = 64):
    """FlashAttention's online softmax with the output accumulator rounded to q's dtype after every key tile:
    the mutant this test exists to catch (scores and softmax statistics stay fp32, as in the kernel)."""
    s = (q.float() @ k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5
    m = torch.full(s.shape[:-1], float("-inf"), dtype=torch.float32)
    l_sum = torch.zeros(s.shape[:-1], dtype=torch.float32)
    acc = torch.zeros(*s.shape[:-1], v.shape[-1], dtype=torch.float32)
    for j in range(0, s.shape[-1], tile):
        blk = s[..., j:j + tile]
        m_new = torch.maximum(m, blk.amax(-1))
        p = torch.exp(blk - m_new[..., None])
        alpha = torch.exp(m - m_new)
        l_sum = l_sum * alpha + p.sum(-1)
        acc = (acc * alpha[..., None] + p.to(v.dtype).float() @ v[..., j:j + tile, :].float()).to(q.dtype).float()
        m = m_new
    return (acc / l_sum[..., None]).to(q.dtype)


def test_long_sequence_accumulates_in_fp32(device):
    """At N = 1024 (16 key tiles) an fp16 accumulator loses ~4x the accuracy of fp32 accumulation (~2.4x the mean error); short-N
    tests cannot tell them apart. Held to PyTorch's fp16 error on the mean, where the difference shows."""
    torch.manual_seed(0)
    n, d = 1024, 16
    q, k = (torch.randn(1, 1, n, d, device=device, dtype=torch.float16) for _ in range(2))
    v = (8 + torch.randn(1, 1, n, d, device=device)).to(torch.float16)  # a large mean: a large accumulator
    ref = attention_reference(q.double(), k.double(), v.double())
    bound = 1.25 * _mean_err(torch_same_dtype(q.float(), k.float(), v.float()).half(), ref)
    mutant = _mean_err(_rounded_accumulator_attention(q.cpu(), k.cpu(), v.cpu()).to(device), ref)
    assert mutant > 1.5 * bound, f"the test lost its power: a 16-bit accumulator errs {mutant:.2e}, bound {bound:.2e}"
    got = aimkern.attention(q, k, v, backend="triton")
    assert _mean_err(got, ref) <= bound, f"mean error {_mean_err(got, ref):.2e} > {bound:.2e} (fp32 accumulation)"
