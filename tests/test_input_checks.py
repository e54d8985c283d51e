"""Bad inputs get a ValueError/TypeError that names the argument, on every op and backend path."""
import pytest
import torch

import aimkern

# ------------------------------------------------------------------------------------------ backend


def test_unknown_backend_is_rejected():
    q = torch.randn(1, 1, 4, 16)
    with pytest.raises(ValueError, match="backend"):
        aimkern.attention(q, q, q, backend="cuda")


def test_triton_on_cpu_without_interpreter_explains(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q = torch.randn(1, 1, 4, 16)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        aimkern.attention(q, q, q, backend="triton")


# ---------------------------------------------------------------------------------------- attention


def _qkv(shape=(2, 2, 8, 16), dtype=torch.float32):
    return [torch.randn(*shape, dtype=dtype) for _ in range(3)]


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(q=torch.randn(2, 8, 16)), ValueError, "q must have 4 dimensions"),
        (dict(k=torch.randn(2, 2, 9, 16)), ValueError, "same shape"),
        (dict(v=torch.randn(2, 2, 8, 16, dtype=torch.float64)), TypeError, "one dtype"),
        (dict(q=torch.randn(2, 2, 8, 12), k=torch.randn(2, 2, 8, 12), v=torch.randn(2, 2, 8, 12)), ValueError, "head dim"),
        (dict(q=torch.randn(2, 2, 8, 264), k=torch.randn(2, 2, 8, 264), v=torch.randn(2, 2, 8, 264)), ValueError, "head dim"),
        (dict(q=torch.randn(2, 2, 0, 16), k=torch.randn(2, 2, 0, 16), v=torch.randn(2, 2, 0, 16)), ValueError, "N must be"),
        (dict(block_size=0), ValueError, "block_size"),
        (dict(prefix_len=9), ValueError, "prefix_len"),
        (dict(prefix_len=-1), ValueError, "prefix_len"),
        (dict(prefix_len=torch.tensor([1, 2, 3])), ValueError, "prefix_len must have shape"),
        (dict(prefix_len=torch.tensor([1, 9])), ValueError, "prefix_len values"),
        (dict(prefix_len=torch.tensor([1.0, 2.0])), TypeError, "integer"),
        (dict(prefix_len="3"), TypeError, "prefix_len"),
        (dict(q=[1.0]), TypeError, "q must be a torch.Tensor"),
    ],
)
def test_attention_bad_inputs(kwargs, exc, match):
    q, k, v = _qkv()
    args = dict(q=q, k=k, v=v)
    for name in ("q", "k", "v"):
        if name in kwargs:
            args[name] = kwargs.pop(name)
    with pytest.raises(exc, match=match):
        aimkern.attention(args["q"], args["k"], args["v"], is_causal=True, **kwargs)


def test_attention_rejects_integer_and_float64_on_triton(device):
    q = torch.randint(0, 3, (1, 1, 4, 16), device=device)
    with pytest.raises(TypeError, match="q must be one of"):
        aimkern.attention(q, q, q)
    q = torch.randn(1, 1, 4, 16, dtype=torch.float64, device=device)
    with pytest.raises(TypeError, match="q must be one of"):
        aimkern.attention(q, q, q, backend="triton")


# -------------------------------------------------------------------------------------- patch embed


@pytest.mark.parametrize(
    "images,weight,bias,pos,match",
    [
        (torch.randn(2, 3, 8, 8), torch.randn(5, 3, 4, 4), torch.randn(4), None, "bias must have shape"),
        (torch.randn(2, 3, 8, 9), torch.randn(5, 3, 4, 4), None, None, "multiples of P"),
        (torch.randn(2, 2, 8, 8), torch.randn(5, 3, 4, 4), None, None, "input channels"),
        (torch.randn(2, 3, 8, 8), torch.randn(5, 3, 4, 2), None, None, "square"),
        (torch.randn(2, 3, 8, 8), torch.randn(5, 3, 4, 4), None, torch.randn(3, 5), "pos_embed must have shape"),
        (torch.randn(3, 8, 8), torch.randn(5, 3, 4, 4), None, None, "images must have 4 dimensions"),
    ],
)
def test_patch_embed_bad_inputs(images, weight, bias, pos, match):
    with pytest.raises(ValueError, match=match):
        aimkern.patch_embed(images, weight, bias, pos)


# ------------------------------------------------------------------------------------ cross-entropy


