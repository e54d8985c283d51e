"""The bounds of varlen attention's launch: packs with more than 65,535 (sequence, head) pairs, and a
max_seqlen below a real sequence's length.

* Grid geometry, on meta tensors (nothing runs, nothing is allocated): the launchers put the head on grid axis
  1 and the sequence on axis 2, so S * H = 70,000 launches with every axis within CUDA's limits, and what
  cannot launch (S or H above 65,535) is a ValueError naming the quantity.
* max_seqlen too small (interpreter): the op never reads cu_seqlens on the host when max_seqlen is given, so the
  kernels find the sequence the grid does not cover and write NaN over all its rows of o, lse, dq, dk and dv;
  every other sequence is bit for bit what an exact run gives.
"""
import pytest
import torch

import aimkern
from aimkern.ops._launch import LaunchPolicy, meta_arch, observe
from aimkern.ops.attention_varlen import GRID_X_MAX, GRID_YZ_MAX, VarlenAttentionParams, launch_backward, \
    launch_forward

POLICY = LaunchPolicy(autotune=False)


def cu_of(lengths, device="cpu") -> torch.Tensor:
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=device)


# ------------------------------------------------------------------------------------ grid geometry
def meta_launches(s: int, h: int, *, t: int, max_seqlen: int, d: int = 64) -> list:
    """The launches (forward and backward) of a pack of S sequences x H heads over T tokens, on meta tensors,
    as on an sm_90 device."""
    q = torch.empty((t, h, d), device="meta", dtype=torch.float16)
    cu = torch.empty((s + 1,), device="meta", dtype=torch.int32)
    params = VarlenAttentionParams(max_seqlen=max_seqlen, is_causal=True, deterministic=True)
    with meta_arch(90), observe(dry_run=True) as seen:
        o, lse = launch_forward(q, q, q, cu, None, None, params, POLICY)
        launch_backward(q, q, q, q, o, lse, cu, None, None, params, POLICY)
    return seen


