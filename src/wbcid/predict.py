"""Inference: images or folders in, class probabilities (and a CSV) out."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from .adapt import adapt_batchnorm, dihedral_logits
from .data import CLASSES, image_batches, list_images
from .errors import WbcidError
from .models import WBCNet, load_model

log = logging.getLogger("wbcid")


@torch.inference_mode()
def predict_logits(model: WBCNet, batches: Iterable[torch.Tensor], tta: bool = False) -> torch.Tensor:
    """Logits for uint8 NCHW batches, in order (eval mode; channels-last is faster on CPU)."""
    model.eval()
    device = next(model.parameters()).device if isinstance(model, torch.nn.Module) else torch.device("cpu")
    outputs = []
    for batch in batches:
        x = (batch.to(device).float() / 255).contiguous(memory_format=torch.channels_last)
        outputs.append((dihedral_logits(model, x) if tta else model(x)).cpu())
    return torch.cat(outputs) if outputs else torch.empty(0, len(CLASSES))


def predict_proba(
    model: WBCNet, paths: Sequence[Path], batch_size: int = 64, workers: int | None = None, progress: bool = True,
    adapt: bool = False, tta: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Class probabilities ``(n, 5)`` and a mask of which files could be read (others are NaN).

    ``adapt`` re-estimates batch-norm statistics on these images first (they should come from
    one lab); ``tta`` averages over rotations and flips. See :mod:`wbcid.adapt`.
    """
    batches = image_batches(paths, model.config["input_size"], model.config.get("crop", False), batch_size, workers)
    if adapt:
        if not isinstance(model, torch.nn.Module):
            raise WbcidError("test-time adaptation (--adapt) needs the PyTorch model, not an ONNX export")
        batches = list(batches)
        model = adapt_batchnorm(model, [images[readable] for images, readable in batches])
    probs, ok = [], []
    for images, readable in tqdm(batches, total=-(-len(paths) // batch_size), desc="predicting",
                                 disable=None if progress else True, leave=False):
        probs.append(predict_logits(model, [images], tta).softmax(1).numpy())
        ok.append(readable.numpy())
    probs_all, ok_all = np.concatenate(probs), np.concatenate(ok)
    probs_all[~ok_all] = np.nan
    if not ok_all.all():
        log.warning("%d of %d images could not be read and have no prediction, e.g. %s",
                    (~ok_all).sum(), len(paths), paths[int(np.argmin(ok_all))])
    return probs_all, ok_all


def resolve_model(model: WBCNet | str | os.PathLike | None, adapt: bool = False) -> WBCNet:
    """A model object from a model, a path or ``None`` (bundled); ONNX Runtime unless adapting."""
    if model is None or isinstance(model, (str, os.PathLike)):
        return load_model(model, onnx=not adapt)
    return model


def agreement(reference: WBCNet, other: WBCNet, paths: Sequence[Path]) -> dict:
    """How closely two models agree (e.g. fp32 vs fp16, PyTorch vs ONNX Runtime) on real images."""
    p_ref, ok = predict_proba(reference, paths)
    p_other, _ = predict_proba(other, paths)
    return {"images": int(ok.sum()),
            "label_agreement": float(np.mean(p_ref[ok].argmax(1) == p_other[ok].argmax(1))),
            "max_probability_difference": float(np.abs(p_ref[ok] - p_other[ok]).max())}


def predict(
    model: WBCNet | str | os.PathLike | None,
    paths: Sequence[str | os.PathLike],
    out_csv: str | os.PathLike | None = None,
    batch_size: int = 64,
    adapt: bool = False,
    tta: bool = False,
) -> pd.DataFrame:
    """Classify image files (folders are searched recursively); one row per image.

    Columns: ``path``, ``label``, ``probability`` and ``p_<class>`` for each class. Unreadable
    images keep their row with an empty label, so no input silently disappears.
    """
    model = resolve_model(model, adapt)
    files = list_images(paths)
    probs, ok = predict_proba(model, files, batch_size, adapt=adapt, tta=tta)
    best = np.nan_to_num(probs, nan=-1).argmax(1)
    table = pd.DataFrame({
        "path": [str(f) for f in files],
        "label": [CLASSES[i] if k else "" for i, k in zip(best, ok)],
        "probability": np.where(ok, np.nan_to_num(probs).max(1), np.nan),
        **{f"p_{name}": probs[:, i] for i, name in enumerate(CLASSES)},
    })
    if out_csv is not None:
        Path(out_csv).parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(out_csv, index=False, float_format="%.5f")
    return table
