"""The public ``aimkern.attention_varlen`` / ``attention_varlen_qkvpacked``: the checks at the boundary, the
Triton path (interpreter on CPU) against the float64 reference through the public op, int and per-sequence
masks, the packed layout, every dispatch candidate verified, and torch.compile without recompiles.

The kernels themselves, pack by pack and gradient by gradient, are held in tests/test_attention_varlen.py.
"""
import pytest
import torch

import aimkern
from aimkern.dispatch import measure
from aimkern.ops._launch import interpreting
from aimkern.specs import describe, get_spec
from tolerances import assert_close_relative

SPEC = get_spec("attention_varlen")


def cu_of(lengths) -> torch.Tensor:
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)


def inputs(lengths, h=2, d=16, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = sum(lengths)
    return [torch.randn(t, h, d, generator=g).to(dtype).requires_grad_() for _ in range(3)] + [cu_of(lengths)]


def grads(out, xs, seed=1):
    do = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.dtype)
    return torch.autograd.grad(out, xs, do)


@pytest.mark.skipif(not interpreting(), reason="the Triton path on CPU runs under the interpreter")
@pytest.mark.parametrize("mask", ["full", "int-causal", "per-sequence"])
def test_public_op_matches_float64_reference(mask):
    """Lengths 1 and 7 beside a 70-token sequence (query and key tails); int and per-sequence masks."""
    lengths = [1, 70, 7]
    q, k, v, cu = inputs(lengths)
    kw = {"full": dict(),
          "int-causal": dict(is_causal=True, block_size=3, prefix_len=5),  # prefix 5 is capped at n = 1
          "per-sequence": dict(is_causal=True, block_size=torch.tensor([1, 7, 2]),
                               prefix_len=torch.tensor([1, 0, 7]))}[mask]
    got = aimkern.attention_varlen(q, k, v, cu, backend="triton", **kw)
    x64 = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ref = aimkern.attention_varlen(*x64, cu, backend="reference", **kw)
    x32 = [x.detach().requires_grad_() for x in (q, k, v)]
    same = aimkern.attention_varlen(*x32, cu, backend="reference", **kw)
    for name, g, s, r in zip(("o", "dq", "dk", "dv"), (got, *grads(got, (q, k, v))), (same, *grads(same, x32)),
                             (ref, *grads(ref, x64))):
        assert_close_relative(g, s, r, name=f"{name} {mask}", atol=1e-5)


@pytest.mark.skipif(not interpreting(), reason="the Triton path on CPU runs under the interpreter")
def test_qkvpacked_reads_views_and_writes_one_gradient():
    """The packed op equals attention_varlen on q, k, v = qkv[:, 0..2], output and the (T, 3, H, D) gradient."""
    lengths = [5, 40]
    cu = cu_of(lengths)
    qkv = torch.randn(45, 3, 2, 16, requires_grad=True)
    kw = dict(is_causal=True, block_size=torch.tensor([1, 4]), prefix_len=torch.tensor([2, 9]), backend="triton")
    o = aimkern.attention_varlen_qkvpacked(qkv, cu, **kw)
    (g,) = grads(o, (qkv,))
    q, k, v = (qkv.detach()[:, i].clone().requires_grad_() for i in range(3))
    o2 = aimkern.attention_varlen(q, k, v, cu, **kw)
    assert torch.equal(o, o2) and o.is_contiguous()
    assert g.shape == qkv.shape and torch.equal(g, torch.stack(grads(o2, (q, k, v)), dim=1))


def test_bad_inputs_name_the_argument():
    q, k, v, cu = inputs([3, 4])
    bad = [
        (dict(cu_seqlens=cu.float()), TypeError, "cu_seqlens"),
        (dict(cu_seqlens=cu[:1]), ValueError, "cu_seqlens"),
        (dict(cu_seqlens=torch.tensor([0, 4, 3, 7], dtype=torch.int32)), ValueError, "cu_seqlens"),
        (dict(cu_seqlens=torch.tensor([0, 3, 6], dtype=torch.int32)), ValueError, "cu_seqlens"),
        (dict(block_size=0, is_causal=True), ValueError, "block_size"),
        (dict(block_size=torch.tensor([1, 0]), is_causal=True), ValueError, "block_size"),
        (dict(block_size=torch.tensor([1.0, 2.0]), is_causal=True), TypeError, "block_size"),
        (dict(block_size=torch.tensor([1, 2, 3]), is_causal=True), ValueError, "block_size"),
        (dict(prefix_len=torch.tensor([4, 0]), is_causal=True), ValueError, "prefix_len"),
        (dict(prefix_len=-1, is_causal=True), ValueError, "prefix_len"),
        (dict(prefix_len=True, is_causal=True), TypeError, "prefix_len"),
        (dict(max_seqlen=0), ValueError, "max_seqlen"),
        (dict(scale=float("nan")), ValueError, "scale"),
        (dict(q=q[:, :, :8]), ValueError, "q, k and v"),
        (dict(q=q.detach().half()), TypeError, "dtype"),
        (dict(q=q[None]), ValueError, "q"),
    ]
    for change, exc, word in bad:
        args = dict(q=q, k=k, v=v, cu_seqlens=cu)
        args.update({n: change.pop(n) for n in list(change) if n in args})
        with pytest.raises(exc, match=word):
            aimkern.attention_varlen(args["q"], args["k"], args["v"], args["cu_seqlens"], backend="reference",
                                     **change)
    with pytest.raises(ValueError, match="qkv"):
        aimkern.attention_varlen_qkvpacked(torch.randn(7, 2, 2, 16), cu)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_strided_cu_seqlens_and_prefix_are_read_through_their_values(backend):
    """A strided, offset cu_seqlens (int64), an expanded prefix tensor, a strided block-size tensor and
    q, k, v views of one wider buffer give what contiguous int32 ones give."""
    if backend == "triton" and not interpreting():
        pytest.skip("the Triton path on CPU runs under the interpreter")
    q, k, v, cu = inputs([3, 9, 4])
    buf = torch.full((2 * cu.numel() + 2,), -7, dtype=torch.long)
    buf[2::2] = cu
    cu_strided = buf[2::2]  # stride 2, storage offset 2
    assert cu_strided.stride() == (2,) and cu_strided.storage_offset() == 2
    prefix = torch.tensor([2]).expand(3)
    blocks = torch.tensor([1, 0, 3, 0, 2, 0])[::2]
    wide = torch.randn(16, 2, 40)
    qs = wide[:, :, 4:20]
    want = aimkern.attention_varlen(qs.contiguous(), k, v, cu, is_causal=True, block_size=torch.tensor([1, 3, 2]),
                                    prefix_len=torch.tensor([2, 2, 2]), backend=backend)
    got = aimkern.attention_varlen(qs, k, v, cu_strided, is_causal=True, block_size=blocks, prefix_len=prefix,
                                   backend=backend)
    assert torch.equal(got, want)


