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

from .common import Rows, fit_cross_entropy, in_order, topk_accuracy


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
    fit_cross_entropy(lambda rows: layer((rows - mean) / std), opt, xs, ys, epochs=cfg.epochs,
                      batch_size=cfg.batch_size, warmup_epochs=cfg.warmup_epochs, generator=gen, desc=desc,
                      progress=progress)
    with torch.no_grad():
        vs = Rows(val_x, device)
        scores = torch.cat([layer((vs[idx] - mean) / std).cpu() for _, idx in in_order(vs.n, 4096)])
    return topk_accuracy(scores, torch.from_numpy(np.array(val_y, dtype=np.int64)), num_classes)
