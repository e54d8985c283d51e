"""The problems the compile gate (benchmarks/kernel_report.py) drives the real launchers on, per family.

Each family yields (label, thunk) pairs; a thunk calls the launchers of aimkern/ops/*.py on meta tensors
(never run: the gate records the launches with ``observe(dry_run=True)``). Together they reach every entry
of every config table: each dtype, the head dims and sequence bands of the attention tables, every mask
variant, both attention backward paths, bias / label smoothing, big (autotuned) and small (fixed) GEMMs.
``subset="gpu-run"`` keeps what benchmarks/gpu_check.sh meets (16-bit, benchmark shapes).
"""
from __future__ import annotations

import importlib

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _meta(*shape, dtype):
    return torch.empty(*shape, device="meta", dtype=dtype)


def attention_problems(subset: str):
    """(label, thunk) pairs driving the attention launchers, packed (B, N, 3, H, D) qkv as a ViT block has."""
    op = importlib.import_module("aimkern.ops.attention")  # the module (aimkern.ops.attention is the function)

    # Every table entry is reached by bf16 with the most general mask (causal + prefix) at D = 64, 80, 128,
    # 256 and N in both bands; the other mask variants at D = 64, fp16 and fp32 at D = 64 and 128 (the
    # compile budget of CI: a full product would be ~5x the compiles for near-identical code).
    dtypes = ("bf16", "fp16") if subset == "gpu-run" else ("bf16", "fp16", "fp32")
    masks = {"full": (False, None), "causal": (True, None), "prefix": (True, "prefix")}
    qdev = torch.device("meta")
    for dname in dtypes:
        dtype = DTYPES[dname]
        dims = (64, 80, 128, 256) if dname == "bf16" and subset != "gpu-run" else (64, 128)
        for d in dims:
            for n in (196, 256, 1024):
                for mname, (causal, prefix) in masks.items():
                    if mname != "prefix" and (dname != "bf16" or d != 64):
                        continue
                    paths = ["split"]
                    if op._kernels().fused_backward_fits(d, dtype == torch.float32, n, op.table_arch(qdev)):
                        paths.append("fused")
                    for path in paths:
                        def run(dtype=dtype, d=d, n=n, causal=causal, prefix=prefix, path=path):
                            b, h = 2, 4
                            qkv = _meta(b, n, 3, h, d, dtype=dtype)
                            q, k, v = op._unpack(qkv)
                            pre = _meta(b, dtype=torch.int32) if prefix else None
                            policy = op.LaunchPolicy()
                            o, lse = op._launch_forward(q, k, v, pre, causal, 4 if causal else 1, d**-0.5, policy)
                            dqkv = _meta(b, n, 3, h, d, dtype=dtype)
                            op._launch_backward(o, q, k, v, o, lse, pre, causal, 4 if causal else 1, d**-0.5,
                                                policy, path, out=op._unpack(dqkv))

                        yield f"attention {dname} D={d} N={n} {mname} {path}", run
    # N = 224 = 3 x 64 + 32: the tiled backward's 32-key tail tile (196 reaches the 16-key one).
    def run_tail32():
        qkv = _meta(2, 224, 3, 4, 64, dtype=torch.bfloat16)
        q, k, v = op._unpack(qkv)
        pre = _meta(2, dtype=torch.int32)
        o, lse = op._launch_forward(q, k, v, pre, True, 1, 0.125, op.LaunchPolicy())
        op._launch_backward(o, q, k, v, o, lse, pre, True, 1, 0.125, op.LaunchPolicy(), "split",
                            out=op._unpack(_meta(2, 224, 3, 4, 64, dtype=torch.bfloat16)))

    yield "attention bf16 D=64 N=224 prefix split", run_tail32
    # The fused backward at every on-chip head size it accepts (one to three 64-row key tiles), bf16 causal +
    # prefix; the GPU run meets it at three (the benchmark shapes, 196 and 256, take the tiled backward).
    for n in ((192,) if subset == "gpu-run" else (16, 64, 128, 192)):
        def run_small(n=n):
            if not op._kernels().fused_backward_fits(64, False, n, op.table_arch(qdev)):
                return
            qkv = _meta(2, n, 3, 4, 64, dtype=torch.bfloat16)
            q, k, v = op._unpack(qkv)
            pre = _meta(2, dtype=torch.int32)
            o, lse = op._launch_forward(q, k, v, pre, True, 1, 0.125, op.LaunchPolicy())
            op._launch_backward(o, q, k, v, o, lse, pre, True, 1, 0.125, op.LaunchPolicy(), "fused",
                                out=op._unpack(_meta(2, n, 3, 4, 64, dtype=torch.bfloat16)))

        yield f"attention bf16 D=64 N={n} prefix fused", run_small


