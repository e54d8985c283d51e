"""Command-line options of ``python -m aimkern.train`` (argparse; ``--help`` documents every one)."""
from __future__ import annotations

import argparse
import os
from typing import Optional, Sequence

from ..data.shards import is_shard_spec
from ..models.config import PRESETS

DESCRIPTION = """\
AIM-style autoregressive (next-patch) pretraining of a CausalViT.

Defaults are AIM's recipe: AdamW (betas 0.9, 0.95), weight decay 0.05, linear warmup then cosine decay,
gradient clipping at 1.0, bf16 autocast on CUDA, prefix sampling on, full attention for evaluation.
With no arguments it pretrains vit-tiny on scikit-learn's bundled digits on the CPU in about a minute.
Under torchrun it runs DistributedDataParallel (or FSDP2 with --fsdp); --batch-size is global.
"""

EPILOG = """\
examples:
  python -m aimkern.train --probe                                   # the CPU toy, with a linear probe
  python -m aimkern.train --preset vit-b16 --data /data/imagenet/train --batch-size 1024 --steps 100000 \\
      --lr 1.5e-3 --compile --out runs/vit-b16
  torchrun --nproc-per-node 8 -m aimkern.train --preset aim-600m --data /data/train --fsdp --checkpointing
  python -m aimkern.train --out runs/x --resume                     # continue exactly where runs/x stopped
"""


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an int >= 1, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an int >= 0, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a float > 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m aimkern.train", description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = p.add_argument_group("model and data")
    g.add_argument("--preset", default="vit-tiny", choices=sorted(PRESETS), help="model preset (default: vit-tiny)")
    g.add_argument(
        "--data", default="digits",
        help="'digits' (scikit-learn's 8x8 digits, upsampled; nothing is downloaded), 'synthetic' (random "
        "images, for throughput), the path of an ImageFolder tree (class sub-folders of images), or WebDataset "
        "shards: a brace pattern ('shards/train-{000000..000127}.tar'), a directory of .tar files, or a "
        "shard-list (.txt) / index (.json) file, see python -m aimkern.data (default: digits)",
    )
    g.add_argument("--decode", default="cpu", choices=("cpu", "gpu"),
                   help="shards: decode JPEGs in the DataLoader workers with PIL (draft mode), or in batches on the "
                   "GPU with nvJPEG (needs CUDA) (default: cpu)")
    g.add_argument("--img-size", type=_positive_int, default=None, help="image size in pixels (default: the preset's)")
    g.add_argument("--workers", type=_non_negative_int, default=min(8, os.cpu_count() or 1),
                   help="DataLoader worker processes per rank for an ImageFolder or shards (default: min(8, CPUs))")
    g.add_argument("--objective", default="pixel", choices=("pixel", "token"),
                   help="'pixel': normalized next-patch pixels; 'token': next patch's k-means token id "
                   "(default: pixel)")
    g.add_argument("--tokenizer", default=None,
                   help="token objective: a saved KMeansPatchTokenizer to load (default: fit one on the training "
                   "data and save it as OUT/tokenizer.pt)")
    g.add_argument("--vocab-size", type=_positive_int, default=None,
                   help="token objective: vocabulary of a tokenizer fitted on the fly (default: the preset's, 8192)")
    g.add_argument("--tokenizer-images", type=_positive_int, default=4096,
                   help="token objective: how many training images a tokenizer fitted on the fly clusters "
                   "(default: 4096)")
    g.add_argument("--backend", default="auto", choices=("auto", "triton", "reference"),
                   help="aimkern op backend: 'auto' runs Triton kernels on CUDA and the reference on CPU (default)")

    g = p.add_argument_group("optimization (AIM's recipe)")
    g.add_argument("--batch-size", type=_positive_int, default=64,
                   help="GLOBAL batch size, over all ranks (default: 64)")
    g.add_argument("--steps", type=_positive_int, default=300, help="optimizer steps in the schedule (default: 300)")
    g.add_argument("--lr", type=_positive_float, default=2e-3, help="peak learning rate (default: 2e-3)")
    g.add_argument("--min-lr", type=float, default=0.0, help="learning rate at the end of the cosine (default: 0)")
    g.add_argument("--warmup-steps", type=_non_negative_int, default=None,
                   help="linear warmup steps (default: 10%% of --steps)")
    g.add_argument("--weight-decay", type=float, default=0.05,
                   help="AdamW weight decay on matrices; biases, norms and positions get none (default: 0.05)")
    g.add_argument("--grad-clip", type=float, default=1.0,
                   help="clip the global gradient norm; 0 disables (default: 1.0)")
    g.add_argument("--seed", type=int, default=0,
                   help="seed of the initialization, data order and prefixes (default: 0)")
    g.add_argument("--precision", default="bf16", choices=("bf16", "fp32"),
                   help="bf16 autocast on CUDA (default), or fp32; the CPU always runs fp32")

    g = p.add_argument_group("execution")
    g.add_argument("--device", default=None,
                   help="'cuda' or 'cpu' (default: cuda when available; under torchrun cuda:LOCAL_RANK)")
    g.add_argument("--threads", type=_positive_int, default=None,
                   help="CPU intra-op threads (default: $OMP_NUM_THREADS if set, else 1: the CPU toy's ops are too "
                   "small to gain from more, and extra threads stall when the cores are shared)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--compile-backend", default="inductor",
                   help="torch.compile backend with --compile (default: inductor; 'aot_eager' traces without codegen)")
    g.add_argument("--checkpointing", action="store_true",
                   help="activation checkpointing: recompute each transformer block in the backward (less memory)")
    g.add_argument("--fsdp", action="store_true",
                   help="under torchrun: shard parameters, gradients and optimizer state with FSDP2 (fully_shard) "
                   "instead of DistributedDataParallel; for the big presets")

    g = p.add_argument_group("output")
    g.add_argument("--out", default=None,
                   help="run directory: metrics.jsonl, checkpoint.pt, summary.json (default: runs/PRESET)")
    g.add_argument("--resume", action="store_true",
                   help="continue exactly from OUT/checkpoint.pt (model, optimizer, schedule, data position, RNGs)")
    g.add_argument("--log-every", type=_positive_int, default=10,
                   help="steps between metrics.jsonl lines (default: 10)")
    g.add_argument("--save-every", type=_non_negative_int, default=100,
                   help="steps between checkpoints; 0 saves only at the end (default: 100)")
    g.add_argument("--stop-at", type=_positive_int, default=None,
                   help="stop (after saving a checkpoint) at this step, as if preempted; the schedule still spans "
                   "--steps, so a later --resume continues the same run (time-limited jobs)")
    g.add_argument("--probe", action="store_true",
                   help="after training: linear probe (logistic regression) on frozen, mean-pooled full-attention "
                   "features of the digits train/test split, beside the same probe on a random-init model")
    g.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.warmup_steps is None:
        args.warmup_steps = max(1, args.steps // 10) if args.steps > 1 else 0
    if args.warmup_steps > args.steps:
        parser.error(f"--warmup-steps ({args.warmup_steps}) must be at most --steps ({args.steps})")
    if not 0 <= args.min_lr <= args.lr:
        parser.error(f"--min-lr must be in [0, --lr={args.lr}], got {args.min_lr}")
    if args.weight_decay < 0 or args.grad_clip < 0:
        parser.error("--weight-decay and --grad-clip must be >= 0")
    if args.stop_at is not None and args.stop_at > args.steps:
        parser.error(f"--stop-at ({args.stop_at}) must be at most --steps ({args.steps})")
    if args.tokenizer is not None and args.objective != "token":
        parser.error("--tokenizer needs --objective token")
    shards = args.data not in ("digits", "synthetic") and is_shard_spec(args.data)
    if args.data not in ("digits", "synthetic") and not os.path.isdir(args.data) and not shards:
        parser.error(f"--data must be 'digits', 'synthetic', an existing ImageFolder directory or WebDataset shards "
                     f"(brace pattern, directory of .tar files, .txt list or .json index), got {args.data!r}")
    if args.decode == "gpu":
        from ..data.gpu_decode import gpu_decode_problem

        problem = "--decode gpu reads WebDataset shards only" if not shards else gpu_decode_problem(args.device)
        if problem:
            parser.error(problem)
    if args.out is None:
        args.out = os.path.join("runs", args.preset)
    return args
