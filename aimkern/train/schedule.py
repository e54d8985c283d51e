"""AIM's optimization recipe: AdamW (0.9, 0.95) with decoupled weight decay, linear warmup then cosine."""
from __future__ import annotations

import math

import torch
import torch.nn as nn

BETAS = (0.9, 0.95)


def param_groups(model: nn.Module, weight_decay: float) -> list:
    """Weight decay on matrices (linear and patch weights); none on biases, norms and position embeddings."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "pos_embed" in name else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, fused: bool = False) -> torch.optim.AdamW:
    """AIM's AdamW over ``param_groups``; ``fused``: torch's single-kernel AdamW (CUDA), else its default."""
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=BETAS, fused=True if fused else None)


class WarmupCosine:
    """LR multiplier at step s: linear from 1/(warmup+1) to 1 over ``warmup`` steps, then a half cosine from 1
    down to ``min_ratio`` at ``total`` steps (held there after). A plain object so LambdaLR saves its state."""

    def __init__(self, total: int, warmup: int, min_ratio: float = 0.0):
        if total < 1 or not 0 <= warmup <= total or not 0.0 <= min_ratio <= 1.0:
            raise ValueError(f"WarmupCosine: need total >= 1, 0 <= warmup <= total, min_ratio in [0, 1]; got "
                             f"total={total}, warmup={warmup}, min_ratio={min_ratio}")
        self.total, self.warmup, self.min_ratio = total, warmup, min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / (self.warmup + 1)
        span = max(1, self.total - self.warmup)
        t = min(1.0, (step - self.warmup) / span)
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))


def build_scheduler(optimizer: torch.optim.Optimizer, *, total: int, warmup: int, lr: float, min_lr: float):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(total, warmup, min_lr / lr))


def set_step(scheduler, step: int) -> float:
    """Put ``scheduler`` (from ``build_scheduler``, built with this run's total) at ``step``: the learning
    rate of every group becomes base_lr * multiplier(step), exactly what ``step`` calls of ``scheduler.step()``
    give. A resume uses this instead of the checkpoint's scheduler state, whose total would override an
    extended ``--steps``. Returns the learning rate of the first group."""
    scheduler.last_epoch = step
    lrs = [base * fn(step) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs
    return lrs[0]


def describe(step: int, *, total: int, warmup: int, lr: float, min_lr: float) -> str:
    """What the learning rate does from ``step`` on, in words (the run's banner)."""
    f = WarmupCosine(total, warmup, min_lr / lr)
    now = lr * f(step)
    if step >= total:
        return f"lr {now:.3g} (schedule complete)"
    if step < warmup:
        return f"lr {now:.3g} at step {step + 1}, warming up to {lr:.3g} by step {warmup}, then cosine to " \
               f"{min_lr:.3g} at step {total}"
    return f"lr {now:.3g} at step {step + 1}, cosine to {min_lr:.3g} at step {total}"
