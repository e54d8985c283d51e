"""aimkern.linear_cross_entropy, backend="triton", against a float64 reference (loss and every gradient).

Under Triton's interpreter (no GPU) in fp32 and fp16; bf16 and large shapes on CUDA only. The tolerance is
relative to the same-dtype PyTorch computation: err(kernel) <= 2 * err(torch same dtype) + atol.
Interpreter shapes stay small; the backward chunk is 64 tokens there, so T > 64 covers the fp32
accumulation of dW / d(bias) across chunks, and small T covers the forward's vocabulary splits.
"""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import aimkern
from aimkern.reference.cross_entropy import linear_cross_entropy_reference

from conftest import HAS_CUDA, requires_cuda
from tolerances import assert_close_relative

IGNORE = -100
ATOL = {torch.float32: 1e-6, torch.float16: 1e-5, torch.bfloat16: 1e-4}


def _problem(shape, v, e, *, bias=True, ignore_frac=0.25, device="cpu"):
    """float64 leaves (x, w, b) with logits of std ~2, and targets with about ignore_frac ignored."""
    x = torch.randn(*shape, e, dtype=torch.float64, device=device)
    w = torch.randn(v, e, dtype=torch.float64, device=device) * (2.0 / e**0.5)
    b = torch.randn(v, dtype=torch.float64, device=device) * 0.5 if bias else None
    t = torch.randint(0, v, shape, device=device)
    t = torch.where(torch.rand(shape, device=device) < ignore_frac, torch.full_like(t, IGNORE), t)
    return x, w, b, t


def _loss_and_grads(x, w, b, t, dtype, backend, upstream=None, **kw):
    """Loss and (dx, dw[, db]) with leaves cast to dtype; reduction="none" is weighted by `upstream`."""
    leaves = [a.detach().to(dtype).requires_grad_() for a in (x, w, b) if a is not None]
    bias = leaves[2] if b is not None else None
    if backend == "reference":
        loss = linear_cross_entropy_reference(leaves[0], leaves[1], t, linear_bias=bias, **kw)
    else:
        loss = aimkern.linear_cross_entropy(leaves[0], leaves[1], t, linear_bias=bias, backend=backend, **kw)
    total = loss.sum() if upstream is None else (loss * upstream.to(loss.dtype)).sum()
    return loss.detach(), torch.autograd.grad(total, leaves)


def _check(x, w, b, t, dtype, *, triton_target=None, **kw):
    upstream = torch.rand(t.shape, dtype=torch.float64, device=x.device) if kw.get("reduction") == "none" else None
    tt = t if triton_target is None else triton_target
    got, got_g = _loss_and_grads(x, w, b, tt, dtype, "triton", upstream, **kw)
    same, same_g = _loss_and_grads(x, w, b, t, dtype, "reference", upstream, **kw)
    # The float64 reference starts from the same dtype-rounded inputs: input rounding is common to all
    # three and would otherwise dominate (and randomly cancel in) a mean over a few dozen tokens.
    rounded = [a.to(dtype).double() if a is not None else None for a in (x, w, b)]
    ref, ref_g = _loss_and_grads(*rounded, t, torch.float64, "reference", upstream, **kw)
    assert got.dtype == torch.float32
    assert_close_relative(got, same, ref, name="loss", atol=_atol(dtype, ref))
    for name, g, s, r in zip(("d(input)", "d(weight)", "d(bias)"), got_g, same_g, ref_g):
        assert g.dtype == dtype, f"{name} has dtype {g.dtype}, want {dtype}"
        assert_close_relative(g, s, r, name=name, atol=_atol(dtype, r))


def _atol(dtype, ref):
    # Relative to the magnitude: a "sum" loss of ~80 carries fp32 rounding ~1e-5 in any summation order.
    return ATOL[dtype] * max(1.0, ref.abs().max().item() if ref.numel() else 0.0)


# (input shape, V, E): odd token counts, V not a multiple of any tile, the 8192-way case on a few tokens.
SHAPES = [
    ((37,), 300, 48),
    ((2, 37), 517, 80),  # 74 tokens: two backward chunks
    ((1,), 300, 80),
    ((23,), 4096, 48),  # few tokens, wide vocab: several vocabulary splits
    ((5,), 8192, 48),
]
OPTIONS = [  # (bias, reduction, label_smoothing, z_loss)
    (True, "mean", 0.0, 0.0),
    (False, "sum", 0.1, 1e-3),
    (True, "none", 0.2, 1e-2),
]


