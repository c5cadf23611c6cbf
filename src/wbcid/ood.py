"""Knowing when not to answer: an out-of-distribution score for every prediction.

A softmax always sums to one, so a platelet or a photo of a cat still gets a confident class.
The network's penultimate features know better: cells of the five types the model was trained
on form five clusters, and something else lands far from all of them. The score is the
Mahalanobis distance to the nearest class mean, with one covariance shared by the classes
(Lee et al., NeurIPS 2018, "A simple unified framework for detecting out-of-distribution
samples"), fitted on the training cells' features; Ledoit-Wolf shrinkage keeps the 1280 x 1280
covariance well conditioned. When training pooled several labs, each lab's cells of a type get
their own mean. No out-of-distribution data is used anywhere.

The score is divided by a threshold: the ``quantile`` of the distances of held-out validation
cells (by default 0.95). ``ood_score > 1`` means "more unusual than 95 % of the in-distribution
cells the model was validated on", and that is what ``flagged`` means. The false-flag rate on
the training lab is therefore about 5 % by construction, and everything else is measured.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from .contract import QUANTILE
from .errors import WbcidError
from .preprocess import TORCH_BATCH, as_input

if TYPE_CHECKING:
    from .data import CellSet
    from .models import WBCNet

MIN_GROUP = 20  # fewest cells of one type from one lab that get their own cluster


class MahalanobisScore(nn.Module):
    """Features ``(n, d)`` -> distance to the nearest class mean / threshold, ``(n,)``.

    Stored as the class means and a whitening matrix ``W`` with ``W.T @ W`` = the shared
    precision matrix, so the distance is a Euclidean one after one matrix product (and exports
    to ONNX as such).
    """

    def __init__(self, means: torch.Tensor, whitener: torch.Tensor, threshold: float | torch.Tensor = 1.0):
        super().__init__()
        self.register_buffer("means", means.float())
        self.register_buffer("whitener", whitener.float())
        self.register_buffer("threshold", torch.as_tensor(threshold, dtype=torch.float32).reshape(()))

    def distance(self, features: torch.Tensor) -> torch.Tensor:
        z = features.flatten(1) @ self.whitener.T
        centres = self.means @ self.whitener.T
        squared = (z * z).sum(1, keepdim=True) - 2 * z @ centres.T + (centres * centres).sum(1)  # cdist has no ONNX op
        return squared.min(1).values.clamp_min(0).sqrt()

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.distance(features) / self.threshold

    @classmethod
    def fit(
        cls, features: torch.Tensor, groups: np.ndarray, calibration: torch.Tensor, quantile: float = QUANTILE
    ) -> MahalanobisScore:
        """Group means and shared covariance from ``features``; threshold from ``calibration``'s distances.

        ``groups`` are the clusters of the training data: the class labels, or one id per class
        and lab when training pooled several labs (:func:`ood_groups`).
        """
        return cls.from_covariance(*class_statistics(features, groups), calibration, quantile)

    @classmethod
    def from_covariance(
        cls, means: np.ndarray, covariance: np.ndarray, calibration: torch.Tensor, quantile: float = QUANTILE
    ) -> MahalanobisScore:
        """A scorer with these cluster means and shared covariance, its threshold set on ``calibration``."""
        precision = np.linalg.inv(covariance)
        whitener = np.linalg.cholesky((precision + precision.T) / 2).T  # W^T W = precision
        scorer = cls(torch.from_numpy(means), torch.from_numpy(whitener))
        with torch.no_grad():
            scorer.threshold.fill_(torch.quantile(scorer.distance(calibration), quantile).item())
        return scorer

    def covariance(self) -> np.ndarray:
        """The shared covariance this scorer whitens with (the inverse of ``W^T W``)."""
        w = self.whitener.double().numpy()
        return np.linalg.inv(w.T @ w)


class LayeredScore(nn.Module):
    """The penultimate score averaged with scores of earlier layer groups' pooled outputs, over a threshold.

    Lee et al. (2018) score several layers and average them (their feature ensemble; here
    unweighted, as no OOD data is used). Adapted models use it: their last layer groups were
    fine-tuned on a few hundred cells, so their penultimate scorer is re-estimated on too few
    cells, while the layer groups just before them (``taps``, indices of
    :meth:`wbcid.models.WBCNet.tapped_features`) were frozen and keep the base model's view of
    what a blood cell looks like (docs/ood_layers.md measures both). Each part is divided by its
    own 95 % threshold first, so none dominates by scale.
    """

    def __init__(self, penultimate: MahalanobisScore, stages: dict[int, MahalanobisScore], threshold: float = 1.0):
        super().__init__()
        self.penultimate = penultimate
        self.stages = nn.ModuleDict({str(tap): scorer for tap, scorer in sorted(stages.items())})  # input order
        self.register_buffer("threshold", torch.tensor(float(threshold)))

    @property
    def taps(self) -> tuple[int, ...]:
        return tuple(int(tap) for tap in self.stages)

    def distance(self, features: torch.Tensor, tapped: Sequence[torch.Tensor]) -> torch.Tensor:
        parts = [self.penultimate(features), *(scorer(x) for scorer, x in zip(self.stages.values(), tapped))]
        return torch.stack(parts).mean(0)

    def forward(self, features: torch.Tensor, tapped: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.distance(features, tapped) / self.threshold

    def calibrate(
        self, *cells: tuple[torch.Tensor, Sequence[torch.Tensor]], quantile: float = QUANTILE
    ) -> LayeredScore:
        """Set the threshold so that each ``(features, tapped)`` set is at most ``1 - quantile`` flagged."""
        with torch.no_grad():
            self.threshold.fill_(max(torch.quantile(self.distance(*c), quantile).item() for c in cells))
        return self


def pooled(x: torch.Tensor) -> torch.Tensor:
    """Per-channel mean and standard deviation of feature maps ``(n, c, h, w)`` -> ``(n, 2c)``: what a
    :class:`LayeredScore` scores an earlier layer group by (its "style": stain and texture show here).
    A 1 x 1 map has no spread: its std is NaN (as ``Tensor.std`` gives, without its warning), which
    :func:`stage_statistics` reads as "do not score this group"."""
    mean = x.mean((2, 3))
    spread = x.std((2, 3)) if x.shape[2] * x.shape[3] > 1 else torch.full_like(mean, float("nan"))
    return torch.cat([mean, spread], 1)


def cat_tapped(parts: Sequence[tuple[torch.Tensor, list[torch.Tensor]]]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Batches of ``(x, tapped)`` (:func:`wbcid.models.run_tapped`'s outputs) joined into one."""
    return torch.cat([x for x, _ in parts]), [torch.cat(outputs) for outputs in zip(*(t for _, t in parts))]


