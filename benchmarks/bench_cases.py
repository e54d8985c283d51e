"""The op benchmarks' shapes and peers, keyed by op name (``BENCH[op]``), read by benchmarks/harness.py.

Each entry: "shapes" (the GPU run's), "quick" (gpu_check.sh's --quick, where given), "cpu" (the tiny shapes a
CPU run times its peers at) and "peers": a label -> a candidate name of the op's spec, "(candidate, params
changes)" or "backend=triton" (the public op on aimkern's path). Attention adds its heads and mask modes.
They live beside the benchmarks, not in the package (aimkern.specs holds only what an op needs to run).
"""

# Benchmark shapes and peers (benchmarks/attn_throughput.py through benchmarks/harness.py): the peer table's
# shapes of benchmarks/RESULTS.md (65,536 tokens per call). Peers map a label to a candidate, "(candidate,
# params changes)" or "backend=triton" (the public op on aimkern's path); SDPA's backwards add dQ with atomics, so
# they are timed as deterministic=False.
ATTENTION = {
    "heads": 12,
    "shapes": [dict(B=256, N=256, D=64), dict(B=256, N=196, D=64), dict(B=64, N=1024, D=64),
               dict(B=16, N=4096, D=64), dict(B=64, N=1024, D=128)],
    "quick": [dict(B=256, N=256, D=64), dict(B=256, N=196, D=64), dict(B=64, N=1024, D=128)],
    "cpu": [dict(B=1, N=64, D=16)],
    "masks": ["full", "causal", "prefix", "block"],
    "quick_masks": ["causal", "prefix", "block"],
    "peers": {"aimkern": "backend=triton", "aimkern split bwd": "triton-split",
              "SDPA cuDNN": ("sdpa-cudnn", {"deterministic": False}),
              "SDPA FA2": ("sdpa-flash", {"deterministic": False}),
              "SDPA mem-eff + mask": ("sdpa-efficient", {"deterministic": False})},
}

# Benchmark shapes and peers (benchmarks/cross_entropy.py through benchmarks/harness.py): AIM's 8192-way
# token head; peers map a label to a candidate, or "backend=triton" for the public op on aimkern's path.
CROSS_ENTROPY = {
    "shapes": [dict(T=t, E=e, V=8192) for t in (8192, 65536, 262144) for e in (768, 1024, 1536)],
    "quick": [dict(T=t, E=768, V=8192) for t in (8192, 65536)],
    "cpu": [dict(T=256, E=64, V=1024)],
    "peers": {"aimkern": "backend=triton", "eager fp32 logits": "reference", "chunked fp32 logits": "chunked",
              "torch fused": "torch-fused"},
}

# Benchmark shapes and peers (benchmarks/patch_embed.py through benchmarks/harness.py): ViT-B/16's stem;
# peers map a label to a candidate, or "backend=triton" for the public op forced onto aimkern's path.
PATCH_EMBED = {
    "shapes": [dict(batch=256, img=224, patch=16, dim=768)],
    "cpu": [dict(batch=2, img=32, patch=16, dim=64)],
    "peers": {"aimkern": "backend=triton", "nn.Conv2d+flatten+add": "conv2d", "unfold+nn.Linear+add": "unfold-linear"},
}

# Benchmark shapes and peers (benchmarks/pixel_loss.py through benchmarks/harness.py): AIM's setting at
# 224 px; peers map a label to a candidate, or "backend=triton" for the public op on aimkern's path.
PIXEL_LOSS = {
    "shapes": [dict(batch=256, img=224, patch=16)],
    "cpu": [dict(batch=2, img=32, patch=16)],
    "peers": {"aimkern": "backend=triton", "reference (eager)": "reference"},
}

BENCH = {"attention": ATTENTION, "linear_cross_entropy": CROSS_ENTROPY, "patch_embed": PATCH_EMBED,
         "next_patch_pixel_loss": PIXEL_LOSS}
