"""``python -m aimkern.train --native``: the stream of packs and the step on a pack.

The data (``aimkern.data.native``): each image at its own aspect ratio with at most ``--max-patches`` patches,
packed first fit into ``--tokens-per-batch`` tokens per rank, the tail padding sequences with no loss,
AIM's prefix drawn per image in [1, n_i - 1]. The step: the pack's loss (``CausalViT.forward_packed``, the
mean over its counted targets), weighted by this rank's share of the global step's targets (summed over the
ranks on the CPU control group: no GPU sync), then the dense step's backward, clipping and optimizer.

A checkpoint holds each rank's packer position (``state()``), so ``--resume`` forms the same packs; the
packer runs in the main process, so the worker count changes nothing. A resume on another number of
processes is refused (each rank packs its own positions).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.distributed as dist

from ..data.native import NativePackStream, counted_targets
from ..distributed import DistEnv
from .step import Run, StepOut, optimize

MIN_PATCHES_FRACTION = 4  # sequences per pack: up to 4x as many images as full-budget ones fit


def max_images(tokens: int, max_patches: int) -> int:
    """Images a pack may hold (its sequences are this + 1, the padding): 4 x tokens / max_patches, which an
    image of at least a quarter of the budget (any aspect ratio within 1:4 at 16+ patches) never exceeds;
    more small images wait for the next pack."""
    return max(1, MIN_PATCHES_FRACTION * tokens // max_patches)


def native_stream(args, env: DistEnv, cfg, *, first_step: int, state: Optional[dict]) -> NativePackStream:
    """This rank's pack stream for ``args`` from the packer ``state`` (None: the run's beginning)."""
    return NativePackStream(
        args.data, patch_size=cfg.patch_size, in_chans=cfg.in_chans, max_patches=args.max_patches,
        tokens=args.tokens_per_batch, max_images=max_images(args.tokens_per_batch, args.max_patches),
        offset=cfg.block_size, prefix=cfg.prefix and cfg.is_causal, rank=env.rank, world=env.world,
        seed=args.seed, first_step=first_step, workers=args.workers, state=state)


def _global(values, env: DistEnv) -> list:
    """Host ints summed over the ranks (CPU control group)."""
    if not env.distributed:
        return list(values)
    t = torch.tensor(list(values), dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=env.control)
    return t.tolist()


def train_step_native(run: Run, pack, step: int) -> Tuple[StepOut, int]:
    """One optimizer step on this rank's CPU pack; returns (the step's output, images of all ranks)."""
    count_local = counted_targets(pack, run.core.config.block_size)
    count_global, images = _global((count_local, pack.num_images), run.env)
    device = run.env.device
    pack = pack.to(device, non_blocking=device.type == "cuda")
    lr = run.scheduler.get_last_lr()[0]
    with run.autocast():
        loss = run.forward(pack)
    grad_norm = optimize(run, loss, run.env.world * count_local / max(count_global, 1))
    return StepOut(loss=loss.detach(), targets=count_local, grad_norm=grad_norm, lr=lr), images