def patch_embed_problems(subset: str):
    op = importlib.import_module("aimkern.ops.patch_embed")  # the module (aimkern.ops.patch_embed is the function)

    dtypes = ("bf16", "fp16") if subset == "gpu-run" else ("bf16", "fp16", "fp32")
    shapes = {"vit-b16 x256": (256, 224, 16, 768), "small": (2, 32, 4, 40)}
    for dname in dtypes:
        dtype = DTYPES[dname]
        for sname, (b, img, p, e) in shapes.items():
            for bias in (True, False) if dname == "bf16" else (True,):
                def run(dtype=dtype, b=b, img=img, p=p, e=e, bias=bias):
                    images = _meta(b, 3, img, img, dtype=dtype)
                    weight = _meta(e, 3, p, p, dtype=dtype)
                    n = (img // p) ** 2
                    policy = op.LaunchPolicy()
                    out = op._launch_forward(images, weight, _meta(e, dtype=dtype) if bias else None,
                                             _meta(n, e, dtype=dtype), policy)
                    op._launch_backward_params(out, images, weight, True, True, policy)
                    op._launch_backward_params(out, images, weight, True, False, policy)
                    op._launch_backward_params(out, images, weight, False, True, policy)
                    op._launch_backward_images(out, weight, images, policy)

                yield f"patch_embed {dname} {sname} bias={bias}", run


def cross_entropy_problems(subset: str):
    op = importlib.import_module("aimkern.ops.cross_entropy")  # the module (aimkern.ops.cross_entropy is the function)

    dtypes = ("bf16", "fp16") if subset == "gpu-run" else ("bf16", "fp16", "fp32")
    shapes = {"65536x768 V=8192": (65536, 8192, 768), "small": (300, 512, 80)}
    for dname in dtypes:
        dtype = DTYPES[dname]
        for sname, (t, v, e) in shapes.items():
            for bias in (True, False) if dname == "bf16" else (True,):
                for smoothing in (0.0, 0.1) if dname == "bf16" else (0.1,):
                    if subset == "gpu-run" and smoothing:
                        continue

                    def run(dtype=dtype, t=t, v=v, e=e, bias=bias, smoothing=smoothing):
                        x, w = _meta(t, e, dtype=dtype), _meta(v, e, dtype=dtype)
                        b = _meta(v, dtype=dtype) if bias else None
                        tgt = _meta(t, dtype=torch.int64)
                        params = op.CrossEntropyParams("mean", -100, smoothing, 1e-4)
                        policy = op.LaunchPolicy()
                        lse, _, _ = op._launch_forward(x, w, b, tgt, params, policy)
                        grad = _meta(1, dtype=torch.float32).expand(t)
                        op._launch_backward(grad, x, w, b, tgt, lse, params, True, True, bias, policy)
                        # the forward-with-gradient path (mean / sum with grad): logits stored, dlogits in place
                        op._launch_forward_with_grad(x, w, b, tgt, params, True, True, bias, policy)

                    yield f"cross_entropy {dname} {sname} bias={bias} smoothing={smoothing}", run


def pixel_loss_problems(subset: str):
    op = importlib.import_module("aimkern.ops.pixel_loss")  # the module (aimkern.ops.pixel_loss is the function)

    dtypes = ("bf16", "fp16") if subset == "gpu-run" else ("bf16", "fp16", "fp32")
    for dname in dtypes:
        dtype = DTYPES[dname]
        for prefix in (True, False) if dname == "bf16" else (True,):
            for norm_pix in (True, False) if dname == "bf16" else (True,):
                def run(dtype=dtype, prefix=prefix, norm_pix=norm_pix):
                    pred, images = _meta(64, 196, 768, dtype=dtype), _meta(64, 3, 224, 224, dtype=dtype)
                    pre = _meta(64, dtype=torch.int32) if prefix else None
                    params = op.PixelLossParams(patch_size=16, norm_pix=norm_pix)
                    op._launch(pred, images, pre, None, params, backward=False)
                    op._launch(pred, images, pre, _meta(1, dtype=torch.float32), params, backward=True)

                yield f"pixel_loss {dname} prefix={prefix} norm_pix={norm_pix}", run


FAMILIES = {
    "attention": attention_problems,
    "patch_embed": patch_embed_problems,
    "cross_entropy": cross_entropy_problems,
    "pixel_loss": pixel_loss_problems,
}
