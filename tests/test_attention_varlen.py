"""Varlen attention on the Triton kernels (aimkern/ops/attention_varlen.py's launchers; interpreter on CPU) vs a float64
reference computed sequence by sequence (aimkern.reference.attention_varlen).

Output and dq, dk, dv are held to ``err <= 2 * err(PyTorch in the same dtype) + atol`` (tests/tolerances.py),
PyTorch's same-dtype attention being the plain math of each sequence in that dtype. The launchers are called
directly (the op layer that wraps them in custom ops comes separately), so the backward gets o and lse from
the forward as autograd would hand them over.
"""
import pytest
import torch

from aimkern.ops._launch import LaunchPolicy, gpu_configs, interpreting
from aimkern.reference.attention import attention_mask
from aimkern.reference.attention_varlen import attention_varlen_reference
from aimkern.ops.attention_varlen import VarlenAttentionParams, launch_backward, launch_forward
from tolerances import assert_close_relative

ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
POLICY = LaunchPolicy(autotune=False)

# Packs: lengths, per-sequence block sizes and prefixes (each prefix list holds 0 and some n_i).
SMALL = dict(lengths=[1, 7, 37, 50], block=[1, 3, 5, 7], prefix=[1, 7, 0, 20])  # <= 64: 16-row tiles
MID = dict(lengths=[1, 65, 7, 37, 64, 90], block=[1, 1, 2, 5, 8, 9], prefix=[0, 65, 7, 10, 0, 50])  # 64-row
BIG = dict(lengths=[1, 7, 37, 64, 65, 196, 197], block=[1, 2, 5, 8, 1, 14, 3], prefix=[0, 7, 10, 0, 65, 98, 1])
PACKS = {"small": SMALL, "mid": MID}


def cu_of(lengths, device="cpu") -> torch.Tensor:
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=device)


def mask_of(pack: dict, is_causal: bool, device="cpu") -> dict:
    """Keyword mask options of a pack: per-sequence int32 tensors."""
    return dict(is_causal=is_causal, block_size=torch.tensor(pack["block"], dtype=torch.int32, device=device),
                prefix_len=torch.tensor(pack["prefix"], dtype=torch.int32, device=device))


def run_triton(q, k, v, cu, do, *, is_causal, block_size, prefix_len, max_seqlen=None, deterministic=True):
    """(o, dq, dk, dv) from the varlen launchers."""
    max_seqlen = int((cu[1:] - cu[:-1]).max()) if max_seqlen is None else max_seqlen
    params = VarlenAttentionParams(max_seqlen=max_seqlen, is_causal=is_causal, deterministic=deterministic)
    o, lse = launch_forward(q, k, v, cu, block_size, prefix_len, params, POLICY)
    assert lse.shape == (q.shape[1], q.shape[0]) and lse.dtype == torch.float32
    dq, dk, dv = launch_backward(do, q, k, v, o, lse, cu, block_size, prefix_len, params, POLICY)
    return o, dq, dk, dv


def torch_same_dtype(q, k, v, cu, *, is_causal, block_size, prefix_len):
    """Plain attention of each sequence in the inputs' dtype: the error budget the kernels are held to."""
    outs = []
    for s in range(cu.numel() - 1):
        a, b = int(cu[s]), int(cu[s + 1])
        qs, ks, vs = (x[a:b].transpose(0, 1) for x in (q, k, v))  # (H, n, D)
        sc = (qs @ ks.transpose(-1, -2)) * q.shape[-1] ** -0.5
        mask = attention_mask(b - a, is_causal=is_causal, block_size=int(block_size[s]),
                              prefix_len=prefix_len[s:s + 1], device=q.device)[0]
        outs.append((sc.masked_fill(~mask, float("-inf")).softmax(-1) @ vs).transpose(0, 1))
    return torch.cat(outs)


