"""The whole pretraining step: aimkern's CausalViT against the same architecture in plain PyTorch.

    python benchmarks/pretrain_throughput.py [--quick] [--models vit-b16,aim-600m] [--variants ...]

Every variant is timed through the trainer's own step, ``aimkern.train.train_step`` (built by
``aimkern.train.build_run``): AIM's prefix from the model's ``sample_prefix_len``, bf16 autocast, forward,
backward, global-norm clipping at 1.0, AdamW (0.9, 0.95; fused on CUDA; weight decay 0.05 on matrices) and the
warmup + cosine schedule, as ``python -m aimkern.train`` runs it; only the model differs. Its figures are the
trainer's figures.

Workloads (fp32 master weights):
- vit-b16, batch 256, 224 px (N = 196), token-causal attention, linear pixel head.
- aim-600m, batch 64, 224 px (N = 256), AIM's prefix-causal attention (a prefix per image), its 12-block MLP
  pixel head at width 2048.

Variants, all in one run: aimkern eager and under torch.compile; the plain-PyTorch twin (nn.Conv2d patch
embedding, SDPA with is_causal or with a dense (B, 1, N, N) prefix mask, the reference pixel loss) eager and
compiled; and, for the prefix mask, the plain model compiled with FlexAttention and a prefix block mask
(built every step, as training must). Reported: images/s, model TFLOP/s (matmul FLOPs of forward +
backward, 3x the forward's; attention counts only the visible (i, j) pairs), MFU against the bf16 matmul
ceiling measured in the same run, peak memory (parameters, optimizer state and activations) and the time of
the first (compiling) step. Table on stdout, JSON and PNG under $AIMKERN_BENCH_OUT or benchmarks/out/.

Without CUDA nothing is timed: a small CPU check shows that the plain twin computes the same loss and
gradients as aimkern's CausalViT (reference ops, and Triton's interpreter where the kernels have landed),
that the trainer's step gives both the same loss and gradient norm, and that the FLOP formula agrees with
torch's FLOP counter.
"""
from __future__ import annotations

import argparse
import gc
import itertools
import os
import sys
import time
import warnings
from typing import Callable, Optional

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before aimkern's kernels are defined

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from common import has_cuda, no_cuda_notice, time_ms, write_report  # noqa: E402

from aimkern import CausalViT, ViTConfig  # noqa: E402
from aimkern.distributed import DistEnv  # noqa: E402
from aimkern.train import parse_args  # noqa: E402
from aimkern.train.step import build_run, step_prefix, train_step  # the trainer's step, timed as is  # noqa: E402
from aimkern.nn import PredictionHead, make_mlp, make_norm  # plain nn.Linear and norms: no aimkern op  # noqa: E402
from aimkern.reference.attention import attention_mask  # noqa: E402
from aimkern.reference.pixel_loss import next_patch_pixel_loss_reference  # noqa: E402

WORKLOADS = {
    # name: (preset, batch, config overrides)
    "vit-b16": ("vit-b16", 256, dict(prefix=False)),
    "aim-600m": ("aim-600m", 64, dict()),
}
DEVICE = "cuda"
VARIANTS = ("aimkern", "aimkern+compile", "plain", "plain+compile", "plain-flex+compile")
TIMED_STEP = ("timed step: aimkern.train.train_step, the trainer's (prefix from the model's sample_prefix_len, bf16 "
              "autocast, forward, backward, clip 1.0, fused AdamW, warmup + cosine); only the model differs")
QUICK_VARIANTS = {"vit-b16": ("aimkern", "plain+compile"), "aim-600m": ("aimkern", "plain-flex+compile")}


# ------------------------------------------------------------------------------------------------------
# The plain-PyTorch twin: the same parameters under the same names, no aimkern op anywhere.
class PlainAttention(nn.Module):
    def __init__(self, cfg: ViTConfig, mode: str):
        super().__init__()
        self.num_heads, self.head_dim, self.mode = cfg.num_heads, cfg.dim // cfg.num_heads, mode
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=cfg.qkv_bias)
        self.proj = nn.Linear(cfg.dim, cfg.dim, bias=cfg.bias)

    def forward(self, x, mask):
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if self.mode == "flex":
            from torch.nn.attention.flex_attention import flex_attention

            o = flex_attention(q, k, v, block_mask=mask)
        elif self.mode == "causal":
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:  # "mask": a dense boolean mask, or None for full attention
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(o.transpose(1, 2).reshape(b, n, c))