@pytest.mark.parametrize("name", ["reference-dense", "sdpa-mask"])
@pytest.mark.parametrize("mask", [dict(is_causal=False), dict(is_causal=True, block_size=2, prefix_len=1)],
                         ids=["full", "prefix-block"])
def test_dense_mask_candidates_pass_the_dispatch_verification(name, mask):
    """The dispatcher's own check (float64 reference, every gradient, the spec's rule) accepts the dense
    block-diagonal candidates, and refuses them when the mask is wrong (a full mask for a causal call)."""
    q, k, v, cu = inputs([30, 1, 50])
    tensors, params = SPEC.check((q, k, v, cu, None, mask.get("prefix_len")),
                                 aimkern.functional._varlen_params(None, mask["is_causal"], mask.get("block_size", 1),
                                                                   None, True)[1], "reference", "t")
    problem = describe(SPEC.name, tensors, params, q.dtype)
    assert measure.verify(SPEC, SPEC.candidate(name), problem) is None
    if mask["is_causal"]:
        from dataclasses import replace

        from aimkern.specs.opspec import Candidate

        wrong = Candidate("wrong", lambda *a: SPEC.candidate(name).fn(*a[:-1], replace(a[-1], is_causal=False)))
        assert measure.verify(SPEC, wrong, problem) is not None


@pytest.mark.skipif(not interpreting(), reason="the Triton path on CPU runs under the interpreter")
@pytest.mark.parametrize("max_seqlen", [64, None], ids=["max_seqlen", "no-max_seqlen"])
def test_compile_fullgraph_no_recompile_when_cu_seqlens_change(max_seqlen):
    """One graph for three packs of T = 80 tokens with different cu_seqlens (a length-1 sequence included),
    forward and backward equal to the eager reference."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()

    @torch.compile(backend=counter, fullgraph=True)
    def step(q, k, v, cu, bs, pf):
        return aimkern.attention_varlen(q, k, v, cu, max_seqlen=max_seqlen, is_causal=True, block_size=bs,
                                        prefix_len=pf, backend="triton")

    for lengths in ([10, 30, 40], [40, 39, 1], [20, 20, 40]):
        q, k, v, cu = inputs(lengths, seed=len(lengths) + lengths[0])
        bs, pf = torch.tensor([1, 2, 3], dtype=torch.int32), torch.tensor([0, 1, 1], dtype=torch.int32)
        o = step(q, k, v, cu, bs, pf)
        g = grads(o, (q, k, v))
        x = [t.detach().double().requires_grad_() for t in (q, k, v)]
        r = aimkern.attention_varlen(*x, cu, is_causal=True, block_size=bs, prefix_len=pf, backend="reference")
        for a, b in zip((o, *g), (r, *grads(r, x))):
            assert (a.double() - b).abs().max().item() < 1e-4
    assert counter.frame_count == 1


def test_a_registered_candidate_gets_the_public_signature():
    """aimkern.dispatch.register's candidates (FlexAttention, say) are called as the public op: block_size as
    the call gave it, an int or the (S,) tensor, never None."""
    q, k, v, cu = inputs([4, 6])
    for block in (3, torch.tensor([1, 2], dtype=torch.int32)):
        tensor, params = aimkern.functional._varlen_params(None, True, block, None, True)
        tensors, params = SPEC.check((q, k, v, cu, tensor, torch.tensor([1, 0])), params, "reference", "t")
        args, kwargs = SPEC.public_call(tensors, params)
        assert kwargs["block_size"] is block if isinstance(block, int) else torch.equal(kwargs["block_size"], block)
        got = aimkern.attention_varlen(*args, **kwargs, backend="reference")
        want = aimkern.attention_varlen(q, k, v, cu, is_causal=True, block_size=block, prefix_len=torch.tensor([1, 0]),
                                        backend="reference")
        assert torch.equal(got, want)
