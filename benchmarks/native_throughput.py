"""Native-resolution pretraining: packed against padded to the longest image and timm's NaFlexViT (issue 29).

The mix (fixed, documented; ``kernel_cost.native_mix_grids``'s draw): 60 % 4:3 landscape, 20 % 3:4
portrait, 10 % square, 10 % 16:9, long side uniform in 200-1000 px, patch 16, seed 0. At each budget N of
256, 576 and 1,024 patches per image, every image gets its training grid (``aimkern.data.native.native_grid``:
its own when within N, else shrunk at its aspect ratio), and the three ways fill steps of the same T tokens
(``--tokens-multiple`` x N, default 8):

- aimkern packed: the trainer's own rule (``first_fit_pack``: data order, first fit, skipped images lead
  the next pack) into T tokens, the tail padding sequences of at most N tokens (``split_padding``: full
  attention over themselves, no loss);
- aimkern padded: batches in data order, each image padded to the batch's longest, B x L <= T;
- timm NaFlexViT's default loader policy: per batch a random bucket of (128, 256, 576, 784, 1024) tokens,
  ``calculate_naflex_batch_size(T, L)`` images, each resized with ``get_image_size_for_seq`` to fill the
  bucket (timm's own functions), and a dense additive [B, 1, L, L] mask into SDPA: every (query, key) pair
  of every row is computed (no flash backend, no skipped tile).

Reported per way: the padding fraction (tokens that are not an image's patch), the attention work issued
forward + backward as a multiple of the images' minimum at budget N (AIM's prefix-causal mask, prefix in
[1, n - 1]; the minimum is 7 D MACs per visible pair, ``aimkern.varlen.cost``). aimkern's ways are counted
with the varlen kernels' tiles (``varlen_attention_cost``: padded = B sequences of the longest length, the
dense kernel's tiling of a batch); NaFlexViT's as 7 D MACs per computed pair, B L^2. Its tokens are
reported too: its images are resized to the bucket, not to their own size.

``--time`` also times a step (forward + backward of a small trunk at the same width, depth and heads for
all three) on this machine: on a CPU those tokens/s are a CPU figure, not a GPU speed.

    python benchmarks/native_throughput.py [--images 2000] [--time] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from aimkern.data.native import first_fit_pack, native_grid  # noqa: E402
from aimkern.varlen.cost import varlen_attention_cost  # noqa: E402
from kernel_cost import NATIVE_ASPECTS, NATIVE_BUDGETS, _cumulative  # noqa: E402

PATCH = 16
HEAD_DIM = 64
NAFLEX_BUCKETS = (128, 256, 576, 784, 1024)


def mix_sizes(count: int, seed: int = 0) -> list:
    """(width, height) pixels of ``count`` images of the mix (the draw of kernel_cost.native_mix_grids)."""
    gen = torch.Generator().manual_seed(seed)
    sizes = []
    for _ in range(count):
        u = float(torch.rand((), generator=gen))
        aspect = next((a for p_cum, a in _cumulative(NATIVE_ASPECTS) if u < p_cum), NATIVE_ASPECTS[-1][1])
        long_side = 200 + 800 * float(torch.rand((), generator=gen))
        sizes.append((long_side, long_side / aspect) if aspect >= 1 else (long_side * aspect, long_side))
    return sizes


def prefixes(lengths, seed: int) -> list:
    rng = random.Random(seed)
    return [rng.randint(1, n - 1) if n >= 2 else n for n in lengths]


def packed_steps(lengths: list, tokens: int, max_images: int) -> list:
    """The trainer's packs of ``lengths`` (image indices per pack); the last, partial pack dropped."""
    it = iter(range(len(lengths)))
    pending, packs = [], []
    try:
        while True:
            taken, pending, _ = first_fit_pack(pending, lambda: next(it), lambda i: lengths[i], tokens, max_images)
            packs.append(taken)
    except StopIteration:
        return packs


def padded_steps(lengths: list, tokens: int) -> list:
    """Batches in data order where (images) x (the longest) <= tokens."""
    batches, cur, longest = [], [], 0
    for i, n in enumerate(lengths):
        if cur and (len(cur) + 1) * max(longest, n) > tokens:
            batches.append(cur)
            cur, longest = [], 0
        cur.append(i)
        longest = max(longest, n)
    return batches  # the last, partial batch dropped


def minimum(lengths: list, pre: list) -> int:
    return varlen_attention_cost(lengths, is_causal=True, prefix_len=pre, head_dim=HEAD_DIM).visible_pairs * 7 * HEAD_DIM


