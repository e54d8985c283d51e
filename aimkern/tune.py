"""``python -m aimkern.tune``: decide every op call of one training step of a preset, and show why.

    python -m aimkern.tune --preset vit-b16 [--batch-size B] [--dtype bf16|fp16|fp32] [--device cuda|cpu]
                           [--objective pixel|token] [--json FILE] [--png FILE] [--markdown]

Runs one forward + backward of the preset's ``CausalViT`` (its own masks and shapes, AIM's sampled prefix,
the step's autocast dtype) with measured dispatch on, whatever ``AIMKERN_DISPATCH`` says, so every op call
is decided (or read from ``$AIMKERN_CACHE_DIR``; point that at an empty folder to measure again). Then it
prints one line per decided op call: the shape, each candidate's ms or why it was left out, the choice and
its speed-up over PyTorch's best path (the fastest correct candidate of kind "torch", the reference
included). ``--json`` writes the rows (``aimkern.dispatch.report()`` plus the speed-up), ``--png`` a chart
(needs matplotlib).
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Optional

DTYPES = ("bf16", "fp16", "fp32")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m aimkern.tune", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", required=True, help="a CausalViT preset, e.g. vit-b16, aim-600m, vit-tiny")
    p.add_argument("--batch-size", type=int, default=8, help="images in the step (default 8)")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="the step's compute dtype: bf16 / fp16 under autocast, fp32 without "
                        "(default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda when available")
    p.add_argument("--objective", choices=("pixel", "token"), default=None,
                   help="the head: pixel loss or the token cross-entropy (default: the preset's)")
    p.add_argument("--json", default=None, metavar="FILE", help="write the rows as JSON")
    p.add_argument("--png", default=None, metavar="FILE", help="write a chart of the candidates' times (matplotlib)")
    p.add_argument("--markdown", action="store_true", help="also print the table in Markdown")
    return p


def _check(args, torch) -> None:
    from .models.config import PRESETS

    if args.preset not in PRESETS:
        raise SystemExit(f"aimkern.tune: unknown preset {args.preset!r}; choose one of {', '.join(sorted(PRESETS))}")
    if args.batch_size < 1:
        raise SystemExit(f"aimkern.tune: --batch-size must be >= 1, got {args.batch_size}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("aimkern.tune: --device cuda, but torch sees no CUDA device")


def one_step(args) -> None:
    """One forward + backward of the preset's model at ``args``' batch, dtype and device."""
    import torch

    from .models import CausalViT

    device = torch.device(args.device)
    overrides = {"head": args.objective} if args.objective else {}
    model = CausalViT.from_preset(args.preset, **overrides).to(device).train()
    cfg = model.config
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch_size, cfg.in_chans, cfg.img_size, cfg.img_size, generator=gen).to(device)
    prefix = model.sample_prefix_len(args.batch_size, device) if cfg.prefix and cfg.is_causal else None
    targets = None
    if cfg.head == "token":
        targets = torch.randint(0, cfg.vocab_size, (args.batch_size, cfg.num_patches), generator=gen).to(device)
    autocast = torch.autocast(device.type, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]) \
        if args.dtype != "fp32" else torch.autocast(device.type, enabled=False)
    with autocast:
        loss = model(images, prefix_len=prefix, targets=targets)
    loss.backward()


def speedup(row: dict) -> Optional[float]:
    """PyTorch's best correct time over the chosen candidate's (None when either is unknown)."""
    times = {n: c["ms"] for n, c in row["candidates"].items() if c.get("ms") is not None}
    torch_best = min((ms for n, ms in times.items() if row["kinds"].get(n) == "torch"), default=None)
    chosen = times.get(row["chosen"])
    return torch_best / chosen if torch_best and chosen else None


def _shape(row: dict) -> str:
    shapes = row["problem"]["shapes"]
    first = next(iter(shapes.values()))
    return "x".join(map(str, first)) + f" {row['problem']['dtype']} {row['problem']['mask']}" + \
        (" fwd+bwd" if row["problem"]["grad"] else " fwd")


def format_table(rows: list) -> str:
    lines = []
    for row in rows:
        sp = speedup(row)
        head = f"{row['op']:<22} {_shape(row):<44} chosen {row['chosen']}" + \
            (" (cached)" if row["from_cache"] else "") + (" (recorded)" if row.get("pinned") else "") + \
            (f"  {sp:.2f}x PyTorch's best" if sp else "")
        lines.append(head)
        for name, c in row["candidates"].items():
            if c.get("ms") is not None:
                lines.append(f"    {name:<22} {c['ms']:9.3f} ms")
            else:
                lines.append(f"    {name:<22} {'-':>9}    {c.get('reason') or 'not timed (cached decision)'}")
    return "\n".join(lines)


def format_markdown(rows: list) -> str:
    """The rows as a Markdown table: op, shape, every timed candidate's ms, the choice, the speed-up."""
    lines = ["| op | problem | candidates (ms; fastest correct wins) | chosen | vs PyTorch's best |",
             "|---|---|---|---|---|"]
    for row in rows:
        timed = ", ".join(f"{n} {c['ms']:.3f}" for n, c in row["candidates"].items() if c.get("ms") is not None)
        rejected = [n for n, c in row["candidates"].items() if c.get("verified") is False and c.get("ms") is None
                    and c.get("reason") and not c["reason"].startswith(("runs on", "Triton's interpreter"))]
        if rejected:
            timed += "; out: " + ", ".join(rejected)
        sp = speedup(row)
        lines.append(f"| {row['op']} | {_shape(row)} | {timed} | {row['chosen']} | {f'{sp:.2f}x' if sp else '-'} |")
    return "\n".join(lines)


def write_png(rows: list, path: str, title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("aimkern.tune: --png needs matplotlib (pip install matplotlib); no chart written", file=sys.stderr)
        return False
    fig, axes = plt.subplots(len(rows), 1, figsize=(8, 1.2 + 0.9 * sum(1 for _ in rows)), squeeze=False)
    for ax, row in zip(axes[:, 0], rows):
        timed = [(n, c["ms"]) for n, c in row["candidates"].items() if c.get("ms") is not None]
        names = [n for n, _ in timed]
        ax.barh(names, [ms for _, ms in timed], color=["tab:green" if n == row["chosen"] else "tab:gray" for n in names])
        ax.set_title(f"{row['op']} {_shape(row)}", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.set_xlabel("ms", fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    from . import dispatch
    from .dispatch.environment import forced_mode

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    _check(args, torch)
    dispatch.reset()
    with forced_mode("measured"):
        one_step(args)
    rows = dispatch.report()
    for row in rows:
        row["speedup_vs_torch"] = speedup(row)
    title = (f"aimkern.tune --preset {args.preset} --batch-size {args.batch_size} --dtype {args.dtype} "
             f"on {dispatch.fingerprint(rows[0]['problem']['device']) if rows else args.device}")
    print(title)
    print(format_table(rows))
    if args.markdown:
        print(format_markdown(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"preset": args.preset, "batch_size": args.batch_size, "dtype": args.dtype,
                       "device": args.device, "objective": args.objective, "rows": rows}, f, indent=1)
        print(f"wrote {args.json}")
    if args.png and write_png(rows, args.png, title):
        print(f"wrote {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
