"""Command-line options of ``python -m aimkern.train`` (argparse; ``--help`` documents every one).

Everything that can be checked before setup is checked here, as an argparse error (exit status 2, one line):
the model geometry (through ``ViTConfig``), the device, the tokenizer file, the batch against torchrun's
world size, the learning rate. Imports stay light (no torch unless ``--device`` needs it) so that
``--help`` answers at once.
"""
from __future__ import annotations

import argparse
import os
import sys
import textwrap
from typing import Optional, Sequence

from ..data.shards import is_shard_spec
from ..argtypes import non_negative_float, non_negative_int, positive_float, positive_int
from ..models.config import PRESETS, ViTConfig
from . import init_from, resume
from .errors import PREEMPTED_EXIT_CODE

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
  python -m aimkern.train --out runs/x --resume --steps 600         # extend it: the cosine is re-planned

resume: --resume takes the run's options from OUT/run.json; options given again must match, except
  {changeable}.
  Those keep the run's values when not given again, except the switches --stop-at, --probe, --no-progress,
  --compile, --checkpointing and --fsdp, which apply to one invocation.
  --steps extends (or shortens, not below the checkpoint's step) the schedule: the cosine is re-planned from
  the current step and the banner says what the learning rate does next. A finished run resumed does only
  what was asked (e.g. --probe) and keeps its summary.

preemption: SIGTERM or SIGUSR1 finish the current step, save a checkpoint and exit with status {preempted}.

exit status: 0 done, 1 bad data or divergence, 2 bad option or a checkpoint that does not fit,
  {preempted} preempted (checkpoint saved; run again with --resume).
"""

MAX_LR = 1.0  # the divergence guard: AdamW above this diverges at once (AIM's recipe uses 1e-3 .. 2e-3)


def _epilog() -> str:
    changeable = ", ".join(resume.flag(k) for k in resume.CHANGEABLE if k not in ("resume", "out"))
    changeable = textwrap.fill(changeable, 106, subsequent_indent="  ")
    return EPILOG.format(changeable=changeable, preempted=PREEMPTED_EXIT_CODE)


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (the usage block is what --help is for)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m aimkern.train", description=DESCRIPTION, epilog=_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _model_and_data(p.add_argument_group("model and data"))
    _optimization(p.add_argument_group("optimization (AIM's recipe)"))
    _execution(p.add_argument_group("execution"))
    _output(p.add_argument_group("output"))
    return p


def _model_and_data(g) -> None:
    """--preset, --data and how it is read, the objective and its tokenizer, the op backend."""
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
    g.add_argument("--img-size", type=positive_int, default=None, help="image size in pixels (default: the preset's)")
    g.add_argument("--workers", type=non_negative_int, default=min(8, os.cpu_count() or 1),
                   help="DataLoader worker processes per rank for an ImageFolder or shards (default: min(8, CPUs))")
    g.add_argument("--objective", default="pixel", choices=("pixel", "token"),
                   help="'pixel': normalized next-patch pixels; 'token': next patch's k-means token id "
                   "(default: pixel)")
    g.add_argument("--tokenizer", default=None,
                   help="token objective: a saved KMeansPatchTokenizer to load (default: fit one on the training "
                   "data and save it as OUT/tokenizer.pt)")
    g.add_argument("--vocab-size", type=positive_int, default=None,
                   help="token objective: vocabulary of a tokenizer fitted on the fly (default: the preset's, 8192)")
    g.add_argument("--tokenizer-images", type=positive_int, default=4096,
                   help="token objective: how many training images a tokenizer fitted on the fly clusters "
                   "(default: 4096)")
    g.add_argument("--max-bad-samples", type=non_negative_float, default=0.001,
                   help="an ImageFolder or shards: a sample that fails to decode is replaced by a seeded draw (so "
                   "resume stays exact), reported on stderr and counted in metrics.jsonl / summary.json; stop when "
                   "more samples than this are bad: a count when >= 1, else a fraction of the dataset (default: "
                   "0.001, 1 in 1000)")
    g.add_argument("--backend", default="auto", choices=("auto", "triton", "reference"),
                   help="aimkern op backend: 'auto' (default) measures each op's candidates on first use and runs "
                        "the fastest correct one (aimkern.dispatch; AIMKERN_DISPATCH=fixed: Triton on CUDA, the "
                        "reference on CPU); 'triton' or 'reference' force a path")



def _optimization(g) -> None:
    """AIM's recipe: batch, steps, learning rate and schedule, weight decay, clipping, seed, precision."""
    g.add_argument("--batch-size", type=positive_int, default=64,
                   help="GLOBAL batch size, over all ranks (default: 64)")
    g.add_argument("--steps", type=positive_int, default=300, help="optimizer steps in the schedule (default: 300)")
    g.add_argument("--lr", type=positive_float, default=2e-3,
                   help=f"peak learning rate, at most {MAX_LR} (default: 2e-3)")
    g.add_argument("--min-lr", type=non_negative_float, default=0.0,
                   help="learning rate at the end of the cosine (default: 0)")
    g.add_argument("--warmup-steps", type=non_negative_int, default=None,
                   help="linear warmup steps (default: 10%% of --steps)")
    g.add_argument("--weight-decay", type=non_negative_float, default=0.05,
                   help="AdamW weight decay on matrices; biases, norms and positions get none (default: 0.05)")
    g.add_argument("--grad-clip", type=non_negative_float, default=1.0,
                   help="clip the global gradient norm; 0 disables (default: 1.0)")
    g.add_argument("--seed", type=int, default=0,
                   help="seed of the initialization, data order and prefixes (default: 0)")
    g.add_argument("--precision", default="bf16", choices=("bf16", "fp32"),
                   help="bf16 autocast on CUDA (default), or fp32; the CPU always runs fp32")



def _execution(g) -> None:
    """Where and how the steps run: device, threads, torch.compile, activation checkpointing, FSDP2."""
    g.add_argument("--device", default=None,
                   help="'cuda' or 'cpu' (default: cuda when available; under torchrun cuda:LOCAL_RANK)")
    g.add_argument("--threads", type=positive_int, default=None,
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



def _output(g) -> None:
    """The run directory, --resume, checkpoint cadence and count, logging, --stop-at, --probe."""
    g.add_argument("--out", default=None,
                   help="run directory: run.json, metrics.jsonl, checkpoint-STEP.pt (checkpoint.pt links the "
                   "latest), summary.json (default: runs/PRESET)")
    init_from.add_arguments(g)  # issue 18: --init CKPT
    g.add_argument("--resume", action="store_true",
                   help="continue exactly from OUT's latest readable checkpoint (model, optimizer, data position, "
                   "RNGs) with the run's own options (see 'resume' below)")
    g.add_argument("--keep", type=positive_int, default=2,
                   help="checkpoints kept; a corrupt latest one falls back to the one before (default: 2)")
    g.add_argument("--log-every", type=positive_int, default=10,
                   help="steps between metrics.jsonl lines (default: 10)")
    g.add_argument("--save-every", type=non_negative_int, default=100,
                   help="steps between checkpoints; 0 saves only at the end (default: 100)")
    g.add_argument("--stop-at", type=positive_int, default=None,
                   help="stop (after saving a checkpoint) at this step, as if preempted; the schedule still spans "
                   "--steps, so a later --resume continues the same run (time-limited jobs)")
    g.add_argument("--probe", action="store_true",
                   help="after training: linear probe (logistic regression) on frozen, mean-pooled full-attention "
                   "features of the digits train/test split, beside the same probe on a random-init model")
    g.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")


def given_options(argv: Optional[Sequence[str]]) -> set:
    """The destinations the command line sets explicitly (a parse where no option has a default)."""
    probe = build_parser()
    for action in probe._actions:
        action.default = argparse.SUPPRESS  # only what the command line sets is left in the namespace
    return set(vars(probe.parse_args(argv)))


def run_options(args: argparse.Namespace) -> dict:
    """The options that describe the run (saved in OUT/run.json and every checkpoint)."""
    return {k: v for k, v in vars(args).items() if not k.startswith("_")}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse and check ``argv``; with --resume, merge in the run's saved options (see ``resume``)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    given = given_options(argv)
    init_from.check_args(parser, args, given)  # issue 18: --init CKPT (may set --preset)
    if args.out is None:
        args.out = os.path.join("runs", args.preset)
    if args.resume:
        saved = resume.saved_options(args.out)
        if saved is not None:
            merged, diffs = resume.merge(vars(args), given, saved)
            if diffs:
                parser.error(f"--resume: {args.out} holds a run with other options: {'; '.join(diffs)}. Leave them "
                             "out to continue that run, or use another --out for a new one")
            args = argparse.Namespace(**merged)
    if args.warmup_steps is None:
        args.warmup_steps = max(1, args.steps // 10) if args.steps > 1 else 0
    _check(parser, args)
    args._given = sorted(given)
    return args


def _check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Every check that needs no setup; each failure is ``parser.error`` (one line, exit status 2)."""
    if args.warmup_steps > args.steps:
        parser.error(f"--warmup-steps ({args.warmup_steps}) must be at most --steps ({args.steps})")
    if args.lr > MAX_LR:
        parser.error(f"--lr {args.lr} is above {MAX_LR}: AdamW diverges at once (AIM uses 1e-3 .. 2e-3)")
    if not args.min_lr <= args.lr:
        parser.error(f"--min-lr must be in [0, --lr={args.lr}], got {args.min_lr}")
    if args.stop_at is not None and args.stop_at > args.steps:
        parser.error(f"--stop-at ({args.stop_at}) must be at most --steps ({args.steps})")
    if args.tokenizer is not None and args.objective != "token":
        parser.error("--tokenizer needs --objective token")
    if args.tokenizer is not None and not os.path.isfile(args.tokenizer):
        parser.error(f"--tokenizer {args.tokenizer}: no such file")
    shards = args.data not in ("digits", "synthetic") and is_shard_spec(args.data)
    if args.data not in ("digits", "synthetic") and not os.path.isdir(args.data) and not shards:
        parser.error(f"--data must be 'digits', 'synthetic', an existing ImageFolder directory or WebDataset shards "
                     f"(brace pattern, directory of .tar files, .txt list or .json index), got {args.data!r}")
    if args.decode == "gpu":
        from ..data.gpu_decode import gpu_decode_problem

        problem = "--decode gpu reads WebDataset shards only" if not shards else gpu_decode_problem(args.device)
        if problem:
            parser.error(problem)
    _check_model(parser, args)
    _check_world(parser, args)
    if args.device is not None:
        _check_device(parser, args.device)


def _check_model(parser, args) -> None:
    """The preset with this run's overrides must be a valid ViTConfig (image size vs patch, vocabulary, ...)."""
    preset = PRESETS[args.preset]
    if args.img_size is not None and args.img_size % preset.patch_size:
        parser.error(f"--img-size {args.img_size} must be a multiple of {args.preset}'s patch size "
                     f"{preset.patch_size}")
    overrides = {"head": args.objective}
    if args.img_size is not None:
        overrides["img_size"] = args.img_size
    if args.objective == "token" and args.vocab_size is not None:
        overrides["vocab_size"] = args.vocab_size
    try:
        ViTConfig.from_preset(args.preset, **overrides)
    except ValueError as e:
        parser.error(f"--preset {args.preset} with --img-size / --vocab-size: {e}")


def _check_world(parser, args) -> None:
    """Under torchrun the global batch must split evenly; rank 0 alone says so (the others exit quietly)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.batch_size % world:
        if int(os.environ.get("RANK", "0")) != 0:
            sys.exit(2)
        parser.error(f"--batch-size {args.batch_size} must be a multiple of the number of processes ({world})")


def _check_device(parser, device: str) -> None:
    import torch  # only here: --help and the other checks must not pay for it

    try:
        dev = torch.device(device)
    except RuntimeError:
        parser.error(f"--device {device!r} is not a device (use 'cpu', 'cuda' or 'cuda:N')")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            parser.error(f"--device {device}: no CUDA GPU is visible to torch")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            parser.error(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type != "cpu":
        parser.error(f"--device {device}: aimkern.train runs on 'cpu' or 'cuda'")
