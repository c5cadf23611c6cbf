"""Few-shot lab adaptation: learn a new lab from a few cells that a technologist verified.

A model trained on one lab scores 0.44-0.84 macro-F1 on labs it never saw (docs/generalization.md)
and no recipe measured here closes that gap without the new lab's labels. Laboratories verify a
few dozen cells of every new analyser anyway; :func:`adapt` learns the lab from those.

How (the choices were measured against each other: docs/adaptation.md):

* The network is cut into a frozen prefix and the last ``trainable_groups`` layer groups
  (:meth:`wbcid.models.WBCNet.split`). The prefix runs once per augmented view of each verified
  cell and its output is cached, so fine-tuning touches only the suffix and head and takes
  seconds on a CPU.
* Every batch is half new-lab views (classes drawn uniformly, so one basophil counts as much as
  twenty neutrophils) and half *replay*: the model's own training cells, so it does not forget
  the labs it knew. Views come from the training augmentation (stain, colour, blur, geometry).
* The OOD scorer (:mod:`wbcid.ood`) is refitted: the new lab's cells get clusters of their own
  beside the replay cells', and the threshold is calibrated on held-out replay cells and the new
  lab's views together, so the lab's ordinary cells stop being flagged while non-WBCs still are.
  With replay it becomes a :class:`wbcid.ood.LayeredScore`: the penultimate scorer, re-estimated
  on the few replay cells (each class counted as often as in the training data), is averaged with
  scorers of the two frozen layer groups just before the fine-tuned ones, which start from the
  statistics training recorded of them on all its cells. Together they keep the AUROC for PBC's
  non-WBC cells above what the base model had (docs/ood_layers.md, docs/adaptation.md).
* The adapted model predicts over the eight rotations and flips of each cell by default
  (``ModelConfig.tta``; ``--no-tta`` at prediction turns it off): over 40 paired draws it raised
  macro-F1 by 0.010 on average (30 up, 10 down; K = 10: +0.017, 18 of 20 up; docs/adaptation.md).
* ``unlabelled`` cells of the lab may add pseudo-labels: after adapting on the verified cells,
  the most confident half of the unflagged predictions of each class (class-balanced
  self-training, Zou et al., ECCV 2018) join the verified cells for a second adaptation from
  the base model.

:func:`adapt` is the file-level command (a run directory in, a run directory out);
:func:`adapt_model` works on decoded images and is what the benchmark calls.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from .augment import train_augmentation
from .data import CLASSES, Cell, CellSet, list_images, load_images, read_cells, sample_per_class
from .errors import WbcidError
from .models import WBCNet, run_tapped, save_model
from .ood import QUANTILE, LayeredScore, MahalanobisScore, cat_tapped, class_statistics, group_means
from .preprocess import Preprocess, as_input
from .train import autocast, precision_problems, resolve_precision

log = logging.getLogger("wbcid")
PSEUDO_SHARE = 0.5  # most confident share of each predicted class kept as pseudo-labels (CBST; not tuned here)
SCORED_STAGES = 2  # frozen layer groups the adapted OOD score adds (1 or 2 measured: docs/ood_layers.md)


@dataclass(frozen=True)
class AdaptConfig:
    """Everything that decides an adaptation; saved in the run directory."""

    trainable_groups: int = 2  # last backbone layer groups fine-tuned with the head; 0 = head only
    steps: int = 100
    batch_size: int = 64  # half new-lab views, half replay
    lr: float = 1e-3
    weight_decay: float = 1e-4
    label_smoothing: float = 0.1
    views: int = 16  # augmented views of each verified cell (the first is the cell as it is)
    pseudo_views: int = 2  # views of each pseudo-labelled cell
    replay_per_class: int = 100  # training cells of each class replayed
    replay_views: int = 2
    augment: str = "domain"
    cross_fit: bool = True  # calibrate the new lab's flag threshold on cells a half-model was not tuned on
    cross_fit_steps: int | None = None  # steps of each cross-fitting half-model; None: ``steps``
    precision: str = "auto"  # fp32 or bf16 as in training (wbcid.train.autocast); auto: fp32 on a CPU (little to gain)
    tta: bool = True  # the adapted model predicts over rotations and flips by default (+0.010 macro-F1, 40 draws)
    earlier: bool = True  # an adapted base: adapt its own base again, to its verified cells and the new ones
    seed: int = 0

    def __post_init__(self) -> None:
        positive = ("steps", "cross_fit_steps", "batch_size", "views", "pseudo_views", "replay_views")
        bad = [f"{name}={value!r}" for name in positive if (value := getattr(self, name)) is not None and value < 1]
        bad += [
            f"{name}={getattr(self, name)!r}"
            for name in ("lr", "weight_decay", "replay_per_class", "trainable_groups")
            if getattr(self, name) < 0
        ]
        if not 0 <= self.label_smoothing < 1:
            bad.append(f"label_smoothing={self.label_smoothing!r}")
        bad += precision_problems(self.precision)
        if bad:
            raise WbcidError(f"invalid adaptation settings: {', '.join(bad)} (counts must be >= 1, rates >= 0)")
        train_augmentation(self.augment)  # a bad policy fails here, before any work

    @property
    def resolved_precision(self) -> str:
        """``precision`` with ``auto`` resolved as on the CPU (fp32 there) wherever the steps run: one
        rule for the replay cache, the fine-tuning and the config the run records."""
        return resolve_precision(self.precision, torch.device("cpu"))


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
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Prefix outputs of ``views`` versions of each uint8 image (as it is, then augmented; view-major),
    and the pooled outputs of the layer groups ``taps`` (numbered as in :meth:`WBCNet.split`), in
    fp32; computed in bf16 under ``precision="bf16"`` (the prefix is frozen: see :func:`autocast`)."""
    prefix.eval()
    parts = []
    for view in range(views):
        for batch in images.split(batch_size):
            x = as_input(batch)
            x = augment(x).contiguous(memory_format=torch.channels_last) if view else x
            with autocast(precision, x.device, trained=False):
                out, tapped = run_tapped(prefix, x, taps)
            parts.append((out.float(), [t.float() for t in tapped]))
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
) -> Replay:
    """Cache the replay cells (and the held-out calibration cells) through ``model``'s frozen prefix;
    ``class_shares`` as in :class:`Replay`."""
    torch.manual_seed(config.seed)
    prefix, _ = model.split(config.trainable_groups)
    augment = train_augmentation(config.augment)
    taps = stage_taps(model, config.trainable_groups)
    precision = config.resolved_precision
    acts, tapped = prefix_views(prefix, images, config.replay_views, augment, taps, precision)
    calibration_acts, calibration_tapped = prefix_views(prefix, calibration, 1, augment, taps, precision)
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


