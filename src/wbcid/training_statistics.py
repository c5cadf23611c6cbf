"""What a saved model keeps from its training data, so later commands need not have it.

The batch-norm statistics of the training images (for test-time adaptation, :mod:`wbcid.testtime`),
the OOD scorer (:mod:`wbcid.ood`), fitted on the training cells' features and calibrated on the
validation cells, and the statistics of earlier layer groups that adapted models score
(:mod:`wbcid.adaptation`). Training records them at its end; :func:`refit_training_statistics`
does it again for a model trained earlier.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .data import CellSet
from .decoding import load_images
from .export import export_run
from .models import WBCNet, load_checkpoint, read_saved, save_model
from .ood import MahalanobisScore, image_features, ood_groups, stage_statistics
from .preprocess import Preprocess
from .testtime import batchnorm_statistics


def record_training_statistics(
    model_path: Path, train_images: torch.Tensor, train_set: CellSet, val_images: torch.Tensor
) -> tuple[WBCNet, torch.Tensor]:
    """Store in a saved model what later needs the training data: the batch-norm statistics of the
    training images (for :mod:`wbcid.testtime`), the OOD scorer, fitted on the training cells'
    features and calibrated on the validation cells (:mod:`wbcid.ood`), and the layer groups'
    statistics that adapted models score (:func:`wbcid.ood.stage_statistics`). Returns the model and
    the validation cells' penultimate features, so that scoring them needs no second pass."""
    model = load_checkpoint(model_path)
    features = _record_data(model, train_images, train_set)
    val_features = image_features(model, val_images)
    model.ood = MahalanobisScore.fit(features, ood_groups(train_set), val_features)
    return _save_in_place(model, model_path), val_features


def record_data_statistics(model_path: str | os.PathLike, train_set: CellSet) -> WBCNet:
    """The training cells' statistics that change none of the model's outputs: the batch-norm
    statistics (test-time AdaBN) and the layer groups' (:func:`wbcid.ood.stage_statistics`, scored
    by adapted models), for a model saved before training recorded them as it does now. Its
    weights, scorer and everything else stay as they are, so its ONNX export and every flag
    measured with it still hold (the bundled model)."""
    path = Path(model_path)
    path = path / "model.pt" if path.is_dir() else path
    model = load_checkpoint(path)
    images, cells = load_images(train_set.known(), Preprocess.of(model.config), "decoding training cells")
    _record_data(model, images, cells)
    return _save_in_place(model, path)


def _record_data(model: WBCNet, images: torch.Tensor, cells: CellSet) -> torch.Tensor:
    """Set ``model``'s batch-norm and layer groups' statistics of the training ``images`` (``cells``);
    returns their penultimate features, from the same pass as the layer groups'."""
    model.source_statistics = batchnorm_statistics(model, images)
    features, model.stage_statistics = stage_statistics(model, images, ood_groups(cells))
    return features


def _save_in_place(model: WBCNet, path: Path) -> WBCNet:
    """Write ``model`` over the file it came from, in its precision and with its other records; a
    run's ``model.pt`` also gets its ONNX export written (again: an older one would be stale)."""
    saved = read_saved(path)
    half = any(v.dtype == torch.float16 for v in saved["state_dict"].values())
    recorded = ("format", "config", "state_dict", "source_statistics", "stage_statistics")  # the model's own win
    extra = {k: v for k, v in saved.items() if k not in recorded}
    save_model(model, path, half=half, **extra)
    if path.name == "model.pt":  # a run directory's checkpoint (the bundled file keeps its own export)
        export_run(model, path.parent)
    return model


def refit_training_statistics(model_path: str | os.PathLike, train_set: CellSet, val_set: CellSet) -> WBCNet:
    """:func:`record_training_statistics` for a model trained earlier, from its training cells."""
    model = load_checkpoint(model_path)
    prep = Preprocess.of(model.config)
    train_images, train_set = load_images(train_set.known(), prep, "decoding training cells")
    val_images, _ = load_images(val_set.known(), prep, "decoding validation cells")
    path = Path(model_path)
    path = path / "model.pt" if path.is_dir() else path
    return record_training_statistics(path, train_images, train_set, val_images)[0]