class PlainBlock(nn.Module):
    def __init__(self, cfg: ViTConfig, mode: str):
        super().__init__()
        self.norm1 = make_norm(cfg.norm, cfg.dim, eps=cfg.norm_eps, bias=cfg.has_norm_bias)
        self.attn = PlainAttention(cfg, mode)
        self.norm2 = make_norm(cfg.norm, cfg.dim, eps=cfg.norm_eps, bias=cfg.has_norm_bias)
        self.mlp = make_mlp(cfg.mlp, cfg.dim, cfg.mlp_hidden_dim, bias=cfg.bias)

    def forward(self, x, mask):
        x = x + self.attn(self.norm1(x), mask)
        return x + self.mlp(self.norm2(x))


class PlainPatchEmbed(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.proj = nn.Conv2d(cfg.in_chans, cfg.dim, cfg.patch_size, stride=cfg.patch_size, bias=cfg.has_patch_bias)
        norm_bias = cfg.has_norm_bias  # AIMv1: biases on the norms, not the linears
        self.norm = make_norm(cfg.norm, cfg.dim, eps=cfg.norm_eps, bias=norm_bias) if cfg.patch_norm else nn.Identity()


class PlainViT(nn.Module):
    """CausalViT's architecture in plain PyTorch. ``mode``: "causal" (SDPA is_causal), "mask" (SDPA with a
    dense prefix mask), "flex" (FlexAttention with a prefix block mask; needs torch.compile to be fast)."""

    def __init__(self, cfg: ViTConfig, mode: str):
        super().__init__()
        if cfg.head != "pixel" or cfg.block_size != 1:
            raise ValueError("PlainViT: the benchmark covers the pixel head with token-causal masks")
        self.config, self.mode = cfg, mode
        self.patch_embed = PlainPatchEmbed(cfg)
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_patches, cfg.dim))
        if cfg.pos_embed == "sincos":  # a fixed buffer in CausalViT: same values, no gradient
            self.pos_embed.requires_grad_(False)
        self.blocks = nn.ModuleList(PlainBlock(cfg, mode) for _ in range(cfg.depth))
        self.norm = make_norm(cfg.norm, cfg.dim, eps=cfg.norm_eps, bias=cfg.has_norm_bias)
        width = cfg.head_width or cfg.dim
        self.head = PredictionHead(
            cfg.dim, cfg.patch_size**2 * cfg.in_chans, depth=cfg.head_depth, hidden_dim=width,
            make_block_mlp=lambda w: make_mlp(cfg.mlp, w, int(w * cfg.mlp_ratio), bias=cfg.bias),
            make_norm=lambda w: make_norm(cfg.norm, w, eps=cfg.norm_eps, bias=cfg.has_norm_bias), bias=cfg.bias,
        )

    @classmethod
    def twin_of(cls, model: CausalViT, mode: str) -> "PlainViT":
        with torch.device(model.pos_embed.device):  # built in place: initializing 0.7B parameters on a CPU is slow
            plain = cls(model.config, mode).to(dtype=model.pos_embed.dtype)
        state = dict(model.state_dict())
        state["pos_embed"] = model.pos_embed.detach().reshape(1, *model.pos_embed.shape[-2:])
        plain.load_state_dict(state)
        return plain

    @torch.compiler.disable
    def _eager_mask(self, batch: int, prefix_len: Optional[torch.Tensor]):
        """``make_mask`` outside torch.compile's graph (as a training loop builds it, then calls the model)."""
        return self.make_mask(batch, prefix_len)

    def make_mask(self, batch: int, prefix_len: Optional[torch.Tensor]):
        """The attention mask the mode needs for this batch (built per step: prefixes change every step)."""
        n, cfg = self.config.num_patches, self.config
        if self.mode == "causal" or (self.mode == "mask" and prefix_len is None and not cfg.is_causal):
            return None
        if self.mode == "mask":
            return attention_mask(n, is_causal=cfg.is_causal, prefix_len=prefix_len, batch=batch,
                                  device=self.pos_embed.device)
        from torch.nn.attention.flex_attention import create_block_mask

        prefix = prefix_len if prefix_len is not None else torch.zeros(batch, dtype=torch.int64,
                                                                       device=self.pos_embed.device)

        def visible(b, h, q, kv):
            return (kv <= q) | (kv < prefix[b])

        return create_block_mask(visible, batch, None, n, n, device=self.pos_embed.device)

    # AIM's prefix sampling, CausalViT's own: the trainer's step asks the model for its prefixes
    sample_prefix_len = CausalViT.sample_prefix_len

    def forward(self, images, prefix_len=None, targets=None):
        """CausalViT's training signature: the next-patch pixel loss (the mask is built here, every call)."""
        cfg = self.config
        mask = self._eager_mask(images.shape[0], prefix_len)
        x = self.patch_embed.proj(images).flatten(2).transpose(1, 2)
        x = self.patch_embed.norm(x) + self.pos_embed.to(x.dtype)
        for block in self.blocks:
            x = block(x, mask)
        pred = self.head(self.norm(x))
        return next_patch_pixel_loss_reference(
            pred, images, patch_size=cfg.patch_size, offset=1, prefix_len=prefix_len, norm_pix=cfg.norm_pix,
        )


