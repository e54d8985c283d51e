"""Command-line options of ``python -m aimkern.eval`` (argparse; ``--help`` documents every one)."""
from __future__ import annotations

import argparse
import json
import os
from typing import Optional, Sequence

from ..argtypes import non_negative_float, positive_float, positive_int
from ..backends import BACKENDS
from ..models.config import PRESETS
from .probes import PROBES

DESCRIPTION = """\
Frozen-feature probes of a CausalViT: AIM's attentive probe, a linear probe and DINO's weighted k-NN,
each beside the same probe on a random-init model of the same config (the baseline).

MODEL is a training run's directory (or its checkpoint.pt), a preset name (a random init), or timm:NAME
(a timm ViT converted with CausalViT.from_timm). Features come from full attention (is_causal=False),
averaged over --layers, extracted once (bf16 autocast on CUDA) and cached on disk as memory-mapped arrays
that later probes and reruns reuse. Under torchrun the extraction is split across the ranks (NCCL on
GPUs, gloo on CPUs) and rank 0 trains the probes. With no options it evaluates on scikit-learn's bundled
digits (nothing is downloaded) in well under a minute on a CPU.
"""

EPILOG = """\
examples:
  python -m aimkern.train --out runs/x && python -m aimkern.eval runs/x       # pretrain, then probe
  python -m aimkern.eval runs/x --probes attentive --layers last:2            # one probe, other layers
  python -m aimkern.eval runs/vitb --train /data/imagenet/train --val /data/imagenet/val --batch-size 256
  torchrun --nproc-per-node 8 -m aimkern.eval runs/vitb --train T --val V     # extraction on 8 GPUs
  python -m aimkern.eval timm:aimv2_large_patch14_224 --train T --val V       # a timm model
  python -m aimkern.eval --init aim_600m_backbone.pth --head aim_600m_head_best.pth --data /imagenet/val
                                   # Apple's released AIM classifier (--init --help lists its options)
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m aimkern.eval", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", metavar="MODEL",
                   help="a training run's directory or checkpoint file, a preset (random init: "
                   f"{', '.join(sorted(PRESETS))}), or timm:NAME")
    g = p.add_argument_group("model")
    g.add_argument("--preset", default=None, choices=sorted(PRESETS),
                   help="check that the checkpoint is this preset (an error otherwise); needed for a plain "
                   "state-dict file")
    g.add_argument("--img-size", type=positive_int, default=None,
                   help="image size of a preset at random init (a checkpoint keeps its own)")
    g.add_argument("--num-heads", type=positive_int, default=None,
                   help="heads of a checkpoint in another layout whose width no released model has (its shapes "
                   "do not hold the head count)")
    g.add_argument("--init-seed", type=int, default=None,
                   help="seed of the random init (the baseline, or a preset MODEL) (default: the run's --seed, "
                   "i.e. the very weights pretraining started from; 0 for presets and timm)")
    g.add_argument("--weights", default=None, help="timm:NAME: load this state-dict file instead of timm's hub")
    g.add_argument("--timm-kwargs", type=json.loads, default={},
                   help="timm:NAME: JSON of timm.create_model options, e.g. '{\"img_size\": 224}'")
    g.add_argument("--no-baseline", action="store_true", help="skip the random-init baseline")
    g.add_argument("--backend", default="auto", choices=BACKENDS,
                   help="aimkern op backend: 'auto' runs Triton on CUDA and the reference on CPU (default)")

    g = p.add_argument_group("data")
    g.add_argument("--data", default="digits",
                   help="'digits': scikit-learn's 8x8 digits, its fixed 75/25 train/test split, nothing is "
                   "downloaded (default; ignored when --train/--val are given)")
    g.add_argument("--train", default=None, help="labelled ImageFolder tree the probes are fitted on")
    g.add_argument("--val", default=None,
                   help="labelled ImageFolder tree they are scored on (its classes must all be in --train)")
    g.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="DataLoader workers per rank for ImageFolder trees (default: min(8, CPUs))")

    g.add_argument("--native", action="store_true",
                   help="features at native resolution: each --train / --val image whole, at its own aspect "
                   "ratio with at most --max-patches patches, packed (linear and knn probes; no cache)")
    g.add_argument("--max-patches", type=positive_int, default=None,
                   help="--native: the most patches an image's grid may have (default: the model's)")

    g = p.add_argument_group("features")
    g.add_argument("--layers", default=None,
                   help="blocks whose outputs are averaged: comma-separated indices (negative from the end), "
                   "'last:K', or 'final' (the output of the final norm) (default: AIM's, the last quarter "
                   "of the blocks, at least 1 and at most 6)")
    g.add_argument("--batch-size", type=positive_int, default=128, help="extraction batch per rank (default: 128)")
    g.add_argument("--feature-dtype", default="auto", choices=("auto", "float32", "float16"),
                   help="dtype of the cached features: 'auto' is float16 on CUDA (extracted in bf16, which "
                   "float16 holds exactly up to 65504) and float32 on the CPU")
    g.add_argument("--cache-dir", default=None, help="feature cache (default: OUT/features)")
    g.add_argument("--no-cache", action="store_true",
                   help="extract into memory, neither reading nor writing the cache (one process only)")

    g = p.add_argument_group("probes")
    g.add_argument("--probes", default=",".join(PROBES),
                   help=f"comma-separated subset of {','.join(PROBES)} (default: all)")
    g.add_argument("--seed", type=int, default=0, help="seed of every probe's initialization and batch order")
    g.add_argument("--attn-epochs", type=positive_int, default=50, help="attentive: epochs (default: 50)")
    g.add_argument("--attn-batch-size", type=positive_int, default=128, help="attentive: batch (default: 128)")
    g.add_argument("--attn-lr", type=positive_float, default=1e-2, help="attentive: peak AdamW lr (default: 1e-2)")
    g.add_argument("--attn-weight-decay", type=non_negative_float, default=0.05,
                   help="attentive: AdamW weight decay on the matrices (default: 0.05)")
    g.add_argument("--attn-warmup-epochs", type=non_negative_float, default=5.0,
                   help="attentive: linear warmup epochs before the cosine decay (default: 5)")
    g.add_argument("--attn-queries", type=positive_int, default=1,
                   help="attentive: learned queries, averaged after attention (default: 1, as AIM)")
    g.add_argument("--attn-heads", type=positive_int, default=None,
                   help="attentive: attention heads (default: the model's)")
    g.add_argument("--linear-epochs", type=positive_int, default=100, help="linear: epochs (default: 100)")
    g.add_argument("--linear-batch-size", type=positive_int, default=256, help="linear: batch (default: 256)")
    g.add_argument("--linear-lr", type=positive_float, default=5e-2, help="linear: peak AdamW lr (default: 5e-2)")
    g.add_argument("--linear-weight-decay", type=non_negative_float, default=1e-3,
                   help="linear: AdamW weight decay (default: 1e-3)")
    g.add_argument("--knn-k", type=positive_int, default=20, help="knn: neighbours (default: 20, as DINO)")
    g.add_argument("--knn-temperature", type=positive_float, default=0.07,
                   help="knn: vote weight exp(cosine / T) (default: 0.07, as DINO)")

    g = p.add_argument_group("execution and output")
    g.add_argument("--device", default=None,
                   help="'cuda' or 'cpu' (default: cuda when available; under torchrun cuda:LOCAL_RANK)")
    g.add_argument("--threads", type=positive_int, default=None,
                   help="CPU intra-op threads (default: $OMP_NUM_THREADS if set, else 1, as aimkern.train)")
    g.add_argument("--out", default=None,
                   help="output directory for eval.json (default: MODEL/eval for a run directory, else "
                   "runs/eval/<name>)")
    g.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    probes = [s.strip() for s in args.probes.split(",") if s.strip()]
    bad = sorted(set(probes) - set(PROBES))
    if bad or not probes:
        parser.error(f"--probes: choose from {','.join(PROBES)}, got {args.probes!r}")
    args.probes = [p for p in PROBES if p in probes]
    if bool(args.train) != bool(args.val):
        parser.error("--train and --val go together: give both ImageFolder trees")
    if args.max_patches is not None and not args.native:
        parser.error("--max-patches needs --native")
    if args.native:
        from .native import check_native

        try:
            check_native(args, args.max_patches)
        except ValueError as e:
            parser.error(str(e))
    if args.out is None:
        if os.path.isdir(args.model):
            args.out = os.path.join(args.model, "eval")
        else:
            name = os.path.splitext(os.path.basename(os.path.normpath(args.model)))[0].replace(":", "-")
            args.out = os.path.join("runs", "eval", name)
    if args.cache_dir is None:
        args.cache_dir = os.path.join(args.out, "features")
    return args
