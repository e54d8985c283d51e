"""Varlen attention compiled on a CUDA GPU: bf16 (which Triton's interpreter cannot run), the head dims of
the dense op, and a pack at native-resolution sizes; the same float64 sequence-by-sequence reference."""
import pytest
import torch

from conftest import requires_cuda
from test_attention_varlen import BIG, check_pack

pytestmark = [pytest.mark.gpu, requires_cuda]


@pytest.mark.parametrize("d", [64, 80, 128, 256])
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_gpu_bf16_big_pack(d, is_causal):
    check_pack(BIG, torch.bfloat16, is_causal, h=2, d=d, device="cuda")


def test_gpu_fp16_native_sizes():
    """Grids of a 4:3, 3:4, 16:9 and square image at about 576 patches, one causal block a grid row."""
    grids = [(21, 28), (28, 21), (18, 32), (24, 24)]
    pack = dict(lengths=[h * w for h, w in grids], block=[w for _, w in grids], prefix=[0, 100, 300, 576])
    check_pack(pack, torch.float16, True, h=4, d=64, device="cuda")


def test_gpu_public_ops_bf16():
    """aimkern.attention_varlen and next_patch_pixel_loss_varlen on the Triton path in bf16 (compiled), held to
    the float64 reference as on the CPU."""
    import aimkern
    from tolerances import assert_close_relative

    lengths = [1, 7, 196, 65, 300]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    t = sum(lengths)
    kw = dict(is_causal=True, block_size=torch.tensor([1, 7, 14, 5, 20], device="cuda"),
              prefix_len=torch.tensor([0, 7, 98, 1, 150], device="cuda"))
    base = [torch.randn(t, 4, 64, device="cuda") for _ in range(3)]
    do = torch.randn(t, 4, 64, device="cuda")

    def run(dtype, backend):
        xs = [x.to(dtype).requires_grad_() for x in base]
        o = aimkern.attention_varlen(*xs, cu, max_seqlen=512, backend=backend, **kw)
        return (o, *torch.autograd.grad(o, xs, do.to(dtype)))

    got, ref, same = run(torch.bfloat16, "triton"), run(torch.float64, "reference"), run(torch.bfloat16, "reference")
    for name, g, s, r in zip(("o", "dq", "dk", "dv"), got, same, ref):
        assert_close_relative(g, s, r, name=name, atol=1e-2)
    patches = (torch.rand(t, 768, device="cuda") * 255).to(torch.uint8)
    pred = torch.randn(t, 768, device="cuda")
    losses = [aimkern.next_patch_pixel_loss_varlen(pred.to(dt), patches, cu, prefix_len=kw["prefix_len"], backend=b)
              for dt, b in ((torch.bfloat16, "triton"), (torch.float64, "reference"), (torch.bfloat16, "reference"))]
    assert_close_relative(losses[0], losses[2], losses[1], name="loss", atol=1e-3)


def test_gpu_torch_varlen_candidate_passes_verification():
    """torch's varlen_attn, where this torch has it, passes the dispatcher's check on a causal fp16 problem."""
    from aimkern.dispatch import measure
    from aimkern.ops.attention_varlen import VarlenAttentionParams
    from aimkern.specs import get_spec
    from aimkern.specs.opspec import Problem

    spec = get_spec("attention_varlen")
    problem = Problem("attention_varlen", "cuda:0", "float16", ((512, 4, 64),) * 3 + ((5,), None, None),
                      VarlenAttentionParams(is_causal=True, deterministic=False), (True, True, True, False, False,
                                                                                    False))
    reason = spec.candidate("torch-varlen").unsupported(problem)
    if reason is not None:
        pytest.skip(reason)
    assert measure.verify(spec, spec.candidate("torch-varlen"), problem) is None


def test_gpu_more_than_65535_sequence_head_pairs():
    """4,375 short images x 16 heads = 70,000 (sequence, head) pairs (the grid (tiles, H, S) launches it):
    the output held to the float64 reference, and every head's output and gradients bit for bit those of the
    same pack run one head at a time."""
    import aimkern
    from aimkern.reference.attention_varlen import attention_varlen_reference
    from tolerances import assert_close_relative

    lengths = [1 + i % 40 for i in range(4375)]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    t, h = sum(lengths), 16
    base = [torch.randn(t, h, 64, device="cuda") for _ in range(3)]
    do = torch.randn(t, h, 64, device="cuda", dtype=torch.float16)

    def run(xs, grad_out):
        xs = [x.half().requires_grad_() for x in xs]
        o = aimkern.attention_varlen(*xs, cu, max_seqlen=40, is_causal=True, prefix_len=3, backend="triton")
        return (o, *torch.autograd.grad(o, xs, grad_out))

    got = run(base, do)
    ref = attention_varlen_reference(*(x.half().double() for x in base), cu, is_causal=True, prefix_len=3)
    same = attention_varlen_reference(*(x.half() for x in base), cu, is_causal=True, prefix_len=3)
    assert_close_relative(got[0], same, ref, name="o", atol=2e-3)
    for head in (0, 7, 15):
        one = run([x[:, head:head + 1] for x in base], do[:, head:head + 1])
        for name, g, e in zip(("o", "dq", "dk", "dv"), got, one):
            assert torch.equal(g[:, head:head + 1], e), (name, head)


def test_gpu_max_seqlen_below_a_length_gives_nan():
    """A 300-token image under max_seqlen=256 (compiled tiles): NaN in all its rows of the output and the
    gradients; the other images bit for bit the max_seqlen=None call's."""
    import aimkern

    lengths = [5, 300, 20, 256]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    t = sum(lengths)
    base = [torch.randn(t, 4, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
    do = torch.randn(t, 4, 64, device="cuda", dtype=torch.bfloat16)
    outs = []
    for bound in (None, 256):
        xs = [x.clone().requires_grad_() for x in base]
        o = aimkern.attention_varlen(*xs, cu, max_seqlen=bound, is_causal=True, prefix_len=7, backend="triton")
        outs.append((o.detach(), *torch.autograd.grad(o, xs, do)))
    for name, exact, got in zip(("o", "dq", "dk", "dv"), *outs):
        assert got[5:305].isnan().all() and exact[5:305].isfinite().all(), name
        assert torch.equal(torch.cat([got[:5], got[305:]]), torch.cat([exact[:5], exact[305:]])), name
