"""``python -m aimkern.data pack SRC DST --shard-size N`` and ``python -m aimkern.data index SHARDS``."""
from __future__ import annotations

import argparse
import json
import sys

from .pack import index, pack


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m aimkern.data", description="WebDataset shards for aimkern.train")
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("pack", help="ImageFolder tree -> shards + index.json (webdataset's ShardWriter)")
    a.add_argument("src", help="ImageFolder root (one sub-folder of images per class)")
    a.add_argument("dst", help="output folder for PREFIX-000000.tar, ... and index.json")
    a.add_argument("--shard-size", type=int, default=10000, help="samples per shard (default: 10000)")
    a.add_argument("--prefix", default="train", help="shard file name prefix (default: train)")
    a.add_argument("--seed", type=int, default=0, help="seed of the packing order (default: 0)")
    a = sub.add_parser("index", help="write index.json (sample count per shard) for shards made elsewhere")
    a.add_argument("shards", help="brace pattern, directory of .tar files or shard-list file")
    a.add_argument("--out", default=None, help="index path (default: index.json beside the first shard)")
    for a in sub.choices.values():
        a.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "pack":
            path = pack(args.src, args.dst, args.shard_size, prefix=args.prefix, seed=args.seed,
                        progress=not args.no_progress)
        else:
            path = index(args.shards, args.out, progress=not args.no_progress)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"python -m aimkern.data {args.command}: {e}")
    with open(path) as f:
        desc = json.load(f)
    n = sum(s["nsamples"] for s in desc["shardlist"])
    print(f"wrote {path}: {len(desc['shardlist'])} shard(s), {n} samples")


if __name__ == "__main__":
    main()
