"""What a saved model keeps from its training data, so later commands need not have it.

The batch-norm statistics of the training images (for test-time adaptation, :mod:`wbcid.testtime`)
and the OOD scorer (:mod:`wbcid.ood`), fitted on the training cells' features and calibrated on
the validation cells. Training records them at its end; :func:`refit_training_statistics`
does it again for a model trained earlier.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .data import CellSet, load_images
from .models import WBCNet, load_checkpoint, save_model
from .ood import MahalanobisScore, image_features, ood_groups
from .preprocess import Preprocess
from .testtime import batchnorm_statistics


def record_training_statistics(
    model_path: Path, train_images: torch.Tensor, train_set: CellSet, val_images: torch.Tensor
) -> WBCNet:
    """Store in a saved model what later needs the training data: the batch-norm statistics of the
    training images (for :mod:`wbcid.testtime`) and the OOD scorer, fitted on the training cells'
    features and calibrated on the validation cells (:mod:`wbcid.ood`)."""
    model = load_checkpoint(model_path)
    model.source_statistics = batchnorm_statistics(model, train_images.split(128))
    model.ood = MahalanobisScore.fit(
        image_features(model, train_images), ood_groups(train_set), image_features(model, val_images)
    )
    saved = torch.load(model_path, map_location="cpu", weights_only=True)
    save_model(model, model_path, **{k: v for k, v in saved.items() if k not in ("format", "config", "state_dict")})
    return model


def refit_training_statistics(model_path: str | os.PathLike, train_set: CellSet, val_set: CellSet) -> WBCNet:
    """:func:`record_training_statistics` for a model trained earlier, from its training cells."""
    model = load_checkpoint(model_path)
    prep = Preprocess.of(model.config)
    train_images, train_set = load_images(train_set.known(), prep, "decoding training cells")
    val_images, _ = load_images(val_set.known(), prep, "decoding validation cells")
    path = Path(model_path)
    return record_training_statistics(path / "model.pt" if path.is_dir() else path, train_images, train_set, val_images)
