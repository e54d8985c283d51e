"""Linear probe on pooled features, trained in torch (on the GPU when present) so it scales past what
scikit-learn holds in memory: features standardized with the train split's statistics, one linear layer,
cross-entropy, mini-batch AdamW with linear warmup + cosine decay. scikit-learn's logistic regression stays
the small-data reference in the tests.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .attentive import _bar
from .common import Rows, epoch_batches, in_order, steps_per_epoch, topk_accuracy, warmup_cosine


@dataclass
class LinearConfig:
    epochs: int = 100
    batch_size: int = 256
    lr: float = 5e-2
    weight_decay: float = 1e-3
    warmup_epochs: float = 5.0


def standardizer(xs: Rows, batch_size: int = 4096) -> tuple:
    """Per-feature (mean, std) of the rows, accumulated in float64 chunks (the array may be memory-mapped)."""
    s = s2 = None
    for _, idx in in_order(xs.n, batch_size):
        x = xs[idx].double()
        s = x.sum(0) if s is None else s + x.sum(0)
        s2 = (x * x).sum(0) if s2 is None else s2 + (x * x).sum(0)
    mean = s / xs.n
    std = (s2 / xs.n - mean * mean).clamp_min(0).sqrt().clamp_min(1e-6)
    return mean.float(), std.float()


def train_linear(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray, *,
                 num_classes: int, cfg: LinearConfig, device: torch.device, seed: int, progress: bool = False,
                 desc: str = "linear") -> dict:
    """Fit on (n, dim) ``train_x``, score on ``val_x``: {"top1", "top5"}."""
    gen = torch.Generator().manual_seed(seed)
    xs, ys = Rows(train_x, device), torch.from_numpy(np.array(train_y, dtype=np.int64)).to(device)
    mean, std = standardizer(xs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layer = nn.Linear(train_x.shape[1], num_classes).to(device)
    opt = torch.optim.AdamW([{"params": [layer.weight], "weight_decay": cfg.weight_decay},
                             {"params": [layer.bias], "weight_decay": 0.0}], lr=cfg.lr)
    per_epoch = steps_per_epoch(xs.n, cfg.batch_size)
    total, warmup = cfg.epochs * per_epoch, int(cfg.warmup_epochs * per_epoch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, total, warmup))
    bar = _bar(total, desc, progress)
    for _ in range(cfg.epochs):
        for idx in epoch_batches(xs.n, cfg.batch_size, gen):
            loss = F.cross_entropy(layer((xs[idx] - mean) / std), ys[idx.to(device)])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    with torch.no_grad():
        vs = Rows(val_x, device)
        scores = torch.cat([layer((vs[idx] - mean) / std).cpu() for _, idx in in_order(vs.n, 4096)])
    return topk_accuracy(scores, torch.from_numpy(np.array(val_y, dtype=np.int64)), num_classes)
