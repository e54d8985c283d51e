"""``python -m aimkern.train``: AIM-style autoregressive pretraining of a CausalViT.

One process, or many through ``torchrun`` (DDP, or FSDP2 with ``--fsdp``). Run ``python -m aimkern.train
--help`` for the options.

The step is public: ``build_run(args) -> Run`` builds the model, optimizer, schedule and autocast of a run,
and ``train_step(run, batch, step) -> StepOut`` does one step (prefix, forward, backward, clipping, AdamW,
schedule); ``benchmarks/pretrain_throughput.py`` times that same step. To try a kernel in training, change
the model or the step, not the loop.

The options are one ``TrainConfig`` dataclass (``config``): each field carries its default, --help text and
resume rule, and the parser, run.json and the README's list of what --resume may change come from it.

Modules: ``config`` (the options), ``args`` (the command line), ``step`` (the step), ``session`` (setup before the first step),
``loop`` (the loop over the step), ``metering`` (loss window, metrics.jsonl, progress), ``summary``
(summary.json, --probe), ``state`` (what a checkpoint holds, restoring it), ``checkpoint`` (atomic files,
keep-K, fallback), ``resume`` (which options a resume keeps), ``preemption`` (SIGTERM / SIGUSR1),
``bad_samples`` (unreadable samples over all ranks), ``model`` (build + activation checkpointing),
``schedule`` (AdamW + warmup / cosine), ``tokens`` (token objective), ``probe``, ``errors`` (exit statuses).
Data streams are in ``aimkern.data``, process groups in ``aimkern.distributed``.
"""
from .args import build_parser, parse_args
from .config import TrainConfig


def train(argv=None) -> dict:
    """Parse ``argv`` (a list of command-line words; default sys.argv[1:]), train, return the run's summary.

    Raises ``errors.RunError`` (one-line message) or ``errors.Preempted`` when the run stops on purpose."""
    args = parse_args(argv)  # first: --help and option errors answer before torch is imported
    from .loop import run

    return run(args)


def __getattr__(name: str):
    """``build_run``, ``train_step``, ``Run`` and ``StepOut`` load on first use (they import torch; --help must not)."""
    if name in ("build_run", "train_step", "Run", "StepOut"):
        from . import step

        return getattr(step, name)
    raise AttributeError(f"module 'aimkern.train' has no attribute {name!r}")


__all__ = ["Run", "StepOut", "TrainConfig", "build_parser", "build_run", "parse_args", "train", "train_step"]
