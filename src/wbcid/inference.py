"""Inference: images or folders in, class probabilities (and a CSV) out."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from .data import CLASSES, image_batches, list_images
from .errors import WbcidError
from .loading import Model, resolve_model
from .ood import flagged
from .preprocess import Preprocess, as_input
from .testtime import adapt_batchnorm, dihedral_scores

log = logging.getLogger("wbcid")
UNREADABLE_MESSAGE = "could not be read as an image"


@torch.inference_mode()
def predict_scores(
    model: Model, batches: Iterable[torch.Tensor], tta: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits ``(n, 5)`` and out-of-distribution scores ``(n,)`` for uint8 NCHW batches, in order.

    With ``tta`` the logits are averaged over rotations and flips; the OOD score is always that
    of the image as given (see :func:`wbcid.testtime.dihedral_scores`).
    """
    model.eval()
    device = next(model.parameters()).device if isinstance(model, torch.nn.Module) else torch.device("cpu")
    logits, ood = [], []
    for batch in batches:
        x = as_input(batch, device)
        batch_logits, batch_ood = dihedral_scores(model, x) if tta else model.scores(x)
        logits.append(batch_logits.cpu())
        ood.append(batch_ood.cpu())
    if not logits:
        return torch.empty(0, len(CLASSES)), torch.empty(0)
    return torch.cat(logits), torch.cat(ood)


def predict_proba(
    model: Model,
    paths: Sequence[Path],
    batch_size: int = 64,
    workers: int | None = None,
    progress: bool = True,
    adabn: bool = False,
    tta: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Class probabilities ``(n, 5)``, OOD scores ``(n,)`` and a mask of which files could be read.

    Unreadable files get NaN. ``adabn`` re-estimates batch-norm statistics on these images first
    (they should come from one lab); ``tta`` averages over rotations and flips. See
    :mod:`wbcid.testtime` and :mod:`wbcid.ood`.
    """
    batches = image_batches(paths, Preprocess.of(model.config), batch_size, workers)
    if adabn:
        if not isinstance(model, torch.nn.Module):
            raise WbcidError("test-time AdaBN (--adabn) needs the PyTorch model, not an ONNX export")
        batches = list(batches)
        model = adapt_batchnorm(model, [images[readable] for images, readable in batches])
    probs, ood, ok = [], [], []
    for images, readable in tqdm(
        batches, total=-(-len(paths) // batch_size), desc="predicting", disable=None if progress else True, leave=False
    ):
        logits, scores = predict_scores(model, [images], tta)
        probs.append(logits.softmax(1).numpy())
        ood.append(scores.numpy())
        ok.append(readable.numpy())
    probs_all, ood_all, ok_all = np.concatenate(probs), np.concatenate(ood).astype(np.float64), np.concatenate(ok)
    probs_all[~ok_all], ood_all[~ok_all] = np.nan, np.nan
    if not ok_all.all():
        log.warning(
            "%d of %d images could not be read and have no prediction, e.g. %s",
            (~ok_all).sum(),
            len(paths),
            paths[int(np.argmin(ok_all))],
        )
    return probs_all, ood_all, ok_all


def prediction_table(probs: np.ndarray, ood: np.ndarray, ok: np.ndarray) -> pd.DataFrame:
    """Label, its probability, OOD score, flag and all class probabilities, one row per input."""
    best = np.nan_to_num(probs, nan=-1).argmax(1)
    if ok.any() and np.isnan(ood[ok]).all():
        log.warning("this model has no out-of-distribution scorer (trained before wbcid 0.2?); nothing is flagged")
    return pd.DataFrame(
        {
            "label": [CLASSES[i] if k else "" for i, k in zip(best, ok)],
            "probability": np.where(ok, np.nan_to_num(probs).max(1), np.nan),
            "ood_score": ood,
            "flagged": flagged(ood) | ~ok,  # an image without a prediction needs a person's eyes too
            "error": np.where(ok, "", UNREADABLE_MESSAGE),
            **{f"p_{name}": probs[:, i] for i, name in enumerate(CLASSES)},
        }
    )


def agreement(reference: Model, other: Model, paths: Sequence[Path]) -> dict:
    """How closely two models agree (e.g. fp32 vs fp16, PyTorch vs ONNX Runtime) on real images."""
    p_ref, _, ok = predict_proba(reference, paths)
    p_other, _, _ = predict_proba(other, paths)
    return {
        "images": int(ok.sum()),
        "label_agreement": float(np.mean(p_ref[ok].argmax(1) == p_other[ok].argmax(1))),
        "max_probability_difference": float(np.abs(p_ref[ok] - p_other[ok]).max()),
    }


def predict(
    model: Model | str | os.PathLike | None,
    paths: Sequence[str | os.PathLike],
    out_csv: str | os.PathLike | None = None,
    batch_size: int = 64,
    adabn: bool = False,
    tta: bool = False,
) -> pd.DataFrame:
    """Classify image files (folders are searched recursively); one row per image.

    Columns: ``path``, ``label``, ``probability``, ``ood_score``, ``flagged`` (not like the cells
    the model knows, or unreadable: check by eye, see :mod:`wbcid.ood`), ``error`` and
    ``p_<class>`` for each class. Unreadable images keep their row with an empty label and an
    ``error``, so no input silently disappears; if none could be read the CSV is still written
    and :class:`WbcidError` is raised.
    """
    if out_csv is not None and Path(out_csv).is_dir():
        raise WbcidError(
            f"{out_csv} is a folder; --out takes the CSV file to write, e.g. {Path(out_csv) / 'predictions.csv'}"
        )
    files = list_images(paths)  # missing or empty inputs fail before the model loads
    model = resolve_model(model, needs_torch="AdaBN" if adabn else None)
    probs, ood, ok = predict_proba(model, files, batch_size, adabn=adabn, tta=tta)
    table = prediction_table(probs, ood, ok)
    table.insert(0, "path", [str(f) for f in files])
    if out_csv is not None:
        Path(out_csv).parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(out_csv, index=False, float_format="%.5f")
    if not ok.any():
        raise WbcidError(f"none of the {len(files)} images could be read (each has a row with an 'error')")
    return table
