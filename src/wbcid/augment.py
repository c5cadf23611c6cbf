"""Training-time augmentation, applied to whole batches with per-sample random parameters.

Runs on the in-memory uint8 batch after it is scaled to [0, 1] (kornia draws parameters per
sample, so a batch of 32 costs one vectorised call instead of 32 PIL pipelines). Cells have no
preferred orientation, hence full rotations and flips; colour jitter stands in for the
lab-to-lab differences in stain and camera.
"""

from __future__ import annotations

import kornia.augmentation as K
from torch import nn


def train_augmentation() -> nn.Module:
    """The default training augmentation (geometry and mild colour), for [0, 1] NCHW batches."""
    return nn.Sequential(
        K.RandomHorizontalFlip(),
        K.RandomVerticalFlip(),
        K.RandomAffine(degrees=180, translate=(0.05, 0.05), scale=(0.9, 1.1), padding_mode="reflection", p=1.0),
        K.ColorJitter(brightness=0.15, contrast=0.15, saturation=0.15, hue=0.02, p=0.8),
    )