@torch.no_grad()
def suffix_scores(
    model: WBCNet, suffix: nn.Module, acts: torch.Tensor, tapped: list[torch.Tensor], batch_size: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and OOD scores from cached prefix outputs (what :meth:`WBCNet.scores` returns)."""
    model.eval()
    features = _features(model, suffix, acts, batch_size)
    return model.head(features), model.ood_score(features, tapped)


def adapt_model(
    base: WBCNet,
    images: torch.Tensor,
    labels: np.ndarray,
    config: AdaptConfig | None = None,
    replay: Replay | None = None,
    unlabelled: torch.Tensor | None = None,
) -> WBCNet:
    """A copy of ``base`` fine-tuned on verified cells (uint8 NCHW ``images``, class indices ``labels``).

    ``replay`` keeps the base model's own labs (see :func:`make_replay`). ``unlabelled`` images of
    the same lab first set every batch-norm layer to the lab's statistics (source-aware AdaBN,
    :func:`wbcid.testtime.adapt_batchnorm`, from the unlabelled and verified cells; the replay
    cache is remade through the new prefix), then add pseudo-labels (module docstring).
    The base model is not changed.
    """
    config = config or AdaptConfig()
    labels = np.asarray(labels, dtype=np.int64)
    if len(images) == 0 and (unlabelled is None or not len(unlabelled)):
        raise WbcidError("no verified cells to adapt to")
    if unlabelled is not None and len(unlabelled):
        from .testtime import adapt_batchnorm

        base = adapt_batchnorm(base, torch.cat([images, unlabelled]))
        if replay is not None:
            replay = make_replay(
                base, replay.images, replay.image_labels, replay.calibration_images, config, replay.class_shares
            )
    model = _fine_tune(base, [(images, labels, config.views)], config, replay) if len(images) else base
    stretch = _cross_fitted_stretch(base, images, labels, config, replay) if config.cross_fit else 1.0
    if unlabelled is not None and len(unlabelled):
        pseudo_images, pseudo_labels = pseudo_label(model, unlabelled)
        log.info("pseudo-labels: %d of %d unlabelled cells", len(pseudo_labels), len(unlabelled))
        if len(pseudo_labels) + len(images) == 0:
            log.warning(
                "every unlabelled cell is flagged, so none can be a pseudo-label: only AdaBN was applied; "
                "verify a few cells (wbcid review) to adapt further"
            )
        else:
            parts = [(images, labels, config.views), (pseudo_images, pseudo_labels, config.pseudo_views)]
            model = _fine_tune(base, parts, config, replay)
    model = _stretch_threshold(copy.deepcopy(base) if model is base else model, stretch)
    model.config = replace(model.config, tta=config.tta)
    return model


def _cross_fitted_stretch(
    base: WBCNet, images: torch.Tensor, labels: np.ndarray, config: AdaptConfig, replay: Replay | None
) -> float:
    """How much the flag threshold must grow so that at most 5 % of the lab's *other* cells are flagged.

    A model tuned on the verified cells pulls their features together, so a threshold calibrated
    on them flags far more than 5 % of the lab's other cells. Two-fold cross-fitting measures by how
    much: tune on one half of the cells (classes split evenly), score the other half as they are,
    in units of that half-model's threshold, and back; the 95th percentile of those scores (at
    least 1) multiplies the full model's threshold. A monotone change of the score: its ranking,
    and so its AUROC, stay as they were; what moves is where the line is drawn (fewer of the other
    labs' cells and of the non-WBCs are flagged too: docs/adaptation.md measures it). Widening only
    the new lab's clusters was measured as well and was no better. It assumes the ratio carries
    from half the cells to all of them; half-models are, if anything, further from the lab, so
    the factor errs towards flagging less. Each half-model trains ``cross_fit_steps`` (default: as
    many as the full model); fewer left the threshold short: 6-22 % of the lab's other cells flagged
    on average per lab instead of 1-10 % (docs/adaptation.md, ``steps300-crossfit150``).
    """
    from .inference import predict_scores

    fold = np.zeros(len(labels), dtype=bool)
    rng = np.random.default_rng(config.seed)
    half_config = replace(config, steps=config.cross_fit_steps or config.steps)
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        fold[members[rng.integers(2) :: 2]] = True  # a class with one cell lands in a random fold
    scores = []
    for held_out in (fold, ~fold):
        if held_out.all() or not held_out.any():
            continue
        half = _fine_tune(base, [(images[~held_out], labels[~held_out], config.views)], half_config, replay)
        scores.append(predict_scores(half, [images[held_out]])[1])
    factor = float(np.quantile(np.concatenate(scores), QUANTILE)) if scores else float("nan")
    return factor if factor > 1 else 1.0  # NaN (no scorer, or nothing held out): unchanged


def _stretch_threshold(model: WBCNet, stretch: float) -> WBCNet:
    if model.ood is not None and stretch != 1.0:
        model.ood.threshold.mul_(stretch)
        log.info("flag threshold raised %.2fx (cross-fitted on the verified cells)", stretch)
    return model


def pseudo_label(model: WBCNet, images: torch.Tensor, share: float = PSEUDO_SHARE) -> tuple[torch.Tensor, np.ndarray]:
    """The unflagged cells among the most confident ``share`` of each predicted class, with their labels."""
    from .inference import predict_scores

    logits, ood = map(torch.from_numpy, predict_scores(model, images.split(128)))
    probs = logits.softmax(1)
    confidence, predicted = probs.max(1)
    keep = torch.zeros(len(images), dtype=torch.bool)
    for label in predicted.unique():
        members = (predicted == label).nonzero().flatten()
        ranked = members[confidence[members].argsort(descending=True)]
        keep[ranked[: max(1, int(len(ranked) * share))]] = True
    keep &= ~(ood > 1)  # NaN (no scorer) compares False: nothing removed
    return images[keep], predicted[keep].numpy()


def _fine_tune(
    base: WBCNet, parts: Sequence[tuple[torch.Tensor, np.ndarray, int]], config: AdaptConfig, replay: Replay | None
) -> WBCNet:
    """Train the suffix and head on cached prefix views of ``parts`` (images, labels, views) plus replay."""
    torch.manual_seed(config.seed)
    model = copy.deepcopy(base).eval()
    prefix, suffix = model.split(config.trainable_groups)
    if config.trainable_groups:  # recorded statistics of the tuned groups no longer hold
        cut = model.group_count - config.trainable_groups
        model.stage_statistics = {t: s for t, s in (model.stage_statistics or {}).items() if t < cut} or None
    augment = train_augmentation(config.augment)
    taps = stage_taps(model, config.trainable_groups) if replay is not None else ()
    precision = config.resolved_precision
    acts, tapped = cat_tapped(
        [prefix_views(prefix, images, views, augment, taps, precision) for images, _, views in parts]
    )
    labels = torch.from_numpy(np.concatenate([np.tile(y, views) for _, y, views in parts]))
    trainable = [*suffix.parameters(), *model.head.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in trainable:
        p.requires_grad_(True)
    device = steps_device()
    tuned = nn.ModuleList([suffix, model.head]).to(device)  # the prefix's outputs are cached: it stays put
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, config.lr, total_steps=config.steps, pct_start=0.15)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    by_class = [(labels == c).nonzero().flatten() for c in range(len(CLASSES))]
    by_class = [idx for idx in by_class if len(idx)]
    new_share = config.batch_size // 2 if replay is not None else config.batch_size
    suffix.train()
    model.head.train()
    for _ in range(config.steps):
        picks = torch.randint(len(by_class), (new_share,))
        idx = torch.stack([by_class[c][torch.randint(len(by_class[c]), ())] for c in picks.tolist()])
        x, y = acts[idx], labels[idx]
        if replay is not None:
            r = torch.randint(len(replay.labels), (config.batch_size - new_share,))
            x, y = torch.cat([x, replay.acts[r]]), torch.cat([y, replay.labels[r]])
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast(precision, device):
            logits = model.head(suffix(x))
        loss = loss_fn(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
    tuned.cpu()
    for p in model.parameters():
        p.requires_grad_(False)
    model.set_freeze(model.config.freeze)  # restores requires_grad as the base model had it
    model.eval()
    _refit_ood(model, suffix, acts, tapped, labels, replay, config.trainable_groups)
    return model


def steps_device() -> torch.device:
    """Where the fine-tuning steps run: a GPU where there is one. On a CPU they take most of an
    adaptation's time (100 steps: about 12 of its 15 s here); the rest (the prefix's pass over a few
    hundred cells, the OOD refit) stays on the CPU, where the model is returned."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


