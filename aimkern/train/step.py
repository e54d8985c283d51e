"""One training step, the piece that ``python -m aimkern.train`` loops over and the benchmark times.

``build_run(args)`` builds what a step needs (the model, DDP / FSDP2 wrapped and optionally compiled, AIM's
AdamW, the warmup + cosine schedule, autocast); ``train_step(run, batch, step)`` does one step on this rank's
rows of the global batch: AIM's prefix (the model's own ``sample_prefix_len``, from a generator seeded by
(seed, step)), the forward under bf16 autocast (CUDA), the backward, global-norm clipping, the optimizer and
the scheduler. Everything random in a step is seeded by (seed, step), so a run is a pure function of its seed
and a resumed run repeats an uninterrupted one exactly.

The loss of a batch is the mean over its counted targets (patches after the prefix). With W ranks each
rank's loss is reweighted by W * (its targets) / (all targets), so the averaged gradient of DDP / FSDP is the
gradient of the global batch's mean: ``--batch-size`` is global and a 2-process run takes the same steps as a
1-process run.

A step never waits for the GPU: the prefix is drawn on the CPU and copied without blocking, and the loss and
gradient norm come back as device tensors that the caller reads only at its logging points.
"""
from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.nn as nn

from ..data.inputs import model_input
from ..data.seeds import TAG_PREFIX, TAG_RANK, mix_seed
from ..distributed import DistEnv, setup, wrap
from ..checks import remember_validated
from ..ops.pixel_loss import target_count
from .model import build_model, enable_activation_checkpointing
from .schedule import build_optimizer, build_scheduler
from .tokens import encode, tokenizer_vocab_size


@dataclass
class Run:
    """What a training step needs. ``core`` is the plain model (its config, its prefix sampling, the module
    whose state a checkpoint holds); ``forward`` is what the step calls (DDP / FSDP2 wrapped, maybe compiled)."""

    args: Any
    env: DistEnv
    core: nn.Module
    forward: Callable
    optimizer: torch.optim.Optimizer
    scheduler: Any
    tokenizer: Any = None

    def autocast(self):
        """bf16 autocast on CUDA (``--precision bf16``, the default); nothing on the CPU."""
        if self.env.device.type == "cuda" and self.args.precision == "bf16":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()


@dataclass
class StepOut:
    """One step's results. ``loss`` (this rank's mean over its counted targets) and ``grad_norm`` (the global
    norm before clipping) are device tensors: reading them waits for the GPU, so the loop reads them only
    when it logs. ``targets``: this rank's counted targets; ``lr``: the learning rate the step used."""

    loss: torch.Tensor
    targets: int
    grad_norm: torch.Tensor
    lr: float


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_run(args, env: Optional[DistEnv] = None, *, model: Optional[nn.Module] = None, tokenizer=None,
              before_wrap: Optional[Callable[[nn.Module], None]] = None) -> Run:
    """The run ``args`` (from ``aimkern.train.parse_args``) describes, on ``env`` (default: ``setup(args.device)``).

    Every rank builds the same initialization from ``args.seed``; then each rank's torch stream is reseeded
    apart. ``model``: a ready model (anything with CausalViT's ``config``, ``sample_prefix_len`` and
    ``forward(images, prefix_len=, targets=)``), e.g. the benchmark's plain-PyTorch twin; ``tokenizer``: the
    token objective's fitted tokenizer; ``before_wrap(core)``: runs on the built model before it is wrapped
    (DDP / FSDP) and the optimizer made, e.g. ``--init``'s trunk load. No files are written."""
    env = env or setup(args.device)
    seed_everything(args.seed)
    if model is None:
        vocab = tokenizer_vocab_size(tokenizer, args.vocab_size) if tokenizer is not None else args.vocab_size
        model = build_model(args.preset, img_size=args.img_size, objective=args.objective, vocab_size=vocab,
                            backend=args.backend)
    core = model.to(env.device)
    if before_wrap is not None:
        before_wrap(core)
    if args.checkpointing:
        enable_activation_checkpointing(core)
    wrapped = wrap(core, env, args.fsdp)
    fused = env.device.type == "cuda"  # one kernel for all parameters; CPU runs keep torch's default
    optimizer = build_optimizer(core, args.lr, args.weight_decay, fused=fused)
    scheduler = build_scheduler(optimizer, total=args.steps, warmup=args.warmup_steps, lr=args.lr, min_lr=args.min_lr)
    torch.manual_seed(mix_seed(args.seed, env.rank, TAG_RANK))  # distinct per-rank streams from here on
    forward = torch.compile(wrapped, backend=args.compile_backend) if args.compile else wrapped
    return Run(args=args, env=env, core=core, forward=forward, optimizer=optimizer, scheduler=scheduler,
               tokenizer=tokenizer)


def step_prefix(run: Run, step: int):
    """AIM's prefix for this rank's rows of the global batch at ``step`` (None when the model samples none),
    with the counted targets of this rank and of the global batch. Drawn on the CPU: no GPU sync."""
    cfg, env, global_batch = run.core.config, run.env, run.args.batch_size
    local = global_batch // env.world
    rows = slice(env.rank * local, (env.rank + 1) * local)
    prefix = None
    if cfg.prefix and cfg.is_causal:
        gen = torch.Generator().manual_seed(mix_seed(run.args.seed, step, TAG_PREFIX))
        prefix = run.core.sample_prefix_len(global_batch, device="cpu", generator=gen)
    counted = target_count(global_batch, cfg.num_patches, cfg.block_size, prefix)
    local_prefix = None
    if prefix is not None:
        local_prefix = prefix[rows].to(env.device, non_blocking=True)
        # Drawn in [1, N - 1] on the CPU: the ops need not read it back from the GPU to check the range.
        remember_validated(local_prefix, cfg.num_patches)
    return local_prefix, int(counted[rows].sum()), int(counted.sum())


def train_step(run: Run, batch: torch.Tensor, step: int) -> StepOut:
    """One optimizer step on ``batch`` (this rank's rows of global step ``step``); see the module docstring.

    ``batch``: uint8 (B, C, S, S) images on the device (the image streams), normalized here, inside the
    step's autocast and before the patch embedding (``model_input``: float32, the ImageNet mean / std); or
    float32 model input (digits, synthetic), used as is. The pixel loss's targets and the token objective's
    ids both come from the normalized images."""
    prefix, count_local, count_global = step_prefix(run, step)
    lr = run.scheduler.get_last_lr()[0]
    with run.autocast():
        images = model_input(batch, run.core.config.in_chans)  # elementwise: float32 under autocast too
        targets = encode(run.tokenizer, images) if run.tokenizer is not None else None
        loss = run.forward(images, prefix_len=prefix, targets=targets)
    grad_norm = optimize(run, loss, run.env.world * count_local / count_global)
    return StepOut(loss=loss.detach(), targets=count_local, grad_norm=grad_norm, lr=lr)


def optimize(run: Run, loss: torch.Tensor, weight: float) -> torch.Tensor:
    """The step after the forward: backward of ``loss * weight`` (this rank's share of the global mean),
    global-norm clipping, the optimizer and the scheduler. Returns the gradient norm before clipping."""
    (loss * weight).backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(run.core.parameters(), run.args.grad_clip or float("inf"))
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return grad_norm
