"""Linear probe: is the pretrained trunk's representation better than a random one?

Frozen features (full attention, mean-pooled over the patches) of the digits train/test split, standardized,
then scikit-learn's multinomial logistic regression fitted on train and scored on test. The same probe on a
randomly initialized model of the same preset is the baseline the pretrained model must beat.
"""
from __future__ import annotations

import numpy as np
import torch

from ..models import CausalViT
from .data import digits_split, digits_to_images


@torch.no_grad()
def pooled_features(model: CausalViT, x8: torch.Tensor, device: torch.device, batch_size: int = 256) -> np.ndarray:
    """(n, dim) float32 features: ``forward_features(is_causal=False)`` averaged over the N patches, for the
    (n, 1, 8, 8) digits ``x8`` brought to the model's image size and channels."""
    cfg = model.config
    was_training = model.training
    model.eval()
    feats = []
    for chunk in x8.split(batch_size):
        images = digits_to_images(chunk.to(device), cfg.img_size, cfg.in_chans)
        feats.append(model.forward_features(images, is_causal=False).float().mean(dim=1).cpu())
    model.train(was_training)
    return torch.cat(feats).numpy()


def probe_accuracy(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray) -> float:
    """Test accuracy of a logistic regression on standardized features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000))
    clf.fit(train_x, train_y)
    return float(clf.score(test_x, test_y))


def linear_probe(model: CausalViT, device: torch.device) -> float:
    """Digits test accuracy of a linear probe on ``model``'s frozen, mean-pooled full-attention features."""
    x_train, y_train, x_test, y_test = digits_split()
    return probe_accuracy(
        pooled_features(model, x_train, device), y_train.numpy(),
        pooled_features(model, x_test, device), y_test.numpy(),
    )


def compare(pretrained: CausalViT, random_init: CausalViT, device: torch.device) -> dict:
    """Probe accuracies of the pretrained model and of a random-init model of the same preset."""
    return {
        "probe_pretrained": linear_probe(pretrained, device),
        "probe_random_init": linear_probe(random_init, device),
    }
