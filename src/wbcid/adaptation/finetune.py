"""Fine-tuning on verified cells: the steps, the cross-fitted flag threshold, pseudo-labels."""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..augment import train_augmentation
from ..data import CLASSES
from ..errors import WbcidError
from ..models import WBCNet
from ..ood import QUANTILE, cat_tapped
from ..train import autocast
from .config import AdaptConfig
from .flags import refit_ood
from .replay import Replay, make_replay, prefix_views, stage_taps, suffix_features

log = logging.getLogger("wbcid")

PSEUDO_SHARE = 0.5  # most confident share of each predicted class kept as pseudo-labels (CBST; not tuned here)


def adapt_model(
    base: WBCNet,
    images: torch.Tensor,
    labels: np.ndarray,
    config: AdaptConfig | None = None,
    replay: Replay | None = None,
    unlabelled: torch.Tensor | None = None,
    groups: np.ndarray | None = None,
) -> WBCNet:
    """A copy of ``base`` fine-tuned on verified cells (uint8 NCHW ``images``, class indices ``labels``;
    ``groups``: cells of one field or specimen share one, and stay on one side of the cross-fitting).

    ``replay`` keeps the base model's own labs (see :func:`make_replay`). ``unlabelled`` images of
    the same lab first set every batch-norm layer to the lab's statistics (source-aware AdaBN,
    :func:`wbcid.testtime.adapt_batchnorm`, from the unlabelled and verified cells; the replay
    cache is remade through the new prefix), then add pseudo-labels (module docstring).
    The base model is not changed.
    """
    config = config or AdaptConfig()
    labels = np.asarray(labels, dtype=np.int64)
    pseudo = unlabelled is not None and len(unlabelled) > 0  # AdaBN, then a round with pseudo-labels
    if len(images) == 0 and not pseudo:
        raise WbcidError("no verified cells to adapt to")
    if pseudo:
        from ..testtime import adapt_batchnorm

        base = adapt_batchnorm(base, torch.cat([images, unlabelled]))
        if replay is not None:
            replay = make_replay(
                base, replay.images, replay.image_labels, replay.calibration_images, config, replay.class_shares
            )
    halves = 2 * (config.cross_fit_steps or config.steps) if config.cross_fit and len(images) else 0
    planned = config.steps * ((len(images) > 0) + pseudo) + halves  # a fold with no cell trains no half-model
    with tqdm(total=planned, desc="fine-tuning", unit="step", leave=False, disable=None) as progress:
        model = fine_tune(base, [(images, labels, config.views)], config, replay, progress) if len(images) else base
        stretch = 1.0
        if config.cross_fit:
            stretch = _cross_fitted_stretch(base, images, labels, config, replay, progress, groups)
        if pseudo:
            pseudo_images, pseudo_labels = pseudo_label(model, unlabelled)
            log.info("pseudo-labels: %d of %d unlabelled cells", len(pseudo_labels), len(unlabelled))
            if len(pseudo_labels) + len(images) == 0:
                log.warning(
                    "every unlabelled cell is flagged, so none can be a pseudo-label: only AdaBN was applied; "
                    "verify a few cells (wbcid review) to adapt further"
                )
            else:
                parts = [(images, labels, config.views), (pseudo_images, pseudo_labels, config.pseudo_views)]
                model = fine_tune(base, parts, config, replay, progress)
    model = _stretch_threshold(copy.deepcopy(base) if model is base else model, stretch)
    model.config = replace(model.config, tta=config.tta)
    return model


