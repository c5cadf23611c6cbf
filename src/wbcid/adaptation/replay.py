"""Cached prefix outputs: the base model's training cells replayed, and the views of verified cells."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..augment import train_augmentation
from ..data import CLASSES, CellSet, read_cells, recorded_training_cells
from ..decoding import load_images
from ..models import WBCNet, run_tapped
from ..ood import cat_tapped, class_statistics
from ..preprocess import Preprocess, as_input
from ..splits import sample_per_class, split_train_val
from ..train import autocast
from .config import AdaptConfig

SCORED_STAGES = 2  # frozen layer groups the adapted OOD score adds (1 or 2 measured: docs/ood_layers.md)


@dataclass
class Replay:
    """The base model's training cells as prefix outputs (``acts``) and the pooled outputs of the
    scored frozen layer groups (``tapped``, :func:`stage_taps`), and held-out ones for calibration.

    The decoded images are kept too, so the cache can be remade when the prefix changes (AdaBN).
    ``class_shares``: each class's share of all the training cells the replay was drawn from
    (None: as drawn), so that statistics fitted on the replay describe the training data's mix.
    """

    acts: torch.Tensor
    tapped: list[torch.Tensor]
    labels: torch.Tensor
    calibration: torch.Tensor
    calibration_tapped: list[torch.Tensor]
    images: torch.Tensor
    image_labels: np.ndarray
    calibration_images: torch.Tensor
    class_shares: np.ndarray | None = None

    def statistics(self, features: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Class means and shared covariance of the replay cells' ``features`` (:func:`class_statistics`),
        each cell weighted so that the classes count as in the training data, as in the base model's own
        scorer: the replay draws the classes evenly, and the even mix scored PBC's non-WBC cells worse
        after adaptation (docs/ood_layers.md)."""
        labels = self.labels.numpy()
        if self.class_shares is None:
            return class_statistics(features, labels)
        drawn = np.bincount(labels, minlength=len(self.class_shares))
        return class_statistics(features, labels, self.class_shares[labels] / drawn[labels])


def class_shares(labels: np.ndarray) -> np.ndarray:
    """Each class's share of cells with these class indices (:class:`Replay`'s ``class_shares``)."""
    return np.bincount(labels, minlength=len(CLASSES)) / len(labels)


def stage_taps(model: WBCNet, trainable_groups: int) -> tuple[int, ...]:
    """The frozen layer groups just before the fine-tuned ones that the adapted OOD score also weighs
    (:class:`wbcid.ood.LayeredScore`); none when only the head is tuned (the base scorer then holds)."""
    if trainable_groups == 0:
        return ()
    cut = model.group_count - trainable_groups
    return tuple(range(max(cut - SCORED_STAGES, 0), cut))


@torch.no_grad()
def prefix_views(
    prefix: nn.Module,
    images: torch.Tensor,
    views: int,
    augment: nn.Module | None = None,
    taps: tuple[int, ...] = (),
    precision: str = "fp32",
    batch_size: int = 128,
    desc: str | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Prefix outputs of ``views`` versions of each uint8 image (as it is, then augmented; view-major),
    and the pooled outputs of the layer groups ``taps`` (numbered as in :meth:`WBCNet.split`), in
    fp32; computed in bf16 under ``precision="bf16"`` (the prefix is frozen: see :func:`autocast`).
    ``desc``: show a progress bar (in images) with this title."""
    prefix.eval()
    parts = []
    with tqdm(total=views * len(images), desc=desc, unit="img", leave=False, disable=None if desc else True) as bar:
        for view in range(views):
            for batch in images.split(batch_size):
                x = as_input(batch)
                x = augment(x).contiguous(memory_format=torch.channels_last) if view else x
                with autocast(precision, x.device, trained=False):
                    out, tapped = run_tapped(prefix, x, taps)
                parts.append((out.float(), [t.float() for t in tapped]))
                bar.update(len(batch))
    if not parts:
        return torch.empty(0), [torch.empty(0) for _ in taps]
    return cat_tapped(parts)


def make_replay(
    model: WBCNet,
    images: torch.Tensor,
    labels: np.ndarray,
    calibration: torch.Tensor,
    config: AdaptConfig,
    class_shares: np.ndarray | None = None,
    desc: str | None = None,
) -> Replay:
    """Cache the replay cells (and the held-out calibration cells) through ``model``'s frozen prefix;
    ``class_shares`` as in :class:`Replay`; ``desc``: the progress bar's title (none if None)."""
    torch.manual_seed(config.seed)
    prefix, _ = model.split(config.trainable_groups)
    augment = train_augmentation(config.augment)
    taps = stage_taps(model, config.trainable_groups)
    precision = config.resolved_precision
    acts, tapped = prefix_views(prefix, images, config.replay_views, augment, taps, precision, desc=desc)
    calibration_acts, calibration_tapped = prefix_views(prefix, calibration, 1, augment, taps, precision, desc=desc)
    return Replay(
        acts,
        tapped,
        torch.from_numpy(np.tile(labels, config.replay_views)),
        calibration_acts,
        calibration_tapped,
        images,
        labels,
        calibration,
        class_shares,
    )


def suffix_features(suffix: nn.Module, acts: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Penultimate features of cached prefix outputs."""
    suffix.eval()
    return torch.cat([suffix(b) for b in acts.split(batch_size)]) if len(acts) else torch.empty(0)


def decode_replay(
    base: WBCNet, replay: CellSet | str | os.PathLike | None, prep: Preprocess, config: AdaptConfig
) -> tuple[dict | None, str | None]:
    """The base model's training cells to replay (:func:`_replay_cells`), ``config.replay_per_class`` of
    each class and as many held-out ones, decoded: :func:`make_replay`'s keyword arguments (None if
    there are none), and where they came from. ``class_shares`` are those of all the training cells
    the replay is drawn from, not of the evenly drawn replay (:meth:`Replay.statistics`)."""
    cells, origin = _replay_cells(base, replay)
    if cells is None:
        return None, None
    train, calibration = cells
    images, drawn = load_images(
        sample_per_class(train, config.replay_per_class, config.seed), prep, "decoding replay cells"
    )
    calibration_images, _ = load_images(
        sample_per_class(calibration, config.replay_per_class, config.seed), prep, "decoding calibration cells"
    )
    arguments = {
        "images": images,
        "labels": drawn.labels,
        "calibration": calibration_images,
        "class_shares": class_shares(train.labels),
    }
    return arguments, origin


def _replay_cells(
    base: WBCNet, replay: CellSet | str | os.PathLike | None
) -> tuple[tuple[CellSet, CellSet] | None, str | None]:
    """(train, calibration) cells to replay: ``replay`` if given, else the training data the base
    model recorded (never a test split of it)."""
    if replay is None:
        cells = recorded_training_cells(base.config.training_data)
    else:
        cells = replay if isinstance(replay, CellSet) else read_cells(replay)
        if any(c.split for c in cells.cells):
            cells = cells.subset([c.split in ("train", "val") for c in cells.cells])
    if cells is None or len(cells) < 2:
        return None, None
    return split_train_val(cells), cells.origin
