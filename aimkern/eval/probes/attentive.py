"""AIM's attentive probe: learned queries cross-attend over the frozen patch features, then a linear classifier.

As in AIM (El-Nouby et al., 2024; Apple's ml-aim ``AttentionPoolingClassifier``): the patch features are
batch-normalized without affine parameters, keys and values are linear maps of them (no bias), the learned
query (or queries, averaged after attention) is the multi-head attention's query (no projection), and a
linear layer maps the pooled vector to the classes. It is trained with AdamW and a linear-warmup + cosine
schedule; only the head learns, the trunk's features are the cached arrays.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .common import Rows, fit_cross_entropy, in_order, topk_accuracy


class AttentivePoolingHead(nn.Module):
    """(B, N, dim) patch features -> (B, num_classes) logits through ``num_queries`` learned queries."""

    def __init__(self, dim: int, num_classes: int, num_heads: int, num_queries: int = 1):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"attentive probe: dim={dim} is not divisible by num_heads={num_heads}")
        self.num_heads, self.num_queries = num_heads, num_queries
        self.bn = nn.BatchNorm1d(dim, affine=False, eps=1e-6)
        self.k = nn.Linear(dim, dim, bias=False)
        self.v = nn.Linear(dim, dim, bias=False)
        self.query = nn.Parameter(torch.randn(1, num_queries, dim) * 0.02)
        self.linear = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        h = self.num_heads
        x = self.bn(x.transpose(1, 2)).transpose(1, 2)  # BatchNorm1d normalizes dim over (B, N)
        q = self.query.expand(b, -1, -1).reshape(b, self.num_queries, h, d // h).transpose(1, 2)  # (B, H, Q, D/H)
        k = self.k(x).reshape(b, n, h, d // h).transpose(1, 2)  # (B, H, N, D/H)
        v = self.v(x).reshape(b, n, h, d // h).transpose(1, 2)
        pooled = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, self.num_queries, d)
        return self.linear(pooled.mean(dim=1))  # queries averaged, as ml-aim's average_pool


@dataclass
class AttentiveConfig:
    # Sized for small labelled sets (the digits: 50 x 10 steps); AIM trains 100 epochs at batch 1024 on
    # ImageNet with a swept lr: pass --attn-* for large data.
    epochs: int = 50
    batch_size: int = 128
    lr: float = 1e-2
    weight_decay: float = 0.05
    warmup_epochs: float = 5.0
    num_queries: int = 1


def train_attentive(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray, *,
                    num_classes: int, num_heads: int, cfg: AttentiveConfig, device: torch.device, seed: int,
                    progress: bool = False, desc: str = "attentive") -> dict:
    """Fit the head on (n, N, dim) ``train_x`` and score it on ``val_x``: {"top1", "top5"}."""
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = AttentivePoolingHead(train_x.shape[2], num_classes, num_heads, cfg.num_queries).to(device)
    decay = [p for name, p in head.named_parameters() if p.ndim == 2 and name != "query"]
    rest = [p for name, p in head.named_parameters() if not (p.ndim == 2 and name != "query")]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": rest, "weight_decay": 0.0}], lr=cfg.lr)
    xs, ys = Rows(train_x, device), torch.from_numpy(np.array(train_y, dtype=np.int64)).to(device)
    head.train()
    fit_cross_entropy(head, opt, xs, ys, epochs=cfg.epochs, batch_size=cfg.batch_size,
                      warmup_epochs=cfg.warmup_epochs, generator=gen, desc=desc, progress=progress)
    return evaluate(head, val_x, val_y, num_classes, device, cfg.batch_size)


@torch.no_grad()
def evaluate(head: nn.Module, val_x: np.ndarray, val_y: np.ndarray, num_classes: int, device: torch.device,
             batch_size: int) -> dict:
    head.eval()
    xs = Rows(val_x, device)
    scores = torch.cat([head(xs[idx]).float().cpu() for _, idx in in_order(xs.n, batch_size)])
    return topk_accuracy(scores, torch.from_numpy(np.array(val_y, dtype=np.int64)), num_classes)