@pytest.mark.parametrize("shape,v,e", SHAPES, ids=lambda s: str(s))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_matches_float64_reference(shape, v, e, dtype):
    # One option set per shape (rotating through them) keeps the interpreter time small; the options
    # test below crosses every option with one shape.
    bias, reduction, eps, z = OPTIONS[SHAPES.index((shape, v, e)) % len(OPTIONS)]
    x, w, b, t = _problem(shape, v, e, bias=bias)
    _check(x, w, b, t, dtype, reduction=reduction, label_smoothing=eps, z_loss=z)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("bias,eps,z", [(True, 0.0, 0.0), (False, 0.1, 0.0), (True, 0.0, 1e-2), (True, 1.0, 1e-3)])
def test_every_option_and_reduction(reduction, bias, eps, z):
    x, w, b, t = _problem((13,), 300, 48, bias=bias)
    _check(x, w, b, t, torch.float32, reduction=reduction, label_smoothing=eps, z_loss=z)


def test_longer_sequence_fp16_several_chunks():
    # 197 tokens (a ViT-224 image's patch count): four backward chunks accumulate dW and db in fp32.
    x, w, b, t = _problem((197,), 517, 80)
    _check(x, w, b, t, torch.float16, reduction="mean", label_smoothing=0.1, z_loss=1e-4)


def test_other_ignore_index_and_int32_targets():
    x, w, b, t = _problem((19,), 300, 48, ignore_frac=0.0)
    t[::4] = 7  # ignore_index may be a valid class id: those tokens drop out
    # int32 targets for the kernel (the API accepts any integer dtype); F.cross_entropy wants int64.
    _check(x, w, b, t, torch.float32, triton_target=t.to(torch.int32), ignore_index=7, label_smoothing=0.1)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_targets_ignored(reduction):
    x, w, b, t = _problem((9,), 300, 48, ignore_frac=1.0)
    got, grads = _loss_and_grads(x, w, b, t, torch.float32, "triton", label_smoothing=0.1, z_loss=1e-3,
                                 reduction=reduction)
    want, _ = _loss_and_grads(x, w, b, t, torch.float64, "reference", label_smoothing=0.1, z_loss=1e-3,
                              reduction=reduction)
    if reduction == "mean":
        assert torch.isnan(got) and torch.isnan(want)  # 0 / 0, like F.cross_entropy
    else:
        assert torch.equal(got, want.float()) and not got.any()
    for g in grads:  # the reference's gradients are exactly zero here too
        assert torch.equal(g, torch.zeros_like(g))


def test_gradient_of_a_subset_of_inputs():
    x, w, b, t = _problem((11,), 300, 48)
    xs, ws, bs = x.float().requires_grad_(), w.float(), b.float().requires_grad_()
    loss = aimkern.linear_cross_entropy(xs, ws, t, linear_bias=bs, backend="triton")
    dx, db = torch.autograd.grad(loss, (xs, bs))
    ref = linear_cross_entropy_reference(x.requires_grad_(), w, t, linear_bias=b.requires_grad_())
    rdx, rdb = torch.autograd.grad(ref, (x, b))
    torch.testing.assert_close(dx.double(), rdx, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(db.double(), rdb, rtol=1e-4, atol=1e-6)
    # Only the weight: no d(input) is computed.
    ws.requires_grad_()
    (dw,) = torch.autograd.grad(aimkern.linear_cross_entropy(xs.detach(), ws, t, backend="triton"), (ws,))
    (rdw,) = torch.autograd.grad(linear_cross_entropy_reference(x.detach(), w.requires_grad_(), t), (w,))
    torch.testing.assert_close(dw.double(), rdw, rtol=1e-4, atol=1e-6)




def test_backward_is_deterministic():
    x, w, b, t = _problem((150,), 300, 48)
    runs = [_loss_and_grads(x, w, b, t, torch.float32, "triton", label_smoothing=0.1)[1] for _ in range(2)]
    for g1, g2 in zip(*runs):
        assert torch.equal(g1, g2)




def test_out_of_range_target_is_an_error_not_a_wrong_loss():
    x, w, _, t = _problem((6,), 300, 48, ignore_frac=0.0)
    t[2] = 300
    with pytest.raises(ValueError, match="target values"):
        aimkern.linear_cross_entropy(x.float(), w.float(), t, backend="triton")
    # Under torch.compile the host-side check is skipped; the op itself then marks the token NaN.
    from aimkern.ops.cross_entropy import CrossEntropyParams, lce_fwd

    loss, _ = lce_fwd(x.float(), w.float(), None, t, CrossEntropyParams(ignore_index=IGNORE), True)
    assert torch.isnan(loss[2]) and torch.isfinite(loss[torch.arange(6) != 2]).all()


def test_target_check_reads_no_values_off_the_cpu():
    """On CUDA the target range check would cost three host syncs per step: it runs only on CPU tensors.
    Meta tensors stand in for CUDA here: reading any of their values raises."""
    from aimkern.ops.cross_entropy import CrossEntropyParams
    from aimkern.specs.cross_entropy import check

    x, w = torch.empty(6, 48, device="meta"), torch.empty(300, 48, device="meta")
    t = torch.empty(6, dtype=torch.long, device="meta")
    check((x, w, t, None), CrossEntropyParams(), "triton")
    with pytest.raises(Exception):  # the same read the CPU check makes does touch values
        int(t.min())


@requires_cuda
def test_gpu_forward_and_backward_make_no_host_sync():
    x, w, b, t = _problem((300,), 8192, 256, device="cuda")
    x, w = x.bfloat16().requires_grad_(), w.bfloat16().requires_grad_()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = aimkern.linear_cross_entropy(x, w, t, linear_bias=b.bfloat16())
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss.float()).item()


