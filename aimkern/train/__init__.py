"""``python -m aimkern.train``: AIM-style autoregressive pretraining of a CausalViT.

One process, or many through ``torchrun`` (DDP, or FSDP2 with ``--fsdp``). Run ``python -m aimkern.train
--help`` for the options. Modules: ``args`` (the command line), ``data`` (resumable batch streams),
``model`` (build + activation checkpointing), ``schedule`` (AdamW + warmup/cosine), ``distributed``,
``checkpoint`` (atomic, exact resume), ``probe`` (linear probe on digits), ``tokens`` (token objective),
``loop`` (the training loop), ``resume`` (which options a resume keeps), ``preemption`` (SIGTERM / SIGUSR1),
``bad_samples`` (unreadable images), ``errors`` (exit statuses).
"""
from .args import build_parser, parse_args


def train(argv=None) -> dict:
    """Parse ``argv`` (a list of command-line words; default sys.argv[1:]), train, return the run's summary.

    Raises ``errors.RunError`` (one-line message) or ``errors.Preempted`` when the run stops on purpose."""
    args = parse_args(argv)  # first: --help and option errors answer before torch is imported
    from .loop import run

    return run(args)


__all__ = ["build_parser", "parse_args", "train"]
