"""``python -m aimkern.train --init CKPT``: continue pretraining from released (or any) weights.

``--init`` loads the trunk of a checkpoint in any layout ``CausalViT.from_checkpoint`` reads (Apple's ml-aim
AIMv1 / AIMv2, timm, transformers ``Aimv2VisionModel``, aimkern's own) into the run's freshly built model;
the prediction head, the optimizer, the schedule and the data position start fresh (step 0). ``--preset``
names the run's model; without it, the preset whose trunk the checkpoint's shapes match is used (an error
when none does). ``--init`` with ``--resume`` is an error: ``--resume`` continues an aimkern run. run.json
records ``init`` (the path) and ``init_sha256`` (the file's checksum); a later ``--resume`` of that run keeps
them and loads its own checkpoint, not the source again. Both are ``TrainConfig`` fields (config.py).
"""
from __future__ import annotations

import argparse
import os


def check_args(parser: argparse.ArgumentParser, args, given: set) -> None:
    """Validate --init against the other options, pick the preset it matches, record its checksum."""
    args.init_sha256 = None
    if "init" not in given:
        return
    if args.resume:
        parser.error("--init starts a new run from a checkpoint's weights; --resume continues an aimkern run in "
                     "--out: give one of them")
    if not os.path.isfile(args.init):
        parser.error(f"--init {args.init}: no such file")
    from ..checkpoints import inspect_checkpoint, sha256_file
    from ..checkpoints.infer import describe, matching_preset

    if "preset" not in given:
        try:
            layout, cfg = inspect_checkpoint(args.init)
        except ValueError as e:
            parser.error(f"--init {args.init}: {e}")
        preset = matching_preset(cfg)
        if preset is None:
            parser.error(f"--init {args.init} ({layout} layout, {describe(cfg)}) matches no preset: give --preset P "
                         "(a preset whose trunk fits the checkpoint)")
        args.preset = preset
    args.init_sha256 = sha256_file(args.init)


def apply(model, args, say=print) -> None:
    """Load --init's trunk into the run's new ``model`` (before it is wrapped); a no-op without --init."""
    if not getattr(args, "init", None):
        return
    from ..checkpoints import load_trunk_into

    layout = load_trunk_into(model, args.init, strict=True)
    say(f"aimkern.train: --init {args.init} ({layout} layout, sha256 {str(args.init_sha256)[:16]}...): trunk "
        f"loaded into {args.preset}; prediction head, optimizer and schedule start fresh")
