"""The problems the compile gate (benchmarks/kernel_report.py) drives the real launchers on, per family.

Each family's function maps a subset to (label, thunk) pairs, where a thunk calls the op module's public
launchers (``aimkern.ops.<op>.launch_*``) on meta tensors (never run: the gate records the launches with
``observe(dry_run=True)``). Together they reach every entry of every config table: each dtype, the head dims
and sequence bands of the attention tables, every mask variant, both attention backward paths, bias / label
smoothing, big (autotuned) and small (fixed) GEMMs. ``subset="gpu-run"`` keeps what benchmarks/gpu_check.sh
meets (16-bit, benchmark shapes). They live here, beside the gate, not in the package: nothing in aimkern
needs them to run an op.
"""
from __future__ import annotations

import torch

from aimkern.ops import LaunchPolicy
from aimkern.ops import attention as attn
from aimkern.ops import attention_varlen as attn_varlen
from aimkern.ops import cross_entropy as ce
from aimkern.ops import patch_embed as pe
from aimkern.ops import pixel_loss as pl
from aimkern.ops import pixel_loss_varlen as plv

GATE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def gate_dtypes(subset: str) -> tuple:
    """The dtypes of the compile gate's problems: "gpu-run" keeps the 16-bit ones benchmarks/gpu_check.sh runs."""
    return ("bf16", "fp16") if subset == "gpu-run" else ("bf16", "fp16", "fp32")


def meta(*shape, dtype: torch.dtype) -> torch.Tensor:
    """A meta tensor: the gate's launchers see shapes, dtypes and strides, and launch nothing."""
    return torch.empty(*shape, device="meta", dtype=dtype)


# ------------------------------------------------------------------------------------------- attention
def attention_problems(subset: str):
    """(label, thunk) pairs driving the attention launchers on meta tensors, packed (B, N, 3, H, D) qkv as a
    ViT block has (q, k, v strided views, the gradient written into one packed buffer).

    Every table entry is reached by bf16 with the most general mask (causal + prefix) at D = 64, 80, 128,
    256 and N in both bands; the other mask variants at D = 64, fp16 and fp32 at D = 64 and 128 (the
    compile budget of CI: a full product would be ~5x the compiles for near-identical code)."""
    masks = {"full": (False, None), "causal": (True, None), "prefix": (True, "prefix")}
    qdev = torch.device("meta")
    for dname in gate_dtypes(subset):
        dtype = GATE_DTYPES[dname]
        dims = (64, 80, 128, 256) if dname == "bf16" and subset != "gpu-run" else (64, 128)
        for d in dims:
            for n in (196, 256, 1024):
                for mname, (causal, prefix) in masks.items():
                    if mname != "prefix" and (dname != "bf16" or d != 64):
                        continue
                    paths = ["split"]
                    if attn.fused_backward_fits(d, dtype, n, qdev):
                        paths.append("fused")
                    for path in paths:
                        def run(dtype=dtype, d=d, n=n, causal=causal, prefix=prefix, path=path):
                            _gate_run(2, n, 4, d, dtype, prefix, causal, 4 if causal else 1, d**-0.5, path)

                        yield f"attention {dname} D={d} N={n} {mname} {path}", run
    # N = 224 = 3 x 64 + 32: the tiled backward's 32-key tail tile (196 reaches the 16-key one).
    yield "attention bf16 D=64 N=224 prefix split", lambda: _gate_run(
        2, 224, 4, 64, torch.bfloat16, "prefix", True, 1, 0.125, "split")
    # The fused backward at every on-chip head size it accepts (one to three 64-row key tiles), bf16 causal +
    # prefix; the GPU run meets it at three (the benchmark shapes, 196 and 256, take the tiled backward).
    for n in ((192,) if subset == "gpu-run" else (16, 64, 128, 192)):
        def run_small(n=n):
            if attn.fused_backward_fits(64, torch.bfloat16, n, qdev):  # (no launch where it does not fit)
                _gate_run(2, n, 4, 64, torch.bfloat16, "prefix", True, 1, 0.125, "fused")

        yield f"attention bf16 D=64 N={n} prefix fused", run_small


def _gate_run(b, n, h, d, dtype, prefix, causal, block_size, scale, path) -> None:
    """Forward + backward of one packed-qkv problem through the public launchers."""
    qkv = meta(b, n, 3, h, d, dtype=dtype)
    q, k, v = attn.unpack(qkv)
    pre = meta(b, dtype=torch.int32) if prefix else None
    params = attn.AttentionParams(is_causal=causal, block_size=block_size, scale=scale)
    policy = LaunchPolicy(attention_backward=path)
    o, lse = attn.launch_forward(q, k, v, pre, params, policy)
    attn.launch_backward(o, q, k, v, o, lse, pre, params, policy, out=attn.unpack(meta(b, n, 3, h, d, dtype=dtype)))


