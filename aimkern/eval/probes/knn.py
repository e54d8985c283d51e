"""Weighted k-nearest-neighbour probe as DINO's (Caron et al., 2021): cosine similarity of L2-normalized
pooled features, the k = 20 nearest train samples vote for their class with weight exp(similarity / T),
T = 0.07. No training; queries are processed in chunks against the whole train matrix on the device.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .common import Rows, in_order, topk_accuracy


@dataclass
class KnnConfig:
    k: int = 20
    temperature: float = 0.07
    chunk: int = 1024  # queries per similarity matrix


@torch.no_grad()
def knn_probe(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray, *,
              num_classes: int, cfg: KnnConfig, device: torch.device) -> dict:
    """Score (n_val, dim) ``val_x`` by its neighbours in (n_train, dim) ``train_x``: {"top1", "top5"}."""
    tr = Rows(train_x, device)
    bank = torch.cat([F.normalize(tr[idx], dim=1) for _, idx in in_order(tr.n, 65536)])  # (n_train, dim)
    labels = torch.from_numpy(np.array(train_y, dtype=np.int64)).to(device)
    k = min(cfg.k, tr.n)
    vs = Rows(val_x, device)
    scores = []
    for _, idx in in_order(vs.n, cfg.chunk):
        sim = F.normalize(vs[idx], dim=1) @ bank.T  # (chunk, n_train) cosine similarities
        top_sim, top_i = sim.topk(k, dim=1)
        votes = torch.zeros(sim.shape[0], num_classes, device=device)
        votes.scatter_add_(1, labels[top_i], (top_sim / cfg.temperature).exp())
        scores.append(votes.cpu())
    return topk_accuracy(torch.cat(scores), torch.from_numpy(np.array(val_y, dtype=np.int64)), num_classes)
