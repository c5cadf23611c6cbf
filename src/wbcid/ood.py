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

from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from .preprocess import as_input

if TYPE_CHECKING:
    from .data import CellSet

QUANTILE = 0.95
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
        from sklearn.covariance import LedoitWolf

        means, centred = group_means(features, groups)
        covariance = LedoitWolf(assume_centered=True).fit(centred).covariance_
        return cls.from_covariance(means, covariance, calibration, quantile)

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
def image_features(model: nn.Module, images: torch.Tensor, batch_size: int = 128) -> torch.Tensor:
    """Penultimate features of uint8 NCHW images (what the OOD scorer works on)."""
    model.eval()
    return torch.cat([model.features(as_input(b)) for b in images.split(batch_size)])