# ------------------------------------------------------------------------------------ varlen attention
def attention_varlen_problems(subset: str):
    """(label, thunk) pairs driving the varlen attention launchers on meta tensors: every dtype, D = 64, 80,
    128, 256 (fp32: 64, 128), every mask, ordered and unordered dQ ("gpu-run": 16-bit at D = 64 and 128); a pack of T = 2048
    tokens in 4 sequences of at most 1024, H = 4, q, k, v strided views of a packed (T, 3, H, D) qkv.

    The tiled backward (attn_varlen_bwd_kernel) passed the gate on sm_90a and sm_80 on 2026-12-07 after the
    merge with the dense issue-26 fixes (with the tables of kernels/attention_varlen.py: the two spilling
    16-bit fallbacks it met are out); the other varlen kernels were gated by the session that wrote them.
    kernels/attention_varlen.py records where that took another tile than the dense tables'."""
    masks = {"full": (False, False), "causal": (True, False), "prefix": (True, True)}
    for dname in gate_dtypes(subset):
        dtype = GATE_DTYPES[dname]
        # fp32 at D = 64 and 128, as the dense gate: the fp32 D = 256 tiles (the dense tables' own) are over
        # their shared-memory estimate on sm_80 (forward) and sm_90 (tiled backward).
        for d in ((64, 128) if subset == "gpu-run" or dname == "fp32" else (64, 80, 128, 256)):
            for mname, (causal, prefix) in masks.items():
                for det in (True, False):
                    def run(dtype=dtype, d=d, causal=causal, prefix=prefix, det=det):
                        _varlen_run(dtype, d, causal, prefix, det)

                    yield f"attention_varlen {dname} D={d} {mname} {'ordered' if det else 'unordered'}", run


def _varlen_run(dtype, d: int, is_causal: bool, prefix: bool, deterministic: bool, t: int = 2048, h: int = 4,
                s: int = 4, max_seqlen: int = 1024) -> None:
    """Forward + backward launches of one varlen problem on meta tensors."""
    qkv = meta(t, 3, h, d, dtype=dtype)
    q, k, v = attn_varlen.unpack(qkv)
    cu = meta(s + 1, dtype=torch.int32)
    block = meta(s, dtype=torch.int32)
    pre = meta(s, dtype=torch.int32) if prefix else None
    params = attn_varlen.VarlenAttentionParams(max_seqlen=max_seqlen, is_causal=is_causal, scale=d**-0.5,
                                               deterministic=deterministic)
    policy = LaunchPolicy(autotune=False)
    o, lse = attn_varlen.launch_forward(q, k, v, cu, block, pre, params, policy)
    attn_varlen.launch_backward(o, q, k, v, o, lse, cu, block, pre, params, policy,
                                out=attn_varlen.unpack(meta(t, 3, h, d, dtype=dtype)))


# ------------------------------------------------------------------------------------ cross-entropy
def cross_entropy_problems(subset: str):
    """(label, thunk) pairs driving the cross-entropy launchers on meta tensors: a ViT-scale head (the
    autotuned big tiles) and a small one, each dtype, bias and label smoothing on / off; forward, backward
    and the forward-with-gradient path (logits stored, dlogits in place)."""
    shapes = {"65536x768 V=8192": (65536, 8192, 768), "small": (300, 512, 80)}
    for dname in gate_dtypes(subset):
        dtype = GATE_DTYPES[dname]
        for sname, (t, v, e) in shapes.items():
            for bias in (True, False) if dname == "bf16" else (True,):
                for smoothing in (0.0, 0.1) if dname == "bf16" else (0.1,):
                    if subset == "gpu-run" and smoothing:
                        continue

                    def run(dtype=dtype, t=t, v=v, e=e, bias=bias, smoothing=smoothing):
                        x, w = meta(t, e, dtype=dtype), meta(v, e, dtype=dtype)
                        b = meta(v, dtype=dtype) if bias else None
                        tgt = meta(t, dtype=torch.int64)
                        params = ce.CrossEntropyParams("mean", -100, smoothing, 1e-4)
                        policy = LaunchPolicy()
                        lse, _, _ = ce.launch_forward(x, w, b, tgt, params, policy)
                        grad = meta(1, dtype=torch.float32).expand(t)
                        ce.launch_backward(grad, x, w, b, tgt, lse, params, True, True, bias, policy)
                        _, dx, _, _, scale = ce.launch_forward_with_grad(x, w, b, tgt, params, True, True, bias,
                                                                         policy)
                        ce.launch_scale(dx, meta(1, dtype=torch.float32).reshape(()), scale, dtype, policy)

                    yield f"cross_entropy {dname} {sname} bias={bias} smoothing={smoothing}", run


