"""Probes after pretraining (``--probe``): is the pretrained trunk's representation better than a random one?

The very code of ``python -m aimkern.eval`` on the digits train/test split: AIM's attentive probe, the linear
probe and DINO's k-NN on frozen full-attention features (AIM's default layers), for the trained model and for
the random initialization it started from. Features are extracted in memory (no cache): the run's
checkpoint is new anyway.
"""
from __future__ import annotations

import torch

from ..models import CausalViT


def compare(pretrained: CausalViT, random_init: CausalViT, device: torch.device) -> dict:
    """Probe results of the pretrained model and of a random-init model of the same config:
    ``probe_pretrained`` / ``probe_random_init`` (the linear probe's top-1, as before) and ``probe``, every
    probe's {"top1", "top5", "seconds"} per model ({"model": ..., "random init": ...})."""
    from ..eval import data as edata
    from ..eval.features import resolve_layers
    from ..eval.run import ProbeSettings, evaluate_models
    from ..distributed import DistEnv

    cfg = pretrained.config
    results = evaluate_models(
        {"model": pretrained, "random init": random_init}, edata.digits(cfg.img_size, cfg.in_chans),
        layers=resolve_layers(None, cfg.depth), settings=ProbeSettings(progress=False), env=DistEnv(device=device),
    )
    return {
        "probe_pretrained": results["model"]["linear"]["top1"],
        "probe_random_init": results["random init"]["linear"]["top1"],
        "probe": results,
    }
