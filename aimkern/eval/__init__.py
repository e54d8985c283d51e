"""``python -m aimkern.eval``: frozen-feature probes of a CausalViT on labelled data.

AIM's attentive probe, a linear probe and DINO's weighted k-NN, each beside the same probe on a random-init
model of the same config. Modules: ``args`` (the command line), ``models`` (the trunk from a run, a preset or
timm, and its random-init twin), ``data`` (digits, ImageFolder trees), ``features`` (full-attention, layer-
averaged extraction, split across torchrun ranks), ``cache`` (memory-mapped on-disk features), ``probes``
(attentive, linear, knn), ``report`` (the table), ``run`` (the whole evaluation).
"""
from .args import build_parser, parse_args


def evaluate(argv=None) -> dict:
    """Parse ``argv`` (a list of command-line words; default sys.argv[1:]), evaluate, return the report."""
    from .run import run

    return run(parse_args(argv))


__all__ = ["build_parser", "evaluate", "parse_args"]
