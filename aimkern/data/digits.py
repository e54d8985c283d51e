"""scikit-learn's bundled 8x8 digits (no download): the CPU toy's pretraining data and the probes' labels."""
from __future__ import annotations

from typing import Tuple

import numpy as np
import torch
import torch.nn.functional as F

DIGITS_TEST_FRACTION = 0.25
# Mean and std of the 8x8 digits in [0, 1] (the whole set), to standardize the inputs.
DIGITS_MEAN, DIGITS_STD = 0.3053, 0.3761


def digits_split() -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn's digits as (x_train (n, 1, 8, 8) in [0, 1], y_train (n,), x_test, y_test), a fixed
    stratified split (75 / 25). Pretraining uses only x_train; the probes fit on train and score on test."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.from_numpy(digits.images.astype(np.float32) / 16.0).unsqueeze(1)
    y = torch.from_numpy(digits.target.astype(np.int64))
    idx_train, idx_test = train_test_split(
        np.arange(len(y)), test_size=DIGITS_TEST_FRACTION, random_state=0, stratify=digits.target
    )
    idx_train, idx_test = torch.from_numpy(idx_train), torch.from_numpy(idx_test)
    return x[idx_train], y[idx_train], x[idx_test], y[idx_test]


def digits_to_images(x8: torch.Tensor, img_size: int, in_chans: int) -> torch.Tensor:
    """(B, 1, 8, 8) digits in [0, 1] -> (B, in_chans, img_size, img_size), bilinearly upsampled and standardized."""
    x = F.interpolate(x8, size=(img_size, img_size), mode="bilinear", align_corners=False)
    x = (x - DIGITS_MEAN) / DIGITS_STD
    return x.expand(-1, in_chans, -1, -1).contiguous()
