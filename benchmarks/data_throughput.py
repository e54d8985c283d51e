"""Input-pipeline throughput: ImageFolder vs WebDataset shards, full vs DCT-scaled JPEG decode, CPU vs GPU,
each against a bare PIL loop (the anchor) timed in the same run.

    python benchmarks/data_throughput.py [--images 1024] [--size 500x375] [--quality 90] [--img 224]
                                         [--workers 1,2,all] [--batch 64] [--large 1024x768] [--quick]

Writes the same JPEGs (ImageNet-like: smooth random content + sensor-like noise, 500 x 375 (ImageNet's
typical size), q90) as an ImageFolder and, through ``python -m aimkern.data pack``, as shards, then times:
- ``anchor-pil``: a bare loop in this process, no DataLoader: PIL decode of each file + torchvision's
  RandomResizedCrop (bicubic) + flip + ToTensor (float32), what a plain PyTorch loader does per image;
- ``imagefolder``: aimkern's ImageFolder stream (file reads, the decoder of ``aimkern.data.decode``);
- ``shards-full``: the shard stream with the DCT-scaled decode off (libjpeg-turbo at full size);
- ``shards-draft``: the shard stream as trained (libjpeg-turbo at the smallest DCT scale that covers the
  crop, uint8 crop / resize / flip, uint8 batches);
- ``shards-gpu``: ``--decode gpu`` (nvJPEG), only when CUDA is present.
The streams at 1, 2 and all workers (one core each); full vs scaled also on larger JPEGs (--large).
Prints images/s (wall clock), images/s per core (images per CPU second of the training process and its
workers, which other jobs on a shared machine do not distort), each reader's per-core ratio to the anchor,
and the cores needed per GPU and per 8-GPU node for the vit-b16 (3,800 img/s) and aim-600m (330 img/s)
step goals. The streams hand over uint8 batches; the normalization runs in the training step on the
device, so it is not timed here (the anchor's float ToTensor is: it is what the CPU paid before). Table on
stdout, JSON and PNG under $AIMKERN_BENCH_OUT or benchmarks/out/. ``--quick`` is the small form CI runs.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import has_cuda, write_report  # noqa: E402

from aimkern.data.pack import pack  # noqa: E402
from aimkern.data.shard_stream import ShardStream  # noqa: E402
from aimkern.data.folder import FolderStream  # noqa: E402

GOALS = {"vit-b16": 3800.0, "aim-600m": 330.0}  # img/s per H200 (README "Results")
ANCHOR = "anchor-pil"
TARGET_RATIO = 1.6  # issue 21: the shard reader at >= 1.6x the anchor per core, with 1 and 2 workers


def make_jpegs(root: str, n: int, size, quality: int, seed: int = 0) -> float:
    """n JPEGs in 10 class folders; returns the mean file size in KiB. Content: a bicubic-upsampled 12 x 12
    random field (objects, gradients) plus Gaussian noise (texture), which compresses like photos do."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    w, h = size
    total = 0
    for i in range(n):
        folder = os.path.join(root, f"c{i % 10}")
        os.makedirs(folder, exist_ok=True)
        coarse = Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
        pixels = np.asarray(coarse, dtype=np.float32) + rng.normal(0, 10, (h, w, 3))
        path = os.path.join(folder, f"{i:06d}.jpg")
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path, quality=quality)
        total += os.path.getsize(path)
    return total / n / 1024


def cpu_seconds() -> float:
    """CPU time (user + system) of this process and its children alive now (the DataLoader workers), from
    /proc: what the pipeline costs in cores, whatever share of them other jobs on the machine take."""
    tick, me = os.sysconf("SC_CLK_TCK"), os.getpid()
    total = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited meanwhile
        if int(pid) == me or int(fields[1]) == me:  # fields[1]: the parent's pid
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / tick