def test_triton_path_rejects_mixed_dtypes():
    x, w, b, t = _problem((4,), 300, 48)
    with pytest.raises(TypeError, match="linear_weight"):
        aimkern.linear_cross_entropy(x.float(), w.half(), t, backend="triton")
    with pytest.raises(TypeError, match="linear_bias"):
        aimkern.linear_cross_entropy(x.float(), w.float(), t, linear_bias=b.half(), backend="triton")




@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_cuda_launch_configs_compute_the_same(cuda_configs, dtype):
    # Runs the untuned CUDA configs (Hopper tiles) through the interpreter, so a GPU-only tiling bug (a
    # BLOCK_V that does not tile a vocabulary slice, masks at 128-wide tiles) shows up here too.
    from aimkern.kernels import cross_entropy as kern

    assert all(kern.VOCAB_SPLIT_QUANTUM % c.kwargs["BLOCK_V"] == 0
               for c in kern.TILE_CONFIGS + kern.TILE_CONFIGS_SM80 + (kern.TILE_CONFIG_FP32,))
    cuda_configs(kern, "tile", "matmul")
    x, w, b, t = _problem((37,), 300, 80)
    _check(x, w, b, t, dtype, reduction="mean", label_smoothing=0.1, z_loss=1e-3)


@settings(max_examples=8)
@given(
    t=st.integers(1, 40), v=st.integers(1, 300), e=st.sampled_from([8, 12, 48, 80]), bias=st.booleans(),
    reduction=st.sampled_from(["mean", "sum", "none"]), eps=st.sampled_from([0.0, 0.1]),
    z=st.sampled_from([0.0, 1e-3]), ignore_frac=st.sampled_from([0.0, 0.3]),
)
def test_fuzz_fp32(t, v, e, bias, reduction, eps, z, ignore_frac):
    x, w, b, tgt = _problem((t,), v, e, bias=bias, ignore_frac=ignore_frac)
    if reduction == "mean" and (tgt == IGNORE).all():
        tgt[0] = 0  # the all-ignored NaN case has its own test
    _check(x, w, b, tgt, torch.float32, reduction=reduction, label_smoothing=eps, z_loss=z)


# ------------------------------------------------------------------------------------------- GPU only


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("t,v,e", [(4096, 8192, 768), (1000, 65536, 256), (777, 8192, 80)])
def test_gpu_large_shapes(dtype, t, v, e):
    x, w, b, tgt = _problem((t,), v, e, device="cuda")
    _check(x, w, b, tgt, dtype, reduction="mean", label_smoothing=0.1, z_loss=1e-4)


@requires_cuda
def test_gpu_fp32_is_not_tf32():
    x, w, b, tgt = _problem((300,), 8192, 768, device="cuda")
    _check(x, w, b, tgt, torch.float32, reduction="sum")