def count_budget(sizes: list, budget: int, tokens: int, seed: int = 0) -> list:
    """The three ways' rows at one budget (see the module docstring)."""
    grids = [native_grid(w, h, budget, PATCH) for w, h in sizes]
    lengths = [h * w for h, w in grids]
    pre = prefixes(lengths, seed)
    rows = []

    packs = packed_steps(lengths, tokens, max(1, 4 * tokens // budget))
    used = [i for p in packs for i in p]
    issued = img_min = 0
    for p in packs:
        lens, pf = [lengths[i] for i in p], [pre[i] for i in p]
        pad = tokens - sum(lens)
        chunks = [min(budget, pad - a) for a in range(0, pad, budget)]  # the trainer's split_padding
        c = varlen_attention_cost(lens + chunks, is_causal=True, prefix_len=pf + chunks, head_dim=HEAD_DIM,
                                  max_seqlen=budget)
        issued += c.fwd_macs + c.bwd_macs
        img_min += minimum(lens, pf)
    rows.append(dict(budget=budget, way="aimkern packed", steps=len(packs), images=len(used),
                     padding=1 - sum(lengths[i] for i in used) / (tokens * len(packs)), work_x=issued / img_min,
                     tokens_x=1.0))

    batches = padded_steps(lengths, tokens)
    issued = img_min = image_tokens = slots = 0
    for b in batches:
        lens, pf = [lengths[i] for i in b], [pre[i] for i in b]
        longest = max(lens)
        c = varlen_attention_cost([longest] * len(b), is_causal=True, prefix_len=pf, head_dim=HEAD_DIM)
        issued += c.fwd_macs + c.bwd_macs
        img_min += minimum(lens, pf)
        image_tokens, slots = image_tokens + sum(lens), slots + longest * len(b)
    rows.append(dict(budget=budget, way="aimkern padded to longest", steps=len(batches),
                     images=sum(map(len, batches)), padding=1 - image_tokens / slots, work_x=issued / img_min,
                     tokens_x=1.0))
    return rows


def count_naflex(sizes: list, tokens: int, budget_ref: int, seed: int = 0, per_image: bool = False):
    """timm's default NaFlex policy on the mix, against the packed minimum at ``budget_ref``; None without
    timm.data.naflex_*.

    per_image=False: timm's schedule (``NaFlexMapDatasetWrapper._create_canonical_schedule``): a random bucket
    per batch and ``calculate_naflex_batch_size(tokens, bucket)`` images in it, so a 128-token batch holds 8x
    the images of a 1,024-token one and most images land in small buckets. per_image=True: every image
    draws its own bucket uniformly (batches of one image), the count behind the issue's anchor (2.48x the
    work, 1.18x the tokens at 576; this gives 2.60x, 1.15x on 10,000 images, seed 0); timm's loader does
    not sample that way."""
    try:
        from timm.data.naflex_dataset import calculate_naflex_batch_size
        from timm.data.naflex_transforms import get_image_size_for_seq
    except ImportError:
        return None
    gen = torch.Generator().manual_seed(seed)
    own = [h * w for h, w in (native_grid(w, h, budget_ref, PATCH) for w, h in sizes)]
    pre = prefixes(own, seed)
    i = issued = img_min = naflex_tokens = slots = 0
    while True:
        seq = NAFLEX_BUCKETS[int(torch.randint(0, len(NAFLEX_BUCKETS), (1,), generator=gen))]
        b = 1 if per_image else calculate_naflex_batch_size(tokens, seq)
        if i + b > len(sizes):
            break
        for w, h in sizes[i:i + b]:
            _, (th, tw) = get_image_size_for_seq((int(h), int(w)), PATCH, seq)
            naflex_tokens += (th // PATCH) * (tw // PATCH)
        issued += b * seq * seq * 7 * HEAD_DIM  # dense mask into SDPA: every pair of every row
        img_min += minimum(own[i:i + b], pre[i:i + b])
        slots += b * seq
        i += b
    way = "NaFlex, a bucket per image" if per_image else "timm NaFlexViT (default policy)"
    return dict(budget=f"buckets {NAFLEX_BUCKETS[0]}-{NAFLEX_BUCKETS[-1]}", way=way,
                steps=None, images=i, padding=1 - naflex_tokens / slots, work_x=issued / img_min,
                tokens_x=naflex_tokens / sum(own[:i]))


# ------------------------------------------------------------------------------------------------- timing
def time_budget(sizes: list, budget: int, tokens: int, dim: int, depth: int, heads: int, reps: int) -> list:
    """Tokens / s of one step (forward + backward) of aimkern packed and padded (and timm NaFlexViT when it
    exists) at the same trunk, on this machine."""
    from aimkern import CausalViT, pack_images

    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = dict(img_size=PATCH * 4, patch_size=PATCH, dim=dim, depth=depth, num_heads=heads, pos_embed="sincos")
    model = CausalViT.from_preset("vit-tiny", **cfg).to(device).train()
    grids = [native_grid(w, h, budget, PATCH) for w, h in sizes]
    lengths = [h * w for h, w in grids]
    pack_ids = packed_steps(lengths, tokens, max(1, 4 * tokens // budget))[0]
    gen = torch.Generator().manual_seed(0)
    imgs = [torch.randint(0, 256, (3, grids[i][0] * PATCH, grids[i][1] * PATCH), generator=gen, dtype=torch.uint8)
            for i in pack_ids]
    from aimkern.data.packing import pack_to_budget

    pack, _ = pack_to_budget(imgs, PATCH, tokens, prefix_len=prefixes([lengths[i] for i in pack_ids], 0))
    pack = pack.to(device)
    longest = max(lengths[i] for i in pack_ids)
    b = max(1, tokens // longest)

    def timed(fn) -> float:
        fn()  # warm-up (dispatch decisions, allocations)
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) / reps

    def packed():
        model.forward_packed(pack).backward()

    rows = [dict(budget=budget, way="aimkern packed", tokens_per_s=sum(lengths[i] for i in pack_ids) / timed(packed))]
    # Padded: a batch of b square-ish images of the longest length (the dense path takes square images only:
    # the same token count and mask work as b padded rows).
    side = int(longest ** 0.5) or 1
    dense_model = CausalViT.from_preset("vit-tiny", **dict(cfg, img_size=side * PATCH)).to(device).train()
    x = torch.randn(b, 3, side * PATCH, side * PATCH, device=device)
    p_img = [lengths[i] for i in pack_ids][:b]

    def padded():
        dense_model(x, prefix_len=torch.tensor(prefixes([side * side] * b, 0), device=device)).backward()

    rows.append(dict(budget=budget, way="aimkern padded to longest",
                     tokens_per_s=sum(p_img) / timed(padded)))
    try:
        from timm.models.naflexvit import NaFlexVit
    except ImportError:
        return rows
    nf = NaFlexVit(in_chans=3, num_classes=0, patch_size=PATCH, embed_dim=dim, depth=depth, num_heads=heads).to(device)
    seq = min(NAFLEX_BUCKETS, key=lambda s: abs(s - budget))
    bn = max(1, tokens // seq)
    patches = torch.randn(bn, seq, PATCH * PATCH * 3, device=device)
    coord = torch.stack(torch.meshgrid(torch.arange(seq), torch.zeros(1, dtype=torch.long), indexing="ij"), -1)
    coord = coord.reshape(seq, 2).expand(bn, seq, 2).contiguous().to(device)
    valid = torch.ones(bn, seq, dtype=torch.bool, device=device)
    valid[:, seq - seq // 6:] = False  # about the mix's fill of a bucket

    def naflex():
        out = nf.forward_features(patches, patch_coord=coord, patch_valid=valid)  # builds its [B,1,L,L] mask
        (out["patches"] if isinstance(out, dict) else out).float().mean().backward()

    rows.append(dict(budget=budget, way="timm NaFlexViT", tokens_per_s=int(valid.sum()) / timed(naflex)))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=2000, help="images of the mix (default 2000; the issue's "
                    "anchor used 10,000)")
    ap.add_argument("--tokens-multiple", type=int, default=8, help="tokens per step = this x the budget")
    ap.add_argument("--time", action="store_true", help="also time a step of each way on this machine")
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    sizes = mix_sizes(args.images)
    rows = []
    for budget in NATIVE_BUDGETS:
        rows += count_budget(sizes, budget, args.tokens_multiple * budget)
    naflex = count_naflex(sizes, args.tokens_multiple * 576, 576)
    if naflex:
        rows += [naflex, count_naflex(sizes, args.tokens_multiple * 576, 576, per_image=True)]
    print(f"Native mix, {args.images} images (seed 0), patch {PATCH}; steps of {args.tokens_multiple} x the budget "
          "tokens. Attention work issued fwd+bwd (prefix-causal, per head) as a multiple of the images' minimum.")
    head = f"{'budget':<18} {'way':<34} {'steps':>6} {'images':>7} {'padding':>8} {'work x':>7} {'tokens x':>8}"
    print(head)
    print("-" * len(head))
    for r in rows:
        steps = "-" if r["steps"] is None else r["steps"]
        print(f"{str(r['budget']):<18} {r['way']:<34} {steps:>6} {r['images']:>7} {100 * r['padding']:>7.1f}% "
              f"{r['work_x']:>7.2f} {r['tokens_x']:>8.2f}")
    if naflex:
        print(f"(NaFlexViT: {args.tokens_multiple} x 576 tokens a step; work and tokens against the images' own at 576. "
              "'a bucket per image' is the issue's anchor's count; timm's loader draws a bucket per batch.)")
    timing = []
    if args.time:
        where = "GPU" if torch.cuda.is_available() else "CPU (a CPU figure: not a GPU speed)"
        print(f"\nTokens / s of one step (forward + backward, dim {args.dim}, depth {args.depth}, "
              f"{args.heads} heads), {where}:")
        for budget in NATIVE_BUDGETS:
            for r in time_budget(sizes, budget, args.tokens_multiple * budget, args.dim, args.depth, args.heads,
                                 args.reps):
                timing.append(r)
                print(f"  {budget:>5}  {r['way']:<28} {r['tokens_per_s']:>10.0f} tokens/s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"counted": rows, "timed": timing}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
