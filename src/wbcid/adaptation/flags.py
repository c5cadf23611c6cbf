"""The adapted model's OOD score: the new lab's clusters added, the frozen layer groups weighed too."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..models import WBCNet
from ..ood import QUANTILE, LayeredScore, MahalanobisScore, group_means
from .replay import Replay, stage_taps, suffix_features


@torch.no_grad()
def refit_ood(
    model: WBCNet,
    suffix: nn.Module,
    acts: torch.Tensor,
    tapped: list[torch.Tensor],
    labels: torch.Tensor,
    replay: Replay | None,
    trainable_groups: int,
) -> None:
    """Add the new lab's clusters to the OOD scorer and weigh both labs equally in its covariance.

    The base scorer's covariance was estimated on all its training cells; with a frozen backbone
    (``trainable_groups == 0``) it and its cluster means still hold exactly. Otherwise they are
    re-estimated on the replay cells (:meth:`Replay.statistics`). The shared covariance is then the
    mean of that and the new lab's within-class scatter (its views around its class means): the new
    lab's ordinary variation is not unusual any more, while the training lab's still shapes what is.
    The threshold keeps each lab's calibration cells (held-out replay cells; the new lab's views) at
    most 5 % flagged: the larger of the two labs' 95th percentiles. With replay, the frozen layer
    groups in ``tapped`` get scorers made the same way from the statistics the base model recorded
    of all its training cells (from the replay where it recorded none), averaged with the
    penultimate one (:class:`LayeredScore`).
    """
    base = model.ood.penultimate if isinstance(model.ood, LayeredScore) else model.ood
    if base is None:
        return
    if trainable_groups == 0 or replay is None:
        old_means, old_covariance = base.means.double().numpy(), base.covariance()
    else:
        old_means, old_covariance = replay.statistics(suffix_features(suffix, replay.acts))
    features = suffix_features(suffix, acts)
    calibration = suffix_features(suffix, replay.calibration) if replay is not None else None
    model.ood = with_lab_clusters(old_means, old_covariance, features, labels.numpy(), calibration)
    if replay is None or not tapped:
        return
    recorded = {t: (m.double().numpy(), c.double().numpy()) for t, (m, c) in (model.stage_statistics or {}).items()}
    stages = {
        tap: with_lab_clusters(
            *(recorded[tap] if tap in recorded else replay.statistics(replay_x)),
            lab_x,
            labels.numpy(),
            calibration_x,
        )
        for tap, lab_x, replay_x, calibration_x in zip(
            stage_taps(model, trainable_groups), tapped, replay.tapped, replay.calibration_tapped
        )
    }
    model.ood = LayeredScore(model.ood, stages).calibrate((features, tapped), (calibration, replay.calibration_tapped))


def with_lab_clusters(
    old_means: np.ndarray,
    old_covariance: np.ndarray,
    features: torch.Tensor,
    labels: np.ndarray,
    calibration: torch.Tensor | None = None,
) -> MahalanobisScore:
    """A scorer with the new lab's class clusters (``features``, ``labels``) beside ``old_means``, and
    the mean of ``old_covariance`` and the lab's within-class scatter as its covariance; its threshold
    keeps the lab's cells and ``calibration`` cells each at most 5 % flagged."""
    new_means, new_centred = group_means(features, labels)
    covariance = (old_covariance + new_centred.T @ new_centred / len(new_centred)) / 2
    scorer = MahalanobisScore.from_covariance(np.concatenate([old_means, new_means]), covariance, features)
    if calibration is not None:
        held_out = scorer.distance(calibration)
        scorer.threshold.fill_(max(scorer.threshold.item(), torch.quantile(held_out, QUANTILE).item()))
    return scorer