def time_stream(stream, images: int, batch: int, warm: int = 6, segments: int = 3) -> tuple:
    """(images / wall second, images / CPU second) of ``stream`` over ``images`` images after ``warm`` batches
    (worker start-up and the prefetch queue's first fill excluded). Wall rate: the best of ``segments``
    consecutive thirds, since on a shared machine other jobs steal whole stretches; CPU rate: over all of
    them (the per-core cost)."""
    it = iter(stream)
    for _ in range(warm):
        next(it)
    steps = max(1, images // batch // segments)
    best, cpu0 = 0.0, cpu_seconds()
    for _ in range(segments):
        t0 = time.perf_counter()
        for _ in range(steps):
            x = next(it)
        if x.is_cuda:
            torch.cuda.synchronize()
        best = max(best, steps * batch / (time.perf_counter() - t0))
    return best, segments * steps * batch / max(cpu_seconds() - cpu0, 1e-9)


def time_anchor(folder: str, images: int, img: int, segments: int = 3) -> tuple:
    """(images / wall second, images / CPU second) of the bare PIL loop over the folder's JPEGs: open, decode,
    RandomResizedCrop(img, scale=(0.4, 1), bicubic) + flip + ToTensor, one image at a time, this process
    only (same accounting as ``time_stream``: best wall third, CPU over all)."""
    from PIL import Image
    from torchvision import transforms as T

    transform = T.Compose([
        T.RandomResizedCrop(img, scale=(0.4, 1.0), interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
    ])
    paths = sorted(os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs)
    torch.manual_seed(0)
    for path in paths[:8]:  # warm: the imports' first calls, the page cache
        transform(Image.open(path).convert("RGB"))
    steps = max(1, images // segments)
    best, cpu0, k = 0.0, cpu_seconds(), 0
    for _ in range(segments):
        t0 = time.perf_counter()
        for _ in range(steps):
            with Image.open(paths[k % len(paths)]) as im:
                transform(im.convert("RGB"))
            k += 1
        best = max(best, steps / (time.perf_counter() - t0))
    return best, segments * steps / max(cpu_seconds() - cpu0, 1e-9)


def build(kind: str, folder: str, shards: str, img: int, batch: int, workers: int):
    common = dict(global_batch=batch, rank=0, world=1, seed=0, start=0, workers=workers)
    if kind == "imagefolder":
        return FolderStream(folder, img, 3, device=torch.device("cpu"), **common)
    if kind == "shards-gpu":
        return ShardStream(shards, img, 3, device=torch.device("cuda"), decode="gpu", **common)
    return ShardStream(shards, img, 3, device=torch.device("cpu"), draft=kind == "shards-draft", **common)


def measure(args) -> tuple:
    cores = os.cpu_count() or 1
    counts = sorted({int(w) if w != "all" else cores for w in args.workers.split(",")})
    kinds = ["imagefolder", "shards-full", "shards-draft"] + (["shards-gpu"] if has_cuda() else [])
    size = tuple(int(v) for v in args.size.lower().split("x"))
    rows = []
    # The ImageNet-like set at every worker count; a larger set (where the 224-px crop is much smaller than the
    # image, so draft mode has a DCT scale to pick) for full vs draft decode at the fewest workers.
    sets = [(size, args.images, kinds, counts)]
    if args.large:
        large = tuple(int(v) for v in args.large.lower().split("x"))
        sets.append((large, max(args.batch, args.images // 4), ["shards-full", "shards-draft"], counts[:1]))
    for (w, h), n, set_kinds, set_counts in sets:
        with tempfile.TemporaryDirectory() as tmp:
            folder, shards = os.path.join(tmp, "folder"), os.path.join(tmp, "shards")
            kib = make_jpegs(folder, n, (w, h), args.quality)
            pack(folder, shards, max(1, n // 8), progress=False)
            image = f"{w}x{h} q{args.quality} {kib:.0f}KiB"
            print(f"{n} JPEGs, {image}; crops to {args.img} px; {cores} CPU core(s) here", flush=True)
            # The anchor before and after the readers, averaged: on a shared machine the load drifts over a
            # run, and the ratios should compare the readers with the anchor under the same conditions.
            rate, per_cpu_s = time_anchor(folder, n, args.img)
            anchor_row = {"reader": ANCHOR, "workers": 0, "img_per_s": rate, "img_per_s_per_core": per_cpu_s,
                          "vs_anchor": 1.0, "image": image, "crop": args.img, "anchor_first": per_cpu_s}
            rows.append(anchor_row)
            anchor = per_cpu_s
            print(f"  {ANCHOR:12s} no loader: {rate:7.1f} img/s, {per_cpu_s:6.1f} per core (CPU second)", flush=True)
            first = len(rows)
            for kind in set_kinds:
                for workers in set_counts:
                    stream = build(kind, folder, shards, args.img, args.batch, workers)
                    rate, per_cpu_s = time_stream(stream, n, args.batch)
                    del stream  # its workers exit before the next configuration starts
                    rows.append({"reader": kind, "workers": workers, "img_per_s": rate,
                                 "img_per_s_per_core": per_cpu_s, "vs_anchor": per_cpu_s / anchor, "image": image,
                                 "crop": args.img})
                    print(f"  {kind:12s} workers={workers}: {rate:7.1f} img/s, {per_cpu_s:6.1f} per core (CPU second), "
                          f"{per_cpu_s / anchor:.2f}x the first anchor", flush=True)
            rate, last = time_anchor(folder, n, args.img)
            anchor = (anchor_row["anchor_first"] + last) / 2
            anchor_row.update(img_per_s=(anchor_row["img_per_s"] + rate) / 2, img_per_s_per_core=anchor,
                              anchor_last=last)
            for row in rows[first:]:
                row["vs_anchor"] = row["img_per_s_per_core"] / anchor
            print(f"  {ANCHOR:12s} again: {last:6.1f} per core; the ratios below use the mean, {anchor:.1f}",
                  flush=True)
    return rows, cores


def cores_needed(rows) -> list:
    """Lines: cores per GPU and per 8-GPU node for each reader, at its per-core rate with the fewest workers,
    and its ratio to the anchor; then whether the shard reader meets TARGET_RATIO at 1 and 2 workers."""
    lines = []
    main = [r for r in rows if r["image"] == rows[0]["image"]]  # the ImageNet-like set
    for kind in dict.fromkeys(r["reader"] for r in main):
        row = min((r for r in main if r["reader"] == kind), key=lambda r: r["workers"])
        per_core = row["img_per_s_per_core"]
        need = ", ".join(f"{name} {goal / per_core:.1f} cores/GPU ({8 * goal / per_core:.0f} per 8-GPU node)"
                         for name, goal in GOALS.items())
        lines.append(f"{kind:12s} {per_core:6.1f} img/s per core ({row['vs_anchor']:.2f}x anchor) -> {need}")
    for r in main:
        if r["reader"] == "shards-draft" and r["workers"] in (1, 2):
            verdict = "meets" if r["vs_anchor"] >= TARGET_RATIO else "misses"
            lines.append(f"goal: shards-draft, {r['workers']} worker(s): {r['vs_anchor']:.2f}x the anchor per core "
                         f"({verdict} {TARGET_RATIO}x)")
    return lines


def chart(rows):
    def draw(ax):
        kinds = list(dict.fromkeys((r["reader"], r["image"]) for r in rows))
        counts = sorted({r["workers"] for r in rows})
        width = 0.8 / len(counts)
        for j, w in enumerate(counts):
            vals = [next((r["img_per_s_per_core"] for r in rows
                          if (r["reader"], r["image"]) == k and r["workers"] == w), 0) for k in kinds]
            ax.bar(np.arange(len(kinds)) + j * width, vals, width, label=f"{w} worker(s)")
        ax.set_xticks(np.arange(len(kinds)) + width * (len(counts) - 1) / 2, [f"{k}\n{i}" for k, i in kinds])
        ax.set_ylabel("images per CPU second")
        ax.set_title(f"input pipeline, JPEGs -> {rows[0]['crop']} px crops")
        ax.legend()
    return draw


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=1024, help="JPEGs written and timed per configuration")
    ap.add_argument("--size", default="500x375", help="JPEG width x height (default: 500x375, ImageNet's typical)")
    ap.add_argument("--quality", type=int, default=90)
    ap.add_argument("--img", type=int, default=224, help="crop size (default: 224)")
    ap.add_argument("--workers", default="1,2,all", help="DataLoader worker counts (default: 1,2,all)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--large", default="1024x768", help="the larger JPEGs for full vs draft decode ('' skips them)")
    ap.add_argument("--quick", action="store_true", help="small CPU form for CI: 48 images of 160x140, 64-px crops")
    args = ap.parse_args()
    if args.quick:
        args.images, args.size, args.img, args.workers, args.batch, args.large = 48, "160x140", 64, "1", 8, "320x240"
    torch.set_num_threads(1)  # the main process only collates; the workers decode
    rows, cores = measure(args)
    for line in cores_needed(rows):
        print(line)
    if not has_cuda():
        print("(no CUDA here: GPU decode not measured)")
    write_report("data_throughput", rows,
                 ["reader", "workers", "img_per_s", "img_per_s_per_core", "vs_anchor", "image", "crop"],
                 chart=chart(rows))


if __name__ == "__main__":
    main()