@pytest.mark.parametrize(
    "x,w,t,kwargs,exc,match",
    [
        (torch.randn(4, 8), torch.randn(5, 7), torch.zeros(4, dtype=torch.long), {}, ValueError, "linear_weight must be"),
        (torch.randn(4, 8), torch.randn(5, 8), torch.zeros(3, dtype=torch.long), {}, ValueError, "target must have shape"),
        (torch.randn(4, 8), torch.randn(5, 8), torch.zeros(4), {}, TypeError, "integer"),
        (torch.randn(4, 8), torch.randn(5, 8), torch.tensor([0, 1, 5, 2]), {}, ValueError, "target values"),
        (torch.randn(4, 8), torch.randn(5, 8), torch.tensor([0, 1, -3, 2]), {}, ValueError, "target values"),
        (torch.randn(4, 8), torch.randn(5, 8), torch.zeros(4, dtype=torch.long), {"reduction": "avg"}, ValueError, "reduction"),
        (torch.randn(4, 8), torch.randn(5, 8), torch.zeros(4, dtype=torch.long), {"label_smoothing": 1.5}, ValueError, "label_smoothing"),
        (torch.randn(4, 8), torch.randn(5, 8), torch.zeros(4, dtype=torch.long), {"z_loss": -1.0}, ValueError, "z_loss"),
        (torch.randn(4, 8), torch.randn(5, 8), torch.zeros(4, dtype=torch.long), {"linear_bias": torch.randn(4)}, ValueError, "linear_bias"),
    ],
)
def test_linear_cross_entropy_bad_inputs(x, w, t, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        aimkern.linear_cross_entropy(x, w, t, **kwargs)


def test_linear_cross_entropy_ignore_index_is_not_out_of_range():
    x, w = torch.randn(4, 8), torch.randn(5, 8)
    t = torch.tensor([0, -100, 4, -100])
    assert torch.isfinite(aimkern.linear_cross_entropy(x, w, t))


# --------------------------------------------------------------------------------------- pixel loss


@pytest.mark.parametrize(
    "pred,images,kwargs,match",
    [
        (torch.randn(2, 4, 47), torch.randn(2, 3, 8, 8), {}, "pred must have shape"),
        (torch.randn(2, 4, 48), torch.randn(2, 3, 8, 9), {}, "multiples of patch_size"),
        (torch.randn(2, 4, 48), torch.randn(2, 3, 8, 8), {"offset": -1}, "offset"),
        (torch.randn(2, 4, 48), torch.randn(2, 3, 8, 8), {"prefix_len": 5}, "prefix_len"),
        (torch.randn(2, 4, 48), torch.randn(2, 3, 8, 8), {"patch_size": 0}, "patch_size"),
        (torch.randn(2, 4, 48), torch.randn(2, 3, 8, 8), {"eps": -1.0}, "eps"),
    ],
)
def test_pixel_loss_bad_inputs(pred, images, kwargs, match):
    kwargs.setdefault("patch_size", 4)
    with pytest.raises(ValueError, match=match):
        aimkern.next_patch_pixel_loss(pred, images, **kwargs)


def test_device_mismatch_is_named():
    q = torch.randn(1, 1, 4, 16)
    with pytest.raises(ValueError, match="k is on meta"):
        aimkern.attention(q, q.to("meta"), q)
    with pytest.raises(ValueError, match="pos_embed is on meta"):
        aimkern.patch_embed(torch.randn(1, 3, 4, 4), torch.randn(5, 3, 2, 2), None, torch.randn(4, 5, device="meta"))


def test_prefix_len_checked_again_after_in_place_change():
    q = torch.randn(2, 1, 8, 16)
    pl = torch.tensor([2, 3])
    aimkern.attention(q, q, q, is_causal=True, prefix_len=pl)
    aimkern.attention(q, q, q, is_causal=True, prefix_len=pl)  # same tensor: validated once, still fine
    pl[1] = 9  # out of [0, 8] now
    with pytest.raises(ValueError, match="prefix_len values"):
        aimkern.attention(q, q, q, is_causal=True, prefix_len=pl)
    with pytest.raises(ValueError, match="prefix_len values"):  # a longer N was fine, a shorter one is checked
        aimkern.attention(q[:, :, :4], q[:, :, :4], q[:, :, :4], is_causal=True, prefix_len=torch.tensor([2, 5]))


def test_gemm_ops_follow_autocast_like_f_linear():
    # Custom ops are invisible to autocast: the GEMM-like ops apply its cast themselves (CPU autocast here).
    images, weight = torch.randn(2, 3, 8, 8), torch.randn(16, 3, 4, 4)
    q = torch.randn(1, 2, 5, 16)
    x, w, t = torch.randn(6, 16), torch.randn(7, 16), torch.randint(0, 7, (6,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert aimkern.patch_embed(images, weight).dtype == torch.bfloat16
        assert aimkern.attention(q, q, q, is_causal=True).dtype == torch.bfloat16
        loss = aimkern.linear_cross_entropy(x, w, t)
        assert loss.dtype == torch.float32  # logits and loss in fp32, as F.cross_entropy under autocast
        want = torch.nn.functional.cross_entropy(torch.nn.functional.linear(x, w).float(), t)
    torch.testing.assert_close(loss, want)
    q64 = q.double()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # float64 is left alone, as autocast does
        assert aimkern.attention(q64, q64, q64).dtype == torch.float64
