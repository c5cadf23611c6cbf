"""How cells are divided: validation hold-outs, few-shot draws and per-class samples.

Cells that share a ``group`` (cut from one picture, or filed under one specimen) are never divided:
a cell validating, or tested, beside its own picture's cells would flatter the model.
"""

from __future__ import annotations

import logging
import math
from dataclasses import replace

import numpy as np

from .contract import CLASSES
from .data import CellSet
from .errors import WbcidError

log = logging.getLogger("wbcid")


def draw_per_class(cells: CellSet, k: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Indices of about ``k`` cells per class to label, and of the rest, for few-shot adaptation.

    A class gives at most half of its cells (so every class present keeps cells to test on), and
    cells that share a ``group`` (one original picture) stay on one side: a group is taken whole.
    """
    rng = np.random.default_rng(seed)
    labels = cells.labels
    units: dict[str, list[int]] = {}
    for i, group in enumerate(group_ids(cells)):
        units.setdefault(group, []).append(i)
    chosen: set[int] = set()
    for label in range(len(CLASSES)):
        wanted = min(k, int((labels == label).sum()) // 2)
        candidates = [u for u in units.values() if any(labels[i] == label for i in u)]
        for j in rng.permutation(len(candidates)):
            if sum(labels[i] == label for i in chosen) >= wanted:
                break
            chosen.update(candidates[j])
    picked = np.array(sorted(chosen), dtype=np.int64)
    return picked, np.setdiff1d(np.arange(len(cells)), picked)


def split_train_val(
    cells: CellSet, val_fraction: float = 0.15, seed: int = 0, every_class_trains: bool = True
) -> tuple[CellSet, CellSet]:
    """Use the data's own ``split`` column when it has one (test rows never train); else stratify.

    A manifest with a split column trains on ``train`` and validates on ``val`` (carved out of
    ``train`` if there is none); other layouts get a stratified ``val_fraction`` hold-out, of whole
    groups where cells share one (:func:`group_ids`), so a picture's cells never validate its own. Where
    there are too few cells to stratify, ``every_class_trains`` keeps one cell of each class in
    training (:func:`training_pool` splits per source, where another source may train the class).
    """
    splits = {c.split for c in cells.cells}
    if splits - {""}:
        train = cells.subset([c.split == "train" for c in cells.cells])
        val = cells.subset([c.split == "val" for c in cells.cells])
        if not train.cells:
            raise WbcidError(f"{cells.origin}: no rows with split 'train' (splits here: {sorted(splits)})")
        if val.cells:
            return train, val
        cells = train
    from sklearn.model_selection import train_test_split  # not at import: predict never needs it

    if len(cells) < 2:
        raise WbcidError(f"{cells.origin}: {len(cells)} labelled cell(s); training needs 2 or more (1 validates)")
    labels, groups = cells.labels, group_ids(cells)
    grouped = 2 <= len(set(groups)) < len(cells)  # cells of one picture or specimen: never on both sides
    if grouped:
        idx_train, idx_val = _group_split(labels, groups, val_fraction, seed)
    else:
        present = np.bincount(labels)
        present = present[present > 0]
        n_val = math.ceil(val_fraction * len(cells))  # as scikit-learn rounds a fractional test_size
        stratified = present.min() >= 2 and len(present) <= min(n_val, len(cells) - n_val)  # else it refuses
        idx_train, idx_val = train_test_split(
            np.arange(len(cells)), test_size=val_fraction, random_state=seed, stratify=labels if stratified else None
        )
    # unstratified, a class's only cells may all land in validation, where it is never learned: one trains,
    # with the rest of its group
    lost = sorted(set(labels[idx_val]) - set(labels[idx_train])) if every_class_trains else []
    lost_groups = {groups[idx_val[labels[idx_val] == c][0]] for c in lost}
    moved = [i for i in idx_val if groups[i] in lost_groups]
    idx_train, idx_val = np.concatenate([idx_train, moved]).astype(int), np.setdiff1d(idx_val, moved)
    if not len(idx_val):
        needed = "every group of them (one picture or specimen) is needed" if grouped else "every one is needed"
        raise WbcidError(
            f"{cells.origin}: {len(cells)} labelled cells, and {needed} to train its class: none is "
            "left to validate on; add cells (two or more of some class)"
        )
    if grouped:
        held_out, every = len(set(groups[idx_val])), len(set(groups))
        log.info("validating on whole groups (pictures or specimens): %d of %d", held_out, every)
    return cells.subset(sorted(idx_train)), cells.subset(sorted(idx_val))


def group_ids(cells: CellSet) -> np.ndarray:
    """Each cell's ``group``: cells cut from one picture, or filed under one specimen, share it; a cell
    without one is a group of its own."""
    return np.array([c.group or f"#{i}" for i, c in enumerate(cells.cells)])


def _group_split(
    labels: np.ndarray, groups: np.ndarray, val_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Train and validation indices with whole groups on each side: one fold of about ``val_fraction``
    stratified by class (scikit-learn), or, with fewer groups than folds, random groups added to
    validation up to that share, each only if every class keeps training cells."""
    import warnings

    from sklearn.model_selection import StratifiedGroupKFold

    index = np.arange(len(labels))
    folds = max(2, round(1 / val_fraction))
    if len(set(groups)) >= folds:
        with warnings.catch_warnings():  # "the least populated class has only N members": expected here
            warnings.simplefilter("ignore", UserWarning)
            return next(StratifiedGroupKFold(folds, shuffle=True, random_state=seed).split(index, labels, groups))
    val = np.zeros(len(labels), bool)
    for group in np.random.default_rng(seed).permutation(np.unique(groups)):
        trial = val | (groups == group)
        if val.sum() < val_fraction * len(labels) and set(labels[~trial]) == set(labels):
            val = trial
    return index[~val], index[val]


def sample_per_class(cells: CellSet, n: int, seed: int = 0) -> CellSet:
    """At most ``n`` random cells of each class (replay and calibration samples)."""
    rng = np.random.default_rng(seed)
    keep = [i for label in range(len(CLASSES)) for i in rng.permutation(np.flatnonzero(cells.labels == label))[:n]]
    return cells.subset(sorted(keep))


def training_pool(cells: CellSet, val_fraction: float = 0.15, seed: int = 0) -> CellSet:
    """All cells as training data: existing train/val splits kept, everything else split per source.

    Used to train on several sources at once (leave-one-source-out, the bundled model): each
    source without a train/val split gives a stratified ``val_fraction`` to validation.
    """
    pooled = [c for c in cells.cells if c.split in ("train", "val")]
    for source in sorted({c.source for c in cells.cells}):
        rest = cells.subset([c.source == source and c.split not in ("train", "val") for c in cells.cells])
        if len(rest) >= 2:
            unsplit = replace(rest, cells=[replace(c, split="") for c in rest.cells])
            train, val = split_train_val(unsplit, val_fraction, seed, every_class_trains=False)
            pooled += [replace(c, split="train") for c in train.cells] + [replace(c, split="val") for c in val.cells]
    return CellSet(pooled, cells.skipped, cells.origin)