# ------------------------------------------------------------------------------------------------------
def visible_pairs(n: int, prefix_len: Optional[torch.Tensor], is_causal: bool) -> float:
    """Mean number of visible (query, key) pairs per image under the mask."""
    if not is_causal:
        return float(n * n)
    if prefix_len is None:
        return n * (n + 1) / 2
    p = prefix_len.double().clamp(0, n)
    return float((p * p + (n * (n + 1) - p * (p + 1)) / 2).mean())


def forward_flops_per_image(cfg: ViTConfig, pairs: float) -> float:
    """Matmul FLOPs of one image's forward: patch GEMM, the blocks (qkv, proj, MLP, attention QK^T and PV
    over ``pairs`` visible pairs) and the pixel head."""
    n, d = cfg.num_patches, cfg.dim
    mlp_mats = 3 if cfg.mlp == "swiglu" else 2
    flops = 2 * n * cfg.in_chans * cfg.patch_size**2 * d
    flops += cfg.depth * (2 * n * d * 4 * d + 2 * n * d * cfg.mlp_hidden_dim * mlp_mats + 4 * pairs * d)
    width = (cfg.head_width or d) if cfg.head_depth > 0 else d  # PredictionHead's width
    if width != d:
        flops += 2 * n * d * width
    flops += cfg.head_depth * 2 * n * width * int(width * cfg.mlp_ratio) * mlp_mats
    flops += 2 * n * width * cfg.patch_size**2 * cfg.in_chans
    return float(flops)


# ------------------------------------------------------------------------------------------------------
def matmul_ceiling_tflops() -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = time_ms(lambda: a @ b)
    return 2 * 8192**3 / (ms * 1e-3) / 1e12


def trainer_args(preset: str, batch: int, device: str, compiled: bool = False):
    """The trainer's options for a timed run: its defaults (AIM's recipe), a schedule longer than any timing."""
    argv = ["--preset", preset, "--batch-size", str(batch), "--steps", "1000000", "--device", device,
            "--data", "synthetic", "--no-progress"]
    return parse_args(argv + (["--compile"] if compiled else []))


def build(variant: str, name: str, device: str = DEVICE):
    """(the trainer's Run for this variant's model, a batch of images): aimkern's CausalViT or its plain twin."""
    preset, batch, overrides = WORKLOADS[name]
    torch.manual_seed(0)
    with torch.device(device):
        model = CausalViT.from_preset(preset, **overrides)
    cfg = model.config
    images = torch.randn(batch, cfg.in_chans, cfg.img_size, cfg.img_size, device=device)
    if variant.startswith("plain"):
        mode = "flex" if "flex" in variant else ("mask" if cfg.prefix else "causal")
        model = PlainViT.twin_of(model, mode)
    args = trainer_args(preset, batch, device, compiled="compile" in variant)
    return build_run(args, DistEnv(device=torch.device(device)), model=model), images


def make_step(run, images) -> Callable[[], None]:
    """The timed call: the trainer's step on a fixed batch (prefixes still drawn per step, as in training)."""
    steps = itertools.count()
    return lambda: train_step(run, images, next(steps))


def _measure(row: dict, name: str, variant: str, ceiling: float, quick: bool) -> None:
    run, images = build(variant, name)
    cfg, prefix = run.core.config, step_prefix(run, 0)[0]  # the FLOP count uses step 0's prefixes
    step = make_step(run, images)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    step()
    torch.cuda.synchronize()
    row["first_step_s"] = time.perf_counter() - t0
    step()  # a second call: any recompilation or lazy init happens here, not in the timing
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    ms = time_ms(step, warmup=200 if quick else 500, rep=600 if quick else 2000)
    flops = 3 * forward_flops_per_image(cfg, visible_pairs(cfg.num_patches, prefix, cfg.is_causal))
    row.update(step_ms=ms, img_per_s=row["batch"] / (ms * 1e-3))
    row["tflops"] = flops * row["img_per_s"] / 1e12
    row["mfu_pct"] = 100 * row["tflops"] / ceiling