def _cross_fitted_stretch(
    base: WBCNet,
    images: torch.Tensor,
    labels: np.ndarray,
    config: AdaptConfig,
    replay: Replay | None,
    progress: tqdm | None = None,
    groups: np.ndarray | None = None,
) -> float:
    """How much the flag threshold must grow so that at most 5 % of the lab's *other* cells are flagged.

    A model tuned on the verified cells pulls their features together, so a threshold calibrated
    on them flags far more than 5 % of the lab's other cells. Two-fold cross-fitting measures by how
    much: tune on one half of the cells (classes split evenly), score the other half as they are,
    in units of that half-model's threshold, and back; the 95th percentile of those scores (at
    least 1) multiplies the full model's threshold. With numpy's default rank (1 + 0.95 (n - 1)), a
    further cell exchangeable with the n held-out ones scores above it with probability 8.5 % at
    n = 25, not 5 %; ``cross_fit_quantile="weibull"`` (rank 0.95 (n + 1)) gives 5 % but, measured,
    flagged 2.9 % of the labs' other cells instead of 4.5 % and half as many non-WBCs, so the
    default keeps numpy's rank (docs/adaptation.md). A monotone change of the score: its ranking,
    and so its AUROC, stay as they were; what moves is where the line is drawn (fewer of the other
    labs' cells and of the non-WBCs are flagged too: docs/adaptation.md measures it). Widening only
    the new lab's clusters was measured as well and was no better. It assumes the ratio carries
    from half the cells to all of them; half-models are, if anything, further from the lab, so
    the factor errs towards flagging less. Each half-model trains ``cross_fit_steps`` (default: as
    many as the full model); fewer left the threshold short: 6-22 % of the lab's other cells flagged
    on average per lab instead of 1-10 % (docs/adaptation.md, ``steps300-crossfit150``).
    """
    from ..inference import predict_scores

    fold = cross_fit_folds(labels, groups, config.seed)
    half_config = replace(config, steps=config.cross_fit_steps or config.steps)
    scores = []
    for held_out in (fold, ~fold):
        if held_out.all() or not held_out.any():
            continue
        half = fine_tune(base, [(images[~held_out], labels[~held_out], config.views)], half_config, replay, progress)
        scores.append(predict_scores(half, [images[held_out]])[1])
    method = config.cross_fit_quantile
    factor = float(np.quantile(np.concatenate(scores), QUANTILE, method=method)) if scores else float("nan")
    return factor if factor > 1 else 1.0  # NaN (no scorer, or nothing held out): unchanged


def cross_fit_folds(labels: np.ndarray, groups: np.ndarray | None, seed: int) -> np.ndarray:
    """The cross-fitting's two halves (``True``: the first), each class split evenly in random order
    (a class with one cell lands in a random half), and cells that share a group on one side: cells
    of one field look alike, so on both sides they made held-out cells look more like the lab's
    verified ones than its other cells do. Without shared groups, the split is the same as before."""
    groups = np.arange(len(labels)) if groups is None else groups
    fold = np.zeros(len(labels), dtype=bool)
    side: dict = {}
    rng = np.random.default_rng(seed)
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        start = rng.integers(2)
        for k, i in enumerate(members):  # alternating; a cell whose group already has a side joins it
            fold[i] = side.setdefault(groups[i], (k + start) % 2 == 0)
    return fold


def _stretch_threshold(model: WBCNet, stretch: float) -> WBCNet:
    if model.ood is not None and stretch != 1.0:
        model.ood.threshold.mul_(stretch)
        log.info("flag threshold raised %.2fx (cross-fitted on the verified cells)", stretch)
    return model


def pseudo_label(model: WBCNet, images: torch.Tensor, share: float = PSEUDO_SHARE) -> tuple[torch.Tensor, np.ndarray]:
    """The unflagged cells among the most confident ``share`` of each predicted class, with their labels."""
    from ..inference import predict_scores

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


def fine_tune(
    base: WBCNet,
    parts: Sequence[tuple[torch.Tensor, np.ndarray, int]],
    config: AdaptConfig,
    replay: Replay | None,
    progress: tqdm | None = None,
) -> WBCNet:
    """Train the suffix and head on cached prefix views of ``parts`` (images, labels, views) plus replay;
    each step advances ``progress``, the bar that shows the minutes an adaptation takes on a CPU."""
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
        if progress is not None:
            progress.update()
    tuned.cpu()
    for p in model.parameters():
        p.requires_grad_(False)
    model.set_freeze(model.config.freeze)  # restores requires_grad as the base model had it
    model.eval()
    refit_ood(model, suffix, acts, tapped, labels, replay, config.trainable_groups)
    return model


def steps_device() -> torch.device:
    """Where the fine-tuning steps run: a GPU where there is one. On a CPU they take most of an
    adaptation's time (100 steps: about 12 of its 15 s here); the rest (the prefix's pass over a few
    hundred cells, the OOD refit) stays on the CPU, where the model is returned."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


@torch.no_grad()
def suffix_scores(
    model: WBCNet, suffix: nn.Module, acts: torch.Tensor, tapped: list[torch.Tensor], batch_size: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and OOD scores from cached prefix outputs (what :meth:`WBCNet.scores` returns)."""
    model.eval()
    features = suffix_features(suffix, acts, batch_size)
    return model.head(features), model.ood_score(features, tapped)