@pytest.mark.skipif(HAS_CUDA, reason="checks the interpreter's chunking assumption")
def test_interpreter_uses_several_backward_chunks():
    # The accumulation tests above rely on chunks of at most 64 tokens under the interpreter.
    from aimkern.kernels import cross_entropy as kern

    assert kern.bwd_chunk_tokens(197, 517, 2, interpreting=True) == 64


# ------------------------------------------------------- inputs that once gave silent wrong results
def _target_layouts(t: torch.Tensor) -> dict:
    """The values of the (T,) target ``t`` in layouts a kernel must not assume: a column of a label table
    (stride 3), a view past element 0 (storage offset), int32 with stride 2, and expanded (stride 0: the
    first class id that is not ignored, for every token; compare it with ``expanded.contiguous()``)."""
    table = torch.stack([torch.zeros_like(t), t, torch.full_like(t, 5)], dim=1)  # (T, 3)
    padded = torch.cat([torch.full((7,), 3, dtype=t.dtype), t])
    wide32 = torch.stack([t.to(torch.int32), -t.to(torch.int32)], dim=1)
    k = int((t != IGNORE).nonzero()[0])
    return {"column": table[:, 1], "offset": padded[7:], "int32-stride2": wide32[:, 0],
            "expanded": t[k : k + 1].expand(t.shape[0])}


