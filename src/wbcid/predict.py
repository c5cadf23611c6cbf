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

from .data import CLASSES, image_batches, list_images
from .models import WBCNet, load_model

log = logging.getLogger("wbcid")


@torch.inference_mode()
def predict_logits(model: WBCNet, batches: Iterable[torch.Tensor]) -> torch.Tensor:
    """Logits for uint8 NCHW batches, in order (eval mode; channels-last is faster on CPU)."""
    model.eval()
    outputs = [model((b.float() / 255).contiguous(memory_format=torch.channels_last)) for b in batches]
    return torch.cat(outputs) if outputs else torch.empty(0, len(CLASSES))


def predict_proba(
    model: WBCNet, paths: Sequence[Path], batch_size: int = 64, workers: int | None = None, progress: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Class probabilities ``(n, 5)`` and a mask of which files could be read (others are NaN)."""
    size = model.config["input_size"]
    probs, ok = [], []
    batches = image_batches(paths, size, batch_size, workers)
    for images, readable in tqdm(batches, total=-(-len(paths) // batch_size), desc="predicting",
                                 disable=None if progress else True, leave=False):
        probs.append(predict_logits(model, [images]).softmax(1).numpy())
        ok.append(readable.numpy())
    probs_all, ok_all = np.concatenate(probs), np.concatenate(ok)
    probs_all[~ok_all] = np.nan
    if not ok_all.all():
        log.warning("%d of %d images could not be read and have no prediction, e.g. %s",
                    (~ok_all).sum(), len(paths), paths[int(np.argmin(ok_all))])
    return probs_all, ok_all


def predict(
    model: WBCNet | str | os.PathLike,
    paths: Sequence[str | os.PathLike],
    out_csv: str | os.PathLike | None = None,
    batch_size: int = 64,
) -> pd.DataFrame:
    """Classify image files (folders are searched recursively); one row per image.

    Columns: ``path``, ``label``, ``probability`` and ``p_<class>`` for each class. Unreadable
    images keep their row with an empty label, so no input silently disappears.
    """
    if not isinstance(model, WBCNet):
        model = load_model(model)
    files = list_images(paths)
    probs, ok = predict_proba(model, files, batch_size)
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
