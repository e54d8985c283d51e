"""Command-line options of ``python -m aimkern.train`` (argparse; ``--help`` documents every one).

The options themselves (default, type, help, resume rule) are ``TrainConfig``'s fields (config.py); the
parser is generated from them and ``parse_args`` returns a ``TrainConfig``.

Everything that can be checked before setup is checked here, as an argparse error (exit status 2, one
line): how the options fit together, the model geometry (through ``ViTConfig``), the device, the tokenizer
file, the batch against torchrun's world size, the learning rate. Imports stay light (no torch unless
``--device`` needs it) so that ``--help`` answers at once.
"""
from __future__ import annotations

import argparse
import os
import sys
import textwrap
from typing import Optional, Sequence

from ..data.shards import is_shard_spec
from ..models.config import PRESETS, ViTConfig
from . import config, init_from, resume
from .config import MAX_LR, TrainConfig
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
{rules}.
  --steps extends (or shortens, not below the checkpoint's step) the schedule: the cosine is re-planned from
  the current step and the banner says what the learning rate does next. A finished run resumed does only
  what was asked (e.g. --probe) and keeps its summary.

preemption: SIGTERM or SIGUSR1 finish the current step, save a checkpoint and exit with status {preempted}.

exit status: 0 done, 1 bad data or divergence, 2 bad option or a checkpoint that does not fit,
  {preempted} preempted (checkpoint saved; run again with --resume).
"""


def _epilog() -> str:
    rules = textwrap.fill(config.resume_rules(), 106, initial_indent="  ", subsequent_indent="  ",
                          break_on_hyphens=False)
    return EPILOG.format(rules=rules, preempted=PREEMPTED_EXIT_CODE)


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (the usage block is what --help is for)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m aimkern.train``, generated from ``TrainConfig``'s fields (config.py)."""
    p = _Parser(
        prog="python -m aimkern.train", description=DESCRIPTION, epilog=_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for title, fields in config.groups().items():
        group = p.add_argument_group(title)
        for f in fields:
            group.add_argument(config.flag(f.name), **config.argparse_kwargs(f))
    return p


def given_options(argv: Optional[Sequence[str]]) -> set:
    """The destinations the command line sets explicitly (a parse where no option has a default)."""
    probe = build_parser()
    for action in probe._actions:
        action.default = argparse.SUPPRESS  # only what the command line sets is left in the namespace
    return set(vars(probe.parse_args(argv)))


def parse_args(argv: Optional[Sequence[str]] = None) -> TrainConfig:
    """Parse and check ``argv``; with --resume, merge in the run's saved options (see ``resume``)."""
    parser = build_parser()
    args = TrainConfig(**vars(parser.parse_args(argv)))
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
            args = TrainConfig(**merged)
    if args.warmup_steps is None:
        args.warmup_steps = max(1, args.steps // 10) if args.steps > 1 else 0
    _check(parser, args)
    return args


def _check(parser: argparse.ArgumentParser, args: TrainConfig) -> None:
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
    _check_native(parser, args)
    if args.device is not None:
        _check_device(parser, args.device)


def _check_model(parser, args) -> None:
    """The preset with this run's overrides must be a valid ViTConfig (image size vs patch, vocabulary, ...)."""
    preset = PRESETS[args.preset]
    if args.img_size is not None and args.img_size % preset.patch_size:
        parser.error(f"--img-size {args.img_size} must be a multiple of {args.preset}'s patch size "
                     f"{preset.patch_size}")
    overrides = config.model_overrides(img_size=args.img_size, objective=args.objective, vocab_size=args.vocab_size)
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


def _check_native(parser, args) -> None:
    """--native's options: an ImageFolder, the pixel objective, the patch budget within the token budget
    (their defaults filled in here, so run.json records the values the run used)."""
    if not args.native:
        for name in ("max_patches", "tokens_per_batch"):
            if getattr(args, name) is not None:
                parser.error(f"{config.flag(name)} needs --native")
        return
    if args.data in ("digits", "synthetic"):
        parser.error(f"--native reads an ImageFolder directory or WebDataset shards (images at their own sizes), "
                     f"got --data {args.data!r}")
    if args.decode != "cpu":
        parser.error("--native decodes on the CPU (--decode gpu crops to squares)")
    if args.objective != "pixel":
        parser.error("--native trains the pixel objective (the token objective's tokenizer takes square images)")
    cfg = ViTConfig.from_preset(args.preset, **config.model_overrides(img_size=args.img_size))
    if args.max_patches is None:
        args.max_patches = cfg.num_patches
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.tokens_per_batch is None:
        args.tokens_per_batch = max(1, args.batch_size // world) * args.max_patches
    if args.max_patches > args.tokens_per_batch:
        parser.error(f"--max-patches {args.max_patches} must be at most --tokens-per-batch {args.tokens_per_batch}")
    if args.max_patches <= cfg.block_size:
        parser.error(f"--max-patches {args.max_patches} leaves no next patch to predict (block size "
                     f"{cfg.block_size})")