def measure_one(name: str, variant: str, ceiling: float, quick: bool) -> dict:
    """One variant's row; a variant that cannot run (kernel missing, out of memory) gets an ``error``."""
    row = {"model": name, "variant": variant, "batch": WORKLOADS[name][1]}
    try:
        _measure(row, name, variant, ceiling, quick)  # its model and optimizer die with its frame
    except Exception as e:  # noqa: BLE001 - reported in the table, the other variants still run
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:60] if str(e) else ''}"
    gc.collect()
    torch._dynamo.reset()
    torch.cuda.empty_cache()
    return row


def add_ratios(rows: list[dict]) -> None:
    """speedup and memory of each variant relative to the best plain compiled peer of the same model."""
    for name in {r["model"] for r in rows}:
        peers = [r for r in rows if r["model"] == name and r["variant"].startswith("plain")
                 and "compile" in r["variant"] and r.get("img_per_s")]
        if not peers:
            continue
        best = max(peers, key=lambda r: r["img_per_s"])
        for r in rows:
            if r["model"] == name and r.get("img_per_s"):
                r["x_best_plain"] = r["img_per_s"] / best["img_per_s"]
                r["mem_x_best_plain"] = r["peak_gib"] / best["peak_gib"]


def chart(rows):
    def draw(ax):
        ok = [r for r in rows if r.get("img_per_s")]
        labels = [f"{r['model']}\n{r['variant']}" for r in ok]
        ax.bar(range(len(ok)), [r["img_per_s"] for r in ok],
               color=["tab:orange" if r["variant"].startswith("aimkern") else "tab:gray" for r in ok])
        ax.set_xticks(range(len(ok)), labels, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("images / s (higher is better)")
        ax.set_title("Pretraining step, bf16 (aimkern orange, plain PyTorch gray)")

    return draw


def run_gpu(args) -> None:
    ceiling = matmul_ceiling_tflops()
    print(f"{torch.cuda.get_device_name()}: measured bf16 matmul ceiling {ceiling:.0f} TFLOP/s")
    print(TIMED_STEP)
    rows = []
    for name in args.models:
        cfg = ViTConfig.from_preset(WORKLOADS[name][0], **WORKLOADS[name][2])
        variants = args.variants or (QUICK_VARIANTS[name] if args.quick else VARIANTS)
        for variant in variants:
            if "flex" in variant and not cfg.prefix:
                continue
            row = measure_one(name, variant, ceiling, args.quick)
            rows.append(row)
            shown = {k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}
            print(f"  {shown}", flush=True)  # each row as it lands: a timeout still leaves the finished ones
    add_ratios(rows)
    columns = ["model", "variant", "batch", "img_per_s", "step_ms", "tflops", "mfu_pct", "peak_gib",
               "first_step_s", "x_best_plain", "mem_x_best_plain", "error"]
    for r in rows:
        r["matmul_ceiling_tflops"], r["step"] = ceiling, "aimkern.train.train_step"
    write_report("pretrain_throughput", rows, columns, chart=chart(rows))


# ------------------------------------------------------------------------------------------------------
def loss_and_grads(model, images, prefix) -> tuple:
    """(loss, {name: grad}) of one forward + backward of a CausalViT or a PlainViT."""
    model.zero_grad(set_to_none=True)
    loss = model(images, prefix_len=prefix)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def max_diff(a: tuple, b: tuple) -> float:
    err = abs(a[0].double().item() - b[0].double().item())
    for name, g in a[1].items():
        err = max(err, (g.double() - b[1][name].double()).abs().max().item())
    return err


def cpu_check() -> int:
    """The plain twin computes what CausalViT computes: loss and every gradient, for the reference ops (in
    float64) and the Triton kernels under the interpreter (fp32, within 2x plain PyTorch's fp32 error of
    the float64 result); and the FLOP formula matches torch's FLOP counter."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    failures = 0
    tiny = dict(img_size=16, patch_size=4, dim=32, depth=2, num_heads=2)
    cases = [
        ("vit causal", "vit-tiny", dict(tiny, prefix=False), "causal"),
        ("aim prefix, dense mask", "aim-600m", dict(tiny, head_depth=2, head_width=48), "mask"),
        ("aimv2 prefix, dense mask", "aimv2-large", dict(tiny), "mask"),
    ]
    for backend in ("reference", "triton"):
        for label, preset, overrides, mode in cases:
            torch.manual_seed(0)
            model = CausalViT.from_preset(preset, backend=backend, **overrides).double()
            images = torch.randn(3, 3, 16, 16, dtype=torch.float64)
            prefix = torch.tensor([1, 5, 15]) if model.config.prefix else None
            ref64 = loss_and_grads(PlainViT.twin_of(model, mode), images, prefix)
            if backend == "reference":
                got, bound = loss_and_grads(model, images, prefix), 1e-9
            else:  # Triton kernels take fp32 at most: compare against plain PyTorch's own fp32 error
                model, images = model.float(), images.float()
                base = max_diff(loss_and_grads(PlainViT.twin_of(model, mode), images, prefix), ref64)
                try:
                    got = loss_and_grads(model, images, prefix)
                except NotImplementedError as e:
                    print(f"  {backend:9s} {label:26s} skipped (kernel not landed): {str(e).splitlines()[0][:60]}")
                    continue
                bound = 2 * base + 1e-6
            err = max_diff(got, ref64)
            failures += not err <= bound
            print(f"  {backend:9s} {label:26s} max |loss or grad - float64 plain twin| {err:.2e} (bound {bound:.1e})")
    # FlexAttention's prefix block mask selects the same keys as the dense mask (forward only: flex has no
    # CPU backward, and eager flex is slow but exact)
    torch.manual_seed(0)
    model = CausalViT.from_preset("aim-600m", **tiny, head_depth=1)
    images, prefix = torch.randn(3, 3, 16, 16), torch.tensor([1, 5, 15])
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dense, flex = (PlainViT.twin_of(model, m) for m in ("mask", "flex"))
        err = abs(dense(images, prefix_len=prefix) - flex(images, prefix_len=prefix))
    print(f"  flex prefix block mask vs dense prefix mask: loss difference {err.item():.2e}")
    failures += not err.item() <= 1e-6
    for preset, extra in (("aim-600m", dict(head_depth=2, head_width=48)), ("aimv2-large", {})):
        cfg = ViTConfig.from_preset(preset, **tiny, **extra, is_causal=False)
        plain = PlainViT(cfg, "mask")
        # the math SDPA backend: its matmuls are counted (the CPU flash kernel is invisible to the counter)
        with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
            plain(torch.randn(2, 3, 16, 16))
        formula = 2 * forward_flops_per_image(cfg, visible_pairs(cfg.num_patches, None, False))
        counted = counter.get_total_flops()
        print(f"  {preset:11s} FLOP formula {formula:.0f} vs torch's counter {counted:.0f} (2 images, full attention)")
        failures += formula != counted
    failures += trainer_step_check(tiny)
    print("cpu check:", "OK" if not failures else f"{failures} FAILURE(S)")
    return 1 if failures else 0


def trainer_step_check(tiny: dict) -> int:
    """The timed step is the trainer's: ``train_step`` on a CausalViT and on its plain twin (float64, reference
    ops) gives the same loss and gradient norm for the same prefixes. Returns the failures."""
    print(f"  {TIMED_STEP}")
    failures = 0
    for preset, overrides, mode in (("vit-tiny", dict(tiny, prefix=False), "causal"),
                                    ("aim-600m", dict(tiny, head_depth=2, head_width=48), "mask")):
        torch.manual_seed(0)
        model = CausalViT.from_preset(preset, backend="reference", **overrides).double()
        images = torch.randn(3, 3, 16, 16, dtype=torch.float64)
        twin = PlainViT.twin_of(model, mode)
        outs = [train_step(build_run(trainer_args(preset, 3, "cpu"), DistEnv(), model=m), images, 0)
                for m in (model, twin)]
        err = max(abs(outs[0].loss.item() - outs[1].loss.item()), abs(float(outs[0].grad_norm - outs[1].grad_norm)))
        print(f"  train_step {preset:9s} aimkern vs plain twin: |loss| + |grad norm| difference {err:.2e} (bound 1e-9)")
        failures += not err <= 1e-9
    return failures


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help=f"short timing and only the key variants {QUICK_VARIANTS} (for gpu_check.sh)")
    p.add_argument("--models", default="vit-b16,aim-600m", help="comma-separated workloads: vit-b16, aim-600m")
    p.add_argument("--variants", default=None, help=f"comma-separated subset of {VARIANTS} (default: all)")
    args = p.parse_args(argv)
    args.models = args.models.split(",")
    args.variants = args.variants.split(",") if args.variants else None
    for m in args.models:
        if m not in WORKLOADS:
            p.error(f"--models: unknown workload {m!r}; choose from {sorted(WORKLOADS)}")
    for v in args.variants or ():
        if v not in VARIANTS:
            p.error(f"--variants: unknown variant {v!r}; choose from {VARIANTS}")
    if not has_cuda():
        no_cuda_notice("pretrain_throughput")
        return cpu_check()
    run_gpu(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
