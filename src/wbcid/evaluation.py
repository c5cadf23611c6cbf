"""Evaluation: metrics in the fixed five-class space, written as metrics.json plus a report.

Averages (macro-F1, balanced accuracy) run over the classes present in the test set: a class
with no test images has no recall, and counting it as 0 would punish the model for the data.
"""

from __future__ import annotations

import json
import logging
import os
import stat
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from sklearn.metrics import classification_report, confusion_matrix, precision_recall_fscore_support

from .contract import ModelConfig, flagged
from .data import CLASSES, CellSet, file_identity, read_cells, recorded_training_cells
from .decoding import PROBLEMS
from .errors import WbcidError
from .files import output_folder, read_table
from .inference import predict_proba, resolve_tta
from .loading import ADAPTED_CELLS, Model, describe_model, resolve_model
from .reports import write_evaluation_report
from .serving import choose_precision, served_precision
from .splits import group_ids

log = logging.getLogger("wbcid")


def compute_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict:
    """Accuracy, balanced accuracy, macro-F1 (classes present), per-class scores, confusion matrix."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    labels = list(range(len(CLASSES)))
    present = sorted(set(y_true.tolist()))
    precision, recall, f1, support = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    per_class = {
        name: {
            "precision": float(precision[i]),
            "recall": float(recall[i]) if i in present else None,
            "f1": float(f1[i]) if i in present else None,
            "support": int(support[i]),
        }
        for i, name in enumerate(CLASSES)
    }
    return {
        "n": int(len(y_true)),
        "accuracy": float(np.mean(y_true == y_pred)) if len(y_true) else float("nan"),
        "balanced_accuracy": float(np.mean(recall[present])),
        "macro_f1": float(np.mean(f1[present])),
        "classes_present": [CLASSES[i] for i in present],
        "per_class": per_class,
        "labels": list(CLASSES),
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
        "classification_report": classification_report(
            y_true, y_pred, labels=present, target_names=[CLASSES[i] for i in present], digits=4, zero_division=0
        ),
    }


def flagged_metrics(y_true: np.ndarray, y_pred: np.ndarray, flags: np.ndarray) -> dict:
    """How many cells were flagged as unusual, and how good the answers given for the rest are."""
    kept = compute_metrics(y_true[~flags], y_pred[~flags]) if (~flags).any() else {}
    return {
        "flagged": int(flags.sum()),
        "flagged_share": float(flags.mean()),
        "accuracy_unflagged": kept.get("accuracy"),
        "macro_f1_unflagged": kept.get("macro_f1"),
    }


def bootstrap_intervals(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    groups: np.ndarray | None = None,
) -> dict[str, list[float]]:
    """Percentile bootstrap intervals for accuracy, balanced accuracy and macro-F1.

    Cells are resampled with replacement; where cells share a group (``groups``: one picture or
    specimen, :func:`wbcid.splits.group_ids`), whole groups are: such cells are alike, so counting
    each as independent made intervals too narrow. Averages run over the classes present in the
    full test set (a resample that misses a rare class scores it 0, as a model would be scored on it).
    """
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    k = len(CLASSES)
    present = np.bincount(y_true, minlength=k) > 0
    rng = np.random.default_rng(seed)
    ids = np.unique(groups, return_inverse=True)[1] if groups is not None else None
    if ids is None or ids.max() + 1 == len(y_true):  # every cell its own group: the cell bootstrap
        idx = rng.integers(0, len(y_true), (resamples, len(y_true)))
        cells = y_true[idx] * k + y_pred[idx]
        cm = np.stack([np.bincount(row, minlength=k * k) for row in cells])
    else:  # each resample's confusion counts: how often each group was drawn, times the group's counts
        per_group = np.zeros((ids.max() + 1, k * k))
        np.add.at(per_group, (ids, y_true * k + y_pred), 1)
        drawn = rng.integers(0, len(per_group), (resamples, len(per_group)))
        times = np.stack([np.bincount(row, minlength=len(per_group)) for row in drawn])
        cm = times @ per_group
    cm = cm.reshape(resamples, k, k)
    tp, support, predicted = cm.diagonal(axis1=1, axis2=2), cm.sum(2), cm.sum(1)
    recall = np.divide(tp, support, out=np.zeros(tp.shape), where=support > 0)
    f1 = np.divide(2 * tp, support + predicted, out=np.zeros(tp.shape), where=(support + predicted) > 0)
    scores = {
        "accuracy": tp.sum(1) / cm.sum((1, 2)),
        "balanced_accuracy": recall[:, present].mean(1),
        "macro_f1": f1[:, present].mean(1),
    }
    tail = 100 * (1 - level) / 2
    return {name: np.percentile(v, [tail, 100 - tail]).tolist() for name, v in scores.items()}


def evaluate(
    model: Model | str | os.PathLike | None,
    data: CellSet | str | os.PathLike,
    out_dir: str | os.PathLike | None = None,
    sources: str | Sequence[str] | None = None,
    splits: str | Sequence[str] | None = None,
    title: str | None = None,
    adabn: bool = False,
    tta: bool | None = None,
    precision: str = "auto",
) -> dict:
    """Score a model on labelled cells; with ``out_dir``, write metrics.json, figures and report.md.

    ``adabn``/``tta``: test-time adaptation on these (unlabelled) images, see :mod:`wbcid.testtime`;
    ``precision``: see :func:`wbcid.serving.choose_precision` (recorded in the metrics).
    """
    written = ("metrics.json", "report.md", "confusion_matrix.png")
    out_dir = None if out_dir is None else output_folder(out_dir, "the evaluation", replaces=written)
    name = describe_model(model)
    cells = data if isinstance(data, CellSet) else read_cells(data, sources, splits)
    run = model if isinstance(model, (str, os.PathLike)) and Path(model).is_dir() else None
    if adabn and len(labs := sorted({c.source for c in cells.cells} - {""})) > 1:
        log.warning(
            "AdaBN over %d sources at once (%s): their statistics are pooled, as no single lab's; evaluate "
            "one --source at a time, or run `wbcid benchmark --adabn`",
            len(labs),
            ", ".join(labs),
        )
    model = resolve_model(model, "AdaBN" if adabn else None, choose_precision(precision, len(cells)))
    seen = training_overlap(model.config, cells, run)
    if seen:
        adapted = ", or among the verified cells it was adapted to" if model.config.adaptation else ""
        log.warning(
            "%d of %d evaluated cells were in this model's training or validation data%s: this is not a test score",
            seen,
            len(cells),
            adapted,
        )
    tta = resolve_tta(model, tta)
    probs, ood, ok, problem = predict_proba(model, cells.paths, adabn=adabn, tta=tta)
    if not ok.any():
        raise WbcidError(f"{cells.origin}: none of the {len(cells)} images could be read")
    metrics = compute_metrics(cells.labels[ok], probs[ok].argmax(1))
    if absent := [c for c in CLASSES if c not in metrics["classes_present"]]:
        log.warning(
            "%s has no %s: macro-F1 and balanced accuracy average over the other classes",
            cells.origin,
            ", ".join(absent),
        )
    metrics["ci95"] = bootstrap_intervals(cells.labels[ok], probs[ok].argmax(1), groups=group_ids(cells)[ok])
    if not np.isnan(ood[ok]).all():  # grey, dark, blank pictures are flagged as predict flags them
        looked_at = flagged(ood[ok]) | (problem[ok] != "")
        metrics["flagged"] = flagged_metrics(cells.labels[ok], probs[ok].argmax(1), looked_at)
    metrics["problems"] = {message: int((problem == key).sum()) for key, message in PROBLEMS.items() if key in problem}
    metrics["unreadable"] = int((~ok).sum())
    metrics["skipped"] = dict(cells.skipped)
    metrics["model"], metrics["data"], metrics["training_overlap"] = name, cells.origin, seen
    metrics["tta"] = tta  # a score over rotations and flips is not comparable with a single-view one
    metrics["precision"] = served_precision(model)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
        write_evaluation_report(metrics, out_dir, title or f"Evaluation of {name} on {cells.origin}")
    return metrics


def training_overlap(config: ModelConfig, cells: CellSet, run: str | os.PathLike | None = None) -> int:
    """How many of ``cells`` the model learnt from: the training data it recorded (see
    :func:`recorded_training_cells`) and the verified cells it was adapted to, which model.pt lists
    and, for the model.onnx that serves a ``run`` directory, the run's labelled.csv. A verified cell
    is also known by its bytes: another export of the same review holds it under another path."""
    training = recorded_training_cells(config.training_data)
    paths = set() if training is None else {p.resolve() for p in training.paths}
    adapted = (config.adaptation or {}).get("verified")
    if adapted is None and config.adaptation and run is not None and (Path(run) / ADAPTED_CELLS).is_file():
        adapted = read_table(Path(run) / ADAPTED_CELLS)[["path", "label"]].values.tolist()
    verified = [Path(path) for path, _ in adapted or ()]
    paths |= {p.resolve() for p in verified}
    seen = [p.resolve() in paths for p in cells.paths]
    return sum(seen) + _copies(verified, [p for p, known in zip(cells.paths, seen) if not known])


def _copies(known: Sequence[Path], candidates: Sequence[Path]) -> int:
    """How many ``candidates`` hold the bytes of a ``known`` file: sizes first (a stat), digests only
    where a size matches, so an evaluation of thousands of cells hashes almost none."""
    known_sizes = {p: size for p in known if (size := _size(p)) is not None}
    sizes = set(known_sizes.values())
    maybe = [p for p in candidates if _size(p) in sizes]
    if not maybe:
        return 0
    digests = {file_identity(p) for p in known_sizes}
    return sum(file_identity(p) in digests for p in maybe)


def _size(path: Path) -> int | None:
    """A file's size in bytes, from one stat; None where there is no such file."""
    try:
        status = path.stat()
    except OSError:
        return None
    return status.st_size if stat.S_ISREG(status.st_mode) else None