@torch.no_grad()
def _refit_ood(
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
        old_means, old_covariance = replay.statistics(_features(model, suffix, replay.acts))
    features = _features(model, suffix, acts)
    calibration = _features(model, suffix, replay.calibration) if replay is not None else None
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


def _features(model: WBCNet, suffix: nn.Module, acts: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Penultimate features of cached prefix outputs."""
    suffix.eval()
    return torch.cat([suffix(b) for b in acts.split(batch_size)]) if len(acts) else torch.empty(0)


def adapt(
    data: CellSet | str | os.PathLike | Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    model: str | os.PathLike | None = None,
    config: AdaptConfig | None = None,
    replay: CellSet | str | os.PathLike | None = None,
    unlabelled: Sequence[str | os.PathLike] | None = None,
) -> Path:
    """Adapt ``model`` (a run directory or .pt file; default: the bundled model) to the lab of the
    verified cells in ``data`` (one source or several) and write an ordinary run directory to
    ``out_dir``; returns it.

    A ``model`` that ``adapt`` made is, by default, not tuned further: its base is adapted again to
    the cells verified for it and the new ones together (:func:`earlier_rounds`).
    ``replay``: the model's training cells (default: the data it recorded, where it still exists).
    Nothing is written to ``out_dir`` until the model is complete, so an interrupted adaptation
    leaves no half-written run that later commands would load.
    """
    from .export import export_run
    from .loading import resolve_model
    from .testtime import batchnorm_statistics

    started = time.perf_counter()
    config = config or AdaptConfig()
    config = replace(config, precision=config.resolved_precision)
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise WbcidError(f"{out} already exists and is not empty; choose another --out (a run is never overwritten)")
    base = resolve_model(model, needs_torch="adaptation")
    if isinstance(data, CellSet):
        cells = data
    else:
        sources = [data] if isinstance(data, (str, os.PathLike)) else list(data)
        cells = CellSet.merged([read_cells(path) for path in sources])
    start, new = model, len(cells)
    if config.earlier and base.config.adaptation:
        start, cells = earlier_rounds(base, model, cells)
        base = base if start is model else resolve_model(start, needs_torch="adaptation")
    origin = _origin(start)
    prep = Preprocess.of(base.config)
    found = CellSet([Cell(p) for p in list_images(unlabelled)], origin="unlabelled cells") if unlabelled else None
    images, cells = load_images(cells, prep, "decoding verified cells")  # after every input is found: fail fast
    unlabelled_images = None if found is None else load_images(found, prep, "decoding unlabelled cells")[0]
    replay_arguments, replay_origin = decode_replay(base, replay, prep, config)
    bank = None
    if replay_arguments is not None:
        bank = make_replay(base, config=config, **replay_arguments)
    else:
        log.warning(
            "no training cells of the base model to replay (pass --replay DATA): the adapted model "
            "may forget the labs it knew, and its OOD threshold rests on the verified cells alone"
        )
    log.info(
        "adapting to %d verified cells (%s)", len(cells), ", ".join(f"{k} {v}" for k, v in cells.class_counts().items())
    )
    adapted = adapt_model(base, images, cells.labels, config, bank, unlabelled_images)
    statistics_images = images if bank is None else torch.cat([images, bank.images])
    adapted.source_statistics = batchnorm_statistics(adapted, statistics_images)
    verified = [[str(c.path.resolve()), CLASSES[c.label]] for c in cells.cells]
    adapted.config = replace(adapted.config, adaptation={**origin, "cells": cells.class_counts(), "verified": verified})
    if warning := adapted.config.unverified_warning():
        log.warning(warning)
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    save_model(adapted, partial / "model.pt")
    export_run(adapted, partial)  # what predict and count serve: 4x faster than PyTorch
    pd.DataFrame(verified, columns=["path", "label"]).to_csv(partial / "labelled.csv", index=False)
    record = {
        "adapt": asdict(config),
        "model": adapted.config.to_dict(),
        "base_model": origin["base"],
        "continued_from": None if start is model else str(model),
        "earlier_cells": len(cells) - new,  # verified for the model's earlier rounds (earlier_rounds)
        "verified_cells": cells.class_counts(),
        "skipped": dict(cells.skipped),
        "replay": replay_origin,
        "unlabelled_cells": 0 if unlabelled_images is None else len(unlabelled_images),
        "seconds": round(time.perf_counter() - started, 1),
    }
    (partial / "config.json").write_text(json.dumps(record, indent=2, default=str))
    if out.exists():
        out.rmdir()
    os.replace(partial, out)
    return out


def _origin(model: str | os.PathLike | None) -> dict:
    """How an adapted model records its base: its name for reports, and where to find it again for a
    later round (``base_path``: None for the bundled model; absent for a model passed as an object)."""
    from .loading import describe_model

    found = {"base": describe_model(model)}
    if model is None or isinstance(model, (str, os.PathLike)):
        found["base_path"] = None if model is None else str(Path(model).resolve())
    return found


def earlier_rounds(
    adapted: WBCNet, model: str | os.PathLike | None, cells: CellSet
) -> tuple[str | os.PathLike | None, CellSet]:
    """For a ``model`` that ``adapt`` made: where the next round starts, and the cells it learns from.

    A lab's second round (count with the adapted model, verify more cells, adapt again) learns from
    every cell verified so far, starting again from the first round's base: on BCCD
    (docs/loop_rounds.md, 3 splits, 25 cells per round) that scored macro-F1 0.808, 1.4 % of ordinary
    cells flagged, against 0.742 and 7.5 % for tuning the adapted model on the new cells alone, which
    forgets the first round's cells (its flags and differential were worse than the first round's).
    Where the base is gone, the adapted model itself learns from all the cells (0.810, 2.8 %).
    """
    record = adapted.config.adaptation or {}
    if "verified" not in record:
        log.warning(
            "%s does not record the cells it was adapted to (adapted by an older wbcid): it is tuned "
            "further on the new cells alone, and may forget what its earlier cells taught it",
            model,
        )
        return model, cells
    kept = [Cell(Path(path), CLASSES.index(label), source="verified earlier") for path, label in record["verified"]]
    earlier = CellSet([c for c in kept if c.path.is_file()], origin=f"cells verified for {model}")
    if missing := len(kept) - len(earlier):
        earlier.skipped["verified for an earlier round, no longer on disk"] = missing
        log.warning("%s: %d of the cells verified for its earlier rounds are no longer on disk", model, missing)
    log.info("adding the %d cells verified for %s's earlier rounds", len(earlier), model)
    start = record.get("base_path", model)
    if start is not None and not Path(start).exists():
        log.warning(
            "%s's base model %s is not here: the adapted model itself is tuned to all its verified cells",
            model,
            start,
        )
        start = model
    return start, CellSet.merged([earlier, cells])


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
    from .data import recorded_training_cells, split_train_val

    if replay is None:
        cells = recorded_training_cells(base.config.training_data)
    else:
        cells = replay if isinstance(replay, CellSet) else read_cells(replay)
        if any(c.split for c in cells.cells):
            cells = cells.subset([c.split in ("train", "val") for c in cells.cells])
    if cells is None or len(cells) < 2:
        return None, None
    return split_train_val(cells), cells.origin