def check_pack(pack: dict, dtype, is_causal: bool, h: int = 1, d: int = 16, device="cpu"):
    lengths = pack["lengths"]
    cu = cu_of(lengths, device)
    t = sum(lengths)
    kw = mask_of(pack, is_causal, device)
    q, k, v, do = (torch.randn(t, h, d, dtype=dtype, device=device) for _ in range(4))
    got = run_triton(q, k, v, cu, do, **kw)

    def run(dt, fn):
        xs = [x.to(dt).requires_grad_() for x in (q, k, v)]
        out = fn(*xs, cu, **kw)
        return (out, *torch.autograd.grad(out, xs, do.to(dt)))

    ref = run(torch.float64, attention_varlen_reference)
    same = run(dtype, torch_same_dtype)
    for name, g, s, r in zip(("o", "dq", "dk", "dv"), got, same, ref):
        assert g.dtype == dtype and g.shape == (t, h, d)
        assert_close_relative(g, s, r, name=f"{name} ({dtype}, causal={is_causal}, {lengths})", atol=ATOL[dtype])


@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("pack", list(PACKS), ids=list(PACKS))
def test_pack_against_float64_reference(pack, dtype, is_causal, device):
    check_pack(PACKS[pack], dtype, is_causal, device=device)


@pytest.mark.slow
@pytest.mark.parametrize("dtype,is_causal", [(torch.float16, True), (torch.float32, True), (torch.float16, False)],
                         ids=["fp16-causal", "fp32-causal", "fp16-full"])
def test_big_pack_against_float64_reference(dtype, is_causal, device):
    """1, 7, 37, 64, 65, 196, 197: query and key tails, several main tiles, prefixes 0 and n_i."""
    check_pack(BIG, dtype, is_causal, device=device)


@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_no_token_sees_another_sequence(is_causal, device):
    """Another sequence's k, v change nothing of a sequence's output (bit for bit), and d(output of
    sequence a) / d(q, k, v of every other sequence) is exactly 0. Causal: sequence a's last causal block
    (20 tokens from 60) runs past its end, so only the sequence bound keeps the next keys out."""
    lengths = [37, 65, 20, 70]
    cu, t = cu_of(lengths, device), sum(lengths)
    kw = dict(is_causal=is_causal, block_size=torch.tensor([1, 20, 20, 3], dtype=torch.int32, device=device),
              prefix_len=torch.tensor([0, 10, 20, 64], dtype=torch.int32, device=device))
    q, k, v = (torch.randn(t, 2, 16, device=device) for _ in range(3))
    a0, a1 = 37, 102  # sequence 1 (65 tokens): 64 + a one-query and one-key tail
    do = torch.zeros(t, 2, 16, device=device)
    do[a0:a1] = torch.randn(a1 - a0, 2, 16, device=device)
    o, dq, dk, dv = run_triton(q, k, v, cu, do, **kw)
    others = torch.ones(t, dtype=torch.bool, device=device)
    others[a0:a1] = False
    for name, g in (("dq", dq), ("dk", dk), ("dv", dv)):
        assert g[others].abs().max().item() == 0.0, f"{name} of other sequences is not exactly 0"
        assert g[a0:a1].abs().max().item() > 0
    k2, v2 = k.clone(), v.clone()
    k2[others], v2[others] = 50.0, -50.0  # a tile reading them unmasked would change the output
    o2 = run_triton(q, k2, v2, cu, do, **kw)[0]
    assert torch.equal(o[a0:a1], o2[a0:a1])


def test_empty_sequences_and_a_grid_larger_than_needed(device):
    """Zero-length sequences (the fixed-S padding of pack_to_budget) hold no token and disturb nothing;
    max_seqlen above the longest length only adds programs that do nothing."""
    cu = torch.tensor([0, 0, 9, 9, 75, 80, 80], dtype=torch.int32, device=device)
    kw = dict(is_causal=True, block_size=torch.tensor([1, 3, 1, 4, 2, 1], dtype=torch.int32, device=device),
              prefix_len=torch.tensor([0, 2, 0, 66, 1, 0], dtype=torch.int32, device=device))
    q, k, v, do = (torch.randn(80, 1, 16, device=device) for _ in range(4))
    got = run_triton(q, k, v, cu, do, max_seqlen=150, **kw)
    xs = [x.double().requires_grad_() for x in (q, k, v)]
    ref = attention_varlen_reference(*xs, cu, **kw)
    grads = torch.autograd.grad(ref, xs, do.double())
    for name, g, r in zip(("o", "dq", "dk", "dv"), got, (ref, *grads)):
        assert (g.double() - r).abs().max().item() < 1e-5, name