def scorer_for(state: dict[str, torch.Tensor]) -> nn.Module | None:
    """An empty scorer of the kind and shapes that a saved state dict holds (None: the model has none)."""
    if "ood.means" in state:
        return MahalanobisScore(state["ood.means"], state["ood.whitener"])
    if "ood.penultimate.means" not in state:
        return None
    taps = sorted({int(k.split(".")[2]) for k in state if k.startswith("ood.stages.")})
    stages = {t: MahalanobisScore(state[f"ood.stages.{t}.means"], state[f"ood.stages.{t}.whitener"]) for t in taps}
    return LayeredScore(MahalanobisScore(state["ood.penultimate.means"], state["ood.penultimate.whitener"]), stages)


def class_statistics(
    features: torch.Tensor, groups: np.ndarray, weights: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Each group's mean and the shared covariance around them (Ledoit-Wolf shrinkage, which keeps a
    covariance of more dimensions than a few hundred cells well conditioned).

    ``weights``: how much each cell counts in the covariance; the shrinkage stays the one Ledoit-Wolf
    finds for the cells as they are (weighting rows would read as noise and shrink far more).
    """
    from sklearn.covariance import LedoitWolf, shrunk_covariance

    means, centred = group_means(features, groups)
    fitted = LedoitWolf(assume_centered=True).fit(centred)
    if weights is None:
        return means, fitted.covariance_
    weighted = (centred * (weights / weights.sum())[:, None]).T @ centred
    return means, shrunk_covariance(weighted, fitted.shrinkage_)


def group_means(features: torch.Tensor, groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each group's mean (in ``np.unique`` order of the group ids) and the features minus their group's mean."""
    x = features.flatten(1).double().numpy()
    ids, index = np.unique(groups, return_inverse=True)
    means = np.stack([x[index == i].mean(0) for i in range(len(ids))])
    return means, x - means[index]


def ood_groups(cells: CellSet, min_cells: int = MIN_GROUP) -> np.ndarray:
    """One cluster per class and source lab, for the OOD scorer's class means.

    Cells of one type from two labs form two clusters; a single mean between them would sit
    where neither lab's cells are and flag the smaller lab's. A lab with fewer than
    ``min_cells`` cells of a type joins that type's pooled cluster (its own mean would be noise).
    """
    keys = np.array([f"{c.label}/{c.source}" for c in cells.cells])
    names, sizes = np.unique(keys, return_counts=True)
    small = set(names[sizes < min_cells])
    keys = np.array([str(c.label) if key in small else key for c, key in zip(cells.cells, keys)])
    return np.unique(keys, return_inverse=True)[1]


@torch.inference_mode()
def image_features(model: nn.Module, images: torch.Tensor, batch_size: int = TORCH_BATCH) -> torch.Tensor:
    """Penultimate features of uint8 NCHW images (what the OOD scorer works on)."""
    model.eval()
    return torch.cat([model.features(as_input(b)) for b in images.split(batch_size)])


@torch.inference_mode()
def tapped_image_features(
    model: WBCNet, images: torch.Tensor, taps: Sequence[int], batch_size: int = TORCH_BATCH
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """:func:`image_features` and, from the same pass, the pooled outputs of the layer groups ``taps``."""
    model.eval()
    return cat_tapped([model.tapped_features(as_input(b), taps) for b in images.split(batch_size)])


def stage_statistics(
    model: WBCNet, images: torch.Tensor, groups: np.ndarray
) -> tuple[torch.Tensor, dict[int, tuple[torch.Tensor, torch.Tensor]]]:
    """Penultimate features of the training ``images``, and each cluster's mean and the shared
    covariance (:func:`class_statistics`) of every layer group's pooled outputs but the last.

    Recorded with a trained model: an adaptation that freezes those groups scores them with the
    statistics of *all* the training cells (:class:`LayeredScore`), which no replay of a few
    hundred cells matches (docs/ood_layers.md).
    """
    try:
        taps = range(model.group_count - 1)
    except WbcidError:  # a backbone that cannot be split is adapted head-only, which scores no layer group
        return image_features(model, images), {}
    features, tapped = tapped_image_features(model, images, taps)
    statistics = {
        t: tuple(torch.from_numpy(a).float() for a in class_statistics(x, groups))
        for t, x in zip(taps, tapped)
        if x.isfinite().all()  # a 1 x 1 output (VGG's pooling) has no spread to pool
    }
    return features, statistics