@pytest.mark.parametrize("layout", ["column", "offset", "int32-stride2", "expanded"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_target_in_any_layout(layout, reduction):
    # 70 tokens: two backward chunks under the interpreter, so chunk offsets meet the target's stride too.
    # "mean" takes the forward-with-gradient path, "none" the per-token forward + backward path.
    x, w, b, t = _problem((70,), 300, 32, ignore_frac=0.2)
    target = _target_layouts(t)[layout]
    assert not target.is_contiguous() or target.storage_offset() > 0
    _check(x, w, b, target.contiguous().long(), torch.float32, triton_target=target, reduction=reduction,
           label_smoothing=0.1)


def test_strided_target_without_gradient():
    x, w, b, t = _problem((37,), 300, 32, ignore_frac=0.0)
    target = _target_layouts(t)["column"]
    for reduction in ("none", "sum"):
        got = aimkern.linear_cross_entropy(x.float(), w.float(), target, linear_bias=b.float(), backend="triton",
                                           reduction=reduction)
        want = linear_cross_entropy_reference(x, w, t, linear_bias=b, reduction=reduction)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_two_dimensional_target_that_reshape_can_view():
    # targets[:, ::2] is (4, 9) with strides (36, 2): reshape(-1) views it with stride 2, no copy.
    x, w, b, _ = _problem((4, 9), 300, 32)
    labels = torch.randint(0, 300, (4, 18))
    target = labels[:, ::2]
    assert target.reshape(-1).data_ptr() == target.data_ptr()
    _check(x, w, b, target.contiguous(), torch.float32, triton_target=target, reduction="mean")


def _confident_problem(t: int, v: int):
    """fp16-exact inputs whose logits are exact too: x_i = m_i * e_{target_i}, w_c = e_c + e_V (one shared
    direction). Every token predicts its target with a margin m in {8, 9, 10}, so each other class gets
    p ~ 1e-4 (a normal fp16 number) while p / T is subnormal. d(input)'s last column is the sum of a
    token's dlogits, exactly 0, where any rounding of the small ones shows."""
    tgt = torch.randint(0, v, (t,))
    margin = 8.0 + torch.randint(0, 3, (t,)).double()
    x = torch.zeros(t, v + 1, dtype=torch.float64)
    x[torch.arange(t), tgt] = margin
    w = torch.cat([torch.eye(v, dtype=torch.float64), torch.ones(v, 1, dtype=torch.float64)], dim=1)
    return x, w, tgt


def _dx(x, w, t, dtype, backend, upstream: float):
    xs = x.to(dtype).requires_grad_()
    if backend == "reference":
        loss = linear_cross_entropy_reference(xs, w.to(dtype), t)
    else:
        loss = aimkern.linear_cross_entropy(xs, w.to(dtype), t, backend=backend)
    (dx,) = torch.autograd.grad(loss, xs, torch.tensor(upstream, dtype=loss.dtype))
    return dx


@pytest.mark.parametrize("upstream", [1.0, 1024.0])
def test_fp16_mean_gradient_does_not_underflow(upstream):
    # A loss-scaled fp16 step: the upstream gradient (GradScaler's factor) arrives after the forward. Folding
    # 1 / count into fp16 dlogits in the forward rounds p / T onto fp16's subnormal grid (or to zero) before
    # the scale can lift it; torch scales first. At T = 65,536, V = 8,192 every p / T underflows so; here
    # 64 tokens with confident predictions show it (tests/test_gpu_cross_entropy.py runs the real size).
    x, w, t = _confident_problem(64, 16)
    got = _dx(x, w, t, torch.float16, "triton", upstream)
    same = _dx(x, w, t, torch.float16, "reference", upstream)
    ref = _dx(x, w, t, torch.float64, "reference", upstream)
    assert_close_relative(got, same, ref, name="d(input)", atol=1e-7 * ref.abs().max().item())


def test_fp16_gradient_under_gradscaler_first_scale():
    # GradScaler starts at 65536, which fp16 cannot hold (max 65504): the scaling must run in fp32. (A
    # "mean" over 64 tokens: the scaled gradients are ~1000x the unscaled ones, well inside fp16's range.)
    x, w, b, t = _problem((64,), 100, 32, ignore_frac=0.0)
    got = _scaled_grads(x, w, b, t, torch.float16, "triton", 65536.0, "mean")
    same = _scaled_grads(x, w, b, t, torch.float16, "reference", 65536.0, "mean")
    ref = _scaled_grads(x, w, b, t, torch.float64, "reference", 65536.0, "mean")
    for name, g, s, r in zip(("d(input)", "d(weight)", "d(bias)"), got, same, ref):
        assert_close_relative(g, s, r, name=name, atol=1e-5 * r.abs().max().item())


def _scaled_grads(x, w, b, t, dtype, backend, upstream, reduction):
    leaves = [a.to(dtype).requires_grad_() for a in (x, w, b)]
    loss = (linear_cross_entropy_reference(*leaves[:2], t, linear_bias=leaves[2], reduction=reduction)
            if backend == "reference" else
            aimkern.linear_cross_entropy(*leaves[:2], t, linear_bias=leaves[2], reduction=reduction, backend=backend))
    return torch.autograd.grad(loss, leaves, torch.tensor(upstream, dtype=loss.dtype))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_double_backward_is_refused_not_dropped(reduction):
    # The forward-with-gradient path has no formula for the gradient of its gradients: a gradient penalty
    # through it must fail loudly, not differentiate a constant.
    x, w, _, t = _problem((9,), 300, 32)
    xs, ws = x.float().requires_grad_(), w.float().requires_grad_()
    loss = aimkern.linear_cross_entropy(xs, ws, t, backend="triton", reduction=reduction)
    with pytest.raises(RuntimeError, match="double backward"):
        (dx,) = torch.autograd.grad(loss, xs, create_graph=True)
        torch.autograd.grad(dx.square().sum(), ws)


@pytest.mark.parametrize("backend", ["triton", "reference", "auto"])
@pytest.mark.parametrize("ignore_index", [3.0, 3.5, float("nan"), True])
def test_float_ignore_index_is_a_type_error(backend, ignore_index):
    x, w, _, t = _problem((6,), 300, 32, ignore_frac=0.0)
    with pytest.raises(TypeError, match="ignore_index"):
        aimkern.linear_cross_entropy(x.float(), w.float(), t, ignore_index=ignore_index, backend=backend)


@pytest.mark.skipif(HAS_CUDA, reason="the interpreter's bf16 tl.dot is what is refused")
def test_bf16_under_the_interpreter_is_refused():
    x, w, _, t = _problem((6,), 300, 32)
    with pytest.raises(TypeError, match="bfloat16"):
        aimkern.linear_cross_entropy(x.bfloat16(), w.bfloat16(), t, backend="triton")
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(TypeError, match="bfloat16"):
        aimkern.linear_cross_entropy(x.float(), w.float(), t, backend="triton")
    from aimkern.specs.cross_entropy import SPEC
    from op_cases import _ce as spec_problem

    assert "bfloat16" in SPEC.candidate("triton").unsupported(spec_problem("bfloat16", (6,), 300, 32, False, True))