# -------------------------------------------------------------------------------------- patch embed
def patch_embed_problems(subset: str):
    """(label, thunk) pairs driving the patch-embed launchers on meta tensors: ViT-B/16 at batch 256 (the
    autotuned big GEMMs) and a small problem (the fixed small tiles), each dtype, with and without bias, and
    every subset of the parameter gradients; and uint8 images normalized in the kernels (forward and dW)."""
    shapes = {"vit-b16 x256": (256, 224, 16, 768), "small": (2, 32, 4, 40)}
    for dname in gate_dtypes(subset):
        dtype = GATE_DTYPES[dname]
        for sname, (b, img, p, e) in shapes.items():
            for bias in (True, False) if dname == "bf16" else (True,):
                def run(dtype=dtype, b=b, img=img, p=p, e=e, bias=bias):
                    images = meta(b, 3, img, img, dtype=dtype)
                    weight = meta(e, 3, p, p, dtype=dtype)
                    n = (img // p) ** 2
                    policy = LaunchPolicy()
                    out = pe.launch_forward(images, weight, meta(e, dtype=dtype) if bias else None,
                                            meta(n, e, dtype=dtype), policy)
                    pe.launch_backward_params(out, images, weight, True, True, policy)
                    pe.launch_backward_params(out, images, weight, True, False, policy)
                    pe.launch_backward_params(out, images, weight, False, True, policy)
                    pe.launch_backward_images(out, weight, images, policy)

                yield f"patch_embed {dname} {sname} bias={bias}", run

            def run_uint8(dtype=dtype, b=b, img=img, p=p, e=e):
                # uint8 images normalized in the kernels (the packed model's call): forward and dW, no dX
                images, weight = meta(b, 3, img, img, dtype=torch.uint8), meta(e, 3, p, p, dtype=dtype)
                params = pe.PatchEmbedParams(input_scale=(0.017, 0.0175, 0.0174), input_shift=(-2.1, -2.0, -1.8))
                policy = LaunchPolicy()
                out = pe.launch_forward(images, weight, meta(e, dtype=dtype), meta((img // p) ** 2, e, dtype=dtype),
                                        policy, params)
                pe.launch_backward_params(out, images, weight, True, True, policy, params)

            yield f"patch_embed {dname} {sname} images=uint8", run_uint8


# --------------------------------------------------------------------------------------- pixel loss
def pixel_loss_problems(subset: str):
    """(label, thunk) pairs driving the pixel-loss launchers on meta tensors: AIM's 224 px / P = 16 batch of
    64, each dtype, with and without a prefix and norm_pix; forward and backward."""
    for dname in gate_dtypes(subset):
        dtype = GATE_DTYPES[dname]
        for prefix in (True, False) if dname == "bf16" else (True,):
            for norm_pix in (True, False) if dname == "bf16" else (True,):
                def run(dtype=dtype, prefix=prefix, norm_pix=norm_pix):
                    pred, images = meta(64, 196, 768, dtype=dtype), meta(64, 3, 224, 224, dtype=dtype)
                    pre = meta(64, dtype=torch.int32) if prefix else None
                    params = pl.PixelLossParams(patch_size=16, norm_pix=norm_pix)
                    policy = LaunchPolicy()
                    pl.launch_forward(pred, images, pre, params, policy)
                    pl.launch_backward(pred, images, pre, meta(1, dtype=torch.float32), params, policy)

                yield f"pixel_loss {dname} prefix={prefix} norm_pix={norm_pix}", run


def pixel_loss_varlen_problems(subset: str):
    """(label, thunk) pairs driving the packed pixel-loss launchers on meta tensors: 65,536 tokens of P = 16
    RGB patches in 100 images, uint8 patches (as pack_images keeps them; raw, and normalized per channel as
    the packed model passes them) and float ones in pred's dtype, with and without a prefix and norm_pix;
    forward and backward."""
    scale, shift = (0.02,) * 3, (-2.0,) * 3  # any affine: its values are read at run time, not compiled in
    for dname in gate_dtypes(subset):
        dtype = GATE_DTYPES[dname]
        # uint8 patches raw, and normalized per channel in the kernel (the packed model's targets)
        for patch_dtype, affine in ((torch.uint8, False), (torch.uint8, True), (dtype, False)):
            for prefix in (True, False) if dname == "bf16" else (True,):
                for norm_pix in (True, False) if dname == "bf16" else (True,):
                    def run(dtype=dtype, patch_dtype=patch_dtype, affine=affine, prefix=prefix, norm_pix=norm_pix):
                        pred, patches = meta(65536, 768, dtype=dtype), meta(65536, 768, dtype=patch_dtype)
                        cu = meta(101, dtype=torch.int32)
                        pre = meta(100, dtype=torch.int32) if prefix else None
                        params = plv.PixelLossVarlenParams(norm_pix=norm_pix, input_scale=scale if affine else None,
                                                           input_shift=shift if affine else None)
                        policy = LaunchPolicy()
                        plv.launch_forward(pred, patches, cu, pre, params, policy)
                        plv.launch_backward(pred, patches, cu, pre, meta(1, dtype=torch.float32), params, policy)

                    pname = ("uint8 normalized" if affine else "uint8") if patch_dtype == torch.uint8 else dname
                    yield f"pixel_loss_varlen {dname} patches={pname} prefix={prefix} norm_pix={norm_pix}", run


# family (the kernel module's name, kernel_report.py's --family) -> subset -> (label, thunk) pairs
FAMILIES = {"attention": attention_problems, "attention_varlen": attention_varlen_problems,
            "cross_entropy": cross_entropy_problems,
            "patch_embed": patch_embed_problems, "pixel_loss": pixel_loss_problems,
            "pixel_loss_varlen": pixel_loss_varlen_problems}