def test_strided_inputs_and_expanded_gradient(device):
    """q, k, v as views of one packed (T, 3, H, D) activation and a stride-0 incoming gradient (that of
    .sum()) give what contiguous copies give."""
    lengths = [7, 70]
    cu, t = cu_of(lengths, device), sum(lengths)
    kw = dict(is_causal=True, block_size=torch.tensor([2, 7], dtype=torch.int32, device=device), prefix_len=None)
    qkv = torch.randn(t, 3, 2, 16, device=device)
    q, k, v = qkv.unbind(1)
    do = torch.ones(1, 1, 1, device=device).expand(t, 2, 16)
    strided = run_triton(q, k, v, cu, do, **kw)
    plain = run_triton(q.contiguous(), k.contiguous(), v.contiguous(), cu, do.contiguous(), **kw)
    for a, b in zip(strided, plain):
        assert torch.equal(a, b)


def test_backward_is_deterministic_and_matches_unordered(device):
    lengths = [130, 40]  # two 64-key tiles and a 2-key tail add into each query tile of the first sequence
    cu, t = cu_of(lengths, device), sum(lengths)
    kw = dict(is_causal=False, block_size=torch.ones(2, dtype=torch.int32, device=device), prefix_len=None)
    q, k, v, do = (torch.randn(t, 1, 16, device=device) for _ in range(4))
    first = run_triton(q, k, v, cu, do, **kw)
    again = run_triton(q, k, v, cu, do, **kw)
    unordered = run_triton(q, k, v, cu, do, deterministic=False, **kw)
    for a, b, c in zip(first, again, unordered):
        assert torch.equal(a, b)
        assert (a - c).abs().max().item() < 1e-5


def test_reference_is_the_block_diagonal_mask():
    """The per-sequence reference equals one dense attention over the whole pack with a block-diagonal
    mask (each sequence's own mask on its diagonal block), computed independently here."""
    lengths = [3, 9, 1, 12]
    cu, t = cu_of(lengths), sum(lengths)
    block, prefix = [1, 3, 1, 5], [0, 4, 1, 2]
    q, k, v = (torch.randn(t, 2, 16, dtype=torch.float64) for _ in range(3))
    mask = torch.zeros(t, t, dtype=torch.bool)
    for s, n in enumerate(lengths):
        a = int(cu[s])
        i = torch.arange(n).view(n, 1)
        j = torch.arange(n).view(1, n)
        mask[a:a + n, a:a + n] = (j // block[s] <= i // block[s]) | (j < prefix[s])
    sc = torch.einsum("ihd,jhd->hij", q, k) * 16 ** -0.5
    want = torch.einsum("hij,jhd->ihd", sc.masked_fill(~mask, float("-inf")).softmax(-1), v)
    got = attention_varlen_reference(q, k, v, cu, is_causal=True, block_size=torch.tensor(block),
                                     prefix_len=torch.tensor(prefix))
    torch.testing.assert_close(got, want)


@pytest.mark.skipif(not interpreting(), reason="GPU configs under the interpreter (CPU runs)")
def test_gpu_tiles_on_a_pack_of_odd_lengths():
    """The GPU's 64-row tiles (run under the interpreter): 1- and 16-row tails, a key tail, fp16."""
    pack = dict(lengths=[3, 130, 97], block=[1, 13, 1], prefix=[3, 20, 0])
    with gpu_configs():
        check_pack(pack, torch.float16, True, d=64)


def test_gate_problems_reach_every_varlen_kernel():
    """The compile gate's varlen problems (benchmarks/kernel_problems.py) drive the launchers on meta tensors
    (nothing runs) through all four kernels and the dense delta pre-pass, with the GPU tables' configs."""
    import os
    import sys

    from aimkern.ops._launch import observe

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    try:
        from kernel_problems import attention_varlen_problems as gate_problems
    finally:
        sys.path.pop(0)

    names = set()
    problems = list(gate_problems("all"))
    for _, run in problems:
        with observe(dry_run=True) as launches:
            run()
        names |= {launch.name for launch in launches}
    assert len(problems) == (2 * 4 + 2) * 3 * 2 and len(list(gate_problems("gpu-run"))) == 2 * 2 * 3 * 2
    assert names == {"attn_varlen_fwd_kernel", "attn_varlen_fwd_tail_kernel", "attn_varlen_bwd_key_tail_kernel",
                     "attn_varlen_bwd_kernel", "attn_bwd_preprocess_kernel"}