@pytest.mark.parametrize("s,h", [(4375, 16), (70_000, 1), (GRID_YZ_MAX, 8)], ids=["4375x16", "70000x1-refused", "max-S"])
def test_many_sequence_head_pairs_launch_within_cuda_limits(s, h):
    """S * H = 70,000 (4,375 images x 16 heads: the old S * H axis refused it) and S = 65,535: every kernel's
    grid stays within CUDA's limits, tiles on axis 0, heads on axis 1, sequences on axis 2 (the key tail one
    program per (s, h) on axis 0)."""
    if s > GRID_YZ_MAX:
        with pytest.raises(ValueError, match=r"S = 70000 sequences exceed .* grid axis 2 .* split the pack"):
            meta_launches(s, h, t=s * 2, max_seqlen=200)
        return
    launches = meta_launches(s, h, t=s * 2, max_seqlen=200)
    names = {x.name for x in launches}
    assert {"attn_varlen_fwd_kernel", "attn_varlen_fwd_tail_kernel", "attn_varlen_bwd_key_tail_kernel",
            "attn_varlen_bwd_kernel"} <= names, names
    for x in launches:
        for c in x.choice.configs:
            grid = x.grid(c.kwargs)
            assert grid[0] <= GRID_X_MAX and all(g <= GRID_YZ_MAX for g in grid[1:]), (x.name, grid)
            if x.name == "attn_varlen_bwd_key_tail_kernel":
                assert grid == (s * h,)
            elif x.name.startswith("attn_varlen"):
                block = c.kwargs["BLOCK_N" if x.name == "attn_varlen_bwd_kernel" else "BLOCK_M"]
                tiles = -(-(200 if x.name != "attn_varlen_fwd_tail_kernel" else 63) // block)
                assert grid == (tiles, h, s), (x.name, grid)


def test_heads_beyond_an_axis_are_refused_by_name():
    """H above 65,535 and S * H above the key tail's 2**31 - 1 programs: a ValueError that names the quantity
    and says what to do (meta tensors: nothing is allocated)."""
    with pytest.raises(ValueError, match=r"H = 70000 heads exceed .* grid axis 1 .* groups"):
        meta_launches(2, 70_000, t=2, max_seqlen=1, d=16)
    with pytest.raises(ValueError, match=r"S \* H = 65535 \* 65535 .* grid axis 0 .* split"):
        meta_launches(GRID_YZ_MAX, GRID_YZ_MAX, t=GRID_YZ_MAX, max_seqlen=1, d=16)


# ------------------------------------------------------------------------------ max_seqlen too small
# (lengths, max_seqlen, the same tokens cut into sequences of at most max_seqlen: an exact run whose other
# sequences sit where they are, on the same grid). "no-tails": the forward and key tails are not launched at
# max_seqlen = 64, so without the check tokens 64..69 of sequence 1 were never written; "tails": they are.
CASES = {"no-tails": ([5, 70, 20], 64, [5, 64, 6, 20]), "tails": ([5, 150, 20], 100, [5, 100, 50, 20])}


def run_launchers(q, k, v, do, cu, max_seqlen, kw, deterministic=True) -> tuple:
    params = VarlenAttentionParams(max_seqlen=max_seqlen, is_causal=True, deterministic=deterministic)
    o, lse = launch_forward(q, k, v, cu, kw["block_size"], kw["prefix_len"], params, POLICY)
    return (o, lse, *launch_backward(do, q, k, v, o, lse, cu, kw["block_size"], kw["prefix_len"], params, POLICY))


@pytest.mark.parametrize("deterministic", [True, False], ids=["determ", "atomic"])
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_max_seqlen_below_a_length_gives_nan_for_that_sequence(case, deterministic, device):
    """Sequence 1 (longer than max_seqlen): NaN in all its rows of o, lse, dq, dk, dv (o is torch.empty, so
    unwritten rows would hold garbage or finite leftovers); sequences 0 and 2: bit for bit the exact run's."""
    lengths, max_seqlen, cut = CASES[case]
    t = sum(lengths)
    torch.manual_seed(0)
    q, k, v, do = (torch.randn(t, 2, 16, device=device) for _ in range(4))
    kw = dict(block_size=torch.tensor([1, 3, 2], dtype=torch.int32, device=device),
              prefix_len=torch.tensor([2, 10, 0], dtype=torch.int32, device=device))
    kw_cut = dict(block_size=torch.tensor([1, 3, 3, 2], dtype=torch.int32, device=device),
                  prefix_len=torch.tensor([2, 10, 0, 0], dtype=torch.int32, device=device))
    got = run_launchers(q, k, v, do, cu_of(lengths, device), max_seqlen, kw, deterministic)
    exact = run_launchers(q, k, v, do, cu_of(cut, device), max_seqlen, kw_cut, deterministic)
    a, b = lengths[0], lengths[0] + lengths[1]
    for name, g, e in zip(("o", "lse", "dq", "dk", "dv"), got, exact):
        rows = (lambda x: x[:, a:b]) if name == "lse" else (lambda x: x[a:b])  # noqa: E731
        assert rows(g).isnan().all(), f"{name}: sequence 1 ({lengths[1]} > max_seqlen {max_seqlen}) is not all NaN"
        others = (lambda x: torch.cat([x[:, :a], x[:, b:]], 1)) if name == "lse" else (  # noqa: E731
            lambda x: torch.cat([x[:a], x[b:]]))
        assert torch.equal(others(g), others(e)), f"{name}: another sequence changed"
        assert others(g).isfinite().all()


def test_public_op_nan_sequence_others_equal_the_unbounded_call(device):
    """Through ``aimkern.attention_varlen`` and autograd: max_seqlen=100 for a 150-token sequence gives NaN in
    its output and gradient rows; the other sequences equal the max_seqlen=None call bit for bit (both calls
    run the interpreter's 64-row tiles)."""
    lengths = [5, 150, 20]
    cu, t = cu_of(lengths, device), sum(lengths)
    q, k, v = (torch.randn(t, 2, 16, device=device) for _ in range(3))
    do = torch.randn(t, 2, 16, device=device)
    outs = []
    for bound in (None, 100):
        xs = [x.clone().requires_grad_() for x in (q, k, v)]
        o = aimkern.attention_varlen(*xs, cu, max_seqlen=bound, is_causal=True, prefix_len=3, backend="triton")
        outs.append((o.detach(), *torch.autograd.grad(o, xs, do)))
    for name, exact, got in zip(("o", "dq", "dk", "dv"), *outs):
        assert got[5:155].isnan().all(), name
        assert exact[5:155].isfinite().all(), name
        assert torch.equal(torch.cat([got[:5], got[155:]]), torch.cat([exact[:5], exact[155:]])), name
