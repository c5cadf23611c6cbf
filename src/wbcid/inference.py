"""Inference: images or folders in, class probabilities (and a CSV) out."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from .contract import flagged
from .data import CLASSES
from .decoding import PROBLEMS, image_batches, why_unreadable
from .errors import WbcidError
from .files import (
    Inputs,
    appending,
    finished_work,
    list_images,
    logged_settings,
    prediction_output,
    prediction_review,
    refuse_reviewed,
)
from .loading import Model, describe_model, resolve_model
from .preprocess import TORCH_BATCH, Preprocess, as_input
from .serving import OnnxModel, choose_precision, served_precision

if TYPE_CHECKING:
    from .models import WBCNet

log = logging.getLogger("wbcid")
UNREADABLE_MESSAGE = "could not be read as an image"


class Scores(NamedTuple):
    """What a model says of each image: class probabilities ``(n, 5)`` and OOD scores ``(n,)``, NaN
    where the file could not be read (``readable``), and what is wrong with each readable picture (a
    key of :data:`wbcid.decoding.PROBLEMS`, or "")."""

    probs: np.ndarray
    ood: np.ndarray
    readable: np.ndarray
    problem: np.ndarray


def predict_scores(model: Model, batches: Iterable, tta: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Logits ``(n, 5)`` and out-of-distribution scores ``(n,)`` for uint8 NCHW batches, in order.

    Batches may be NumPy arrays or tensors; an ONNX model runs on NumPy without PyTorch. With
    ``tta`` the logits are averaged over the eight rotations and flips of each cell, which has no
    preferred orientation; the OOD score is that of the image as given (the scorer's threshold
    was calibrated on plain images). ``None``: as the model's config says (on for adapted models,
    where it was measured to help: docs/adaptation.md).
    """
    tta = resolve_tta(model, tta)
    onnx = isinstance(model, OnnxModel)
    run = _onnx_runner(model) if onnx else _torch_runner(model)
    logits, ood = [], []
    for batch in batches:
        views = dihedral_views(np.asarray(batch)) if tta else [batch]
        scores = [run(view) for view in views]
        averaged = np.mean([view_logits for view_logits, _ in scores], axis=0)
        if onnx and len(views) > 1:  # bf16 errors add up in the average: its close calls get every view in fp32
            close = model.needs_fp32(averaged)
            if close.any():
                exact = _onnx_runner(model, fp32=True)
                averaged[close] = np.mean([exact(view[close])[0] for view in views], axis=0)
        logits.append(averaged)
        ood.append(scores[0][1])
    if not logits:
        return np.empty((0, len(CLASSES)), np.float32), np.empty(0, np.float32)
    return np.concatenate(logits), np.concatenate(ood)


def resolve_tta(model: Model, tta: bool | None) -> bool:
    """``tta`` if given, else the model's own setting (on for adapted models): one rule for every command."""
    return model.config.tta if tta is None else tta


def dihedral_views(batch: np.ndarray) -> list[np.ndarray]:
    """The eight rotations and reflections of each NCHW image; the first is the image as given."""
    return [np.ascontiguousarray(np.rot90(v, k, axes=(2, 3))) for v in (batch, batch[..., ::-1]) for k in range(4)]


def _onnx_runner(model: OnnxModel, fp32: bool = False) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]:
    score = model.fp32_scores if fp32 else model.scores
    return lambda batch: score(np.multiply(batch, 1 / 255, dtype=np.float32))


def _torch_runner(model: WBCNet) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]:
    import torch

    model.eval()
    device = next(model.parameters()).device

    def run(batch: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        with torch.inference_mode():
            parts = [model.scores(as_input(b, device)) for b in torch.as_tensor(batch).split(TORCH_BATCH)]
        logits, ood = (torch.cat(outputs).float().cpu().numpy() for outputs in zip(*parts))
        return logits, ood

    return run


def softmax(logits: np.ndarray) -> np.ndarray:
    """Class probabilities from logits, row by row."""
    exp = np.exp(logits - logits.max(1, keepdims=True))
    return exp / exp.sum(1, keepdims=True)


def predict_proba(
    model: Model,
    paths: Sequence[Path],
    batch_size: int = 64,
    workers: int | None = None,
    progress: bool = True,
    adabn: bool = False,
    tta: bool | None = None,
    on_batch: Callable[[Sequence[Path], Scores], None] | None = None,
) -> Scores:
    """Class probabilities and OOD scores of image files, with which could be read and what is wrong
    with the pictures (grey, dark, blank, several pages: see :class:`Scores`).

    Unreadable images and each problem are counted in a warning. ``adabn`` re-estimates batch-norm
    statistics on these images first (they should come from one lab); ``tta`` averages over
    rotations and flips (``None``: the model's own setting). See :mod:`wbcid.testtime` and
    :mod:`wbcid.ood`. ``on_batch`` is given each batch's files and scores as they finish (predict
    keeps them, so an interrupted run resumes).
    """
    batches = image_batches(paths, Preprocess.of(model.config), batch_size, workers)
    if adabn:
        if isinstance(model, OnnxModel):
            raise WbcidError("test-time AdaBN (--adabn) needs the PyTorch model, not an ONNX export")
        import torch

        from .testtime import adapt_batchnorm

        batches = list(batches)
        model = adapt_batchnorm(model, torch.cat([torch.from_numpy(b.images[b.readable]) for b in batches]))
    done: list[Scores] = []
    for start, batch in zip(
        range(0, len(paths), batch_size),
        tqdm(
            batches,
            total=-(-len(paths) // batch_size),
            desc="predicting",
            disable=None if progress else True,
            leave=False,
        ),
    ):
        logits, ood = predict_scores(model, [batch.images], tta)
        probs, ood = softmax(logits), ood.astype(np.float64)
        probs[~batch.readable], ood[~batch.readable] = np.nan, np.nan
        done.append(Scores(probs, ood, batch.readable, batch.problem))
        if on_batch is not None:
            on_batch(paths[start : start + batch_size], done[-1])
    scores = _joined(done)
    if not scores.readable.all():
        log.warning(
            "%d of %d images could not be read and have no prediction, e.g. %s",
            (~scores.readable).sum(),
            len(paths),
            paths[int(np.argmin(scores.readable))],
        )
    for problem, message in PROBLEMS.items():
        if (found := scores.problem == problem).any():
            log.warning("%d image(s) flagged: %s (e.g. %s)", found.sum(), message, paths[found.argmax()])
    return scores


def _joined(batches: Sequence[Scores]) -> Scores:
    """The scores of consecutive batches as one; of none, empty arrays."""
    if not batches:
        return Scores(np.empty((0, len(CLASSES)), np.float32), np.empty(0), np.empty(0, bool), np.empty(0, object))
    return Scores(*(np.concatenate(column) for column in zip(*batches)))


def prediction_table(probs: np.ndarray, ood: np.ndarray, ok: np.ndarray, problem: np.ndarray) -> pd.DataFrame:
    """Label, its probability, OOD score, flag and all class probabilities, one row per input.

    ``problem`` (:class:`Scores`): a readable picture in grey, nearly black, blank or of several pages
    is flagged with the reason in ``error`` (as ``count`` does not count such fields): the model still
    answers, a grey cell often confidently from shape alone."""
    best = np.nan_to_num(probs, nan=-1).argmax(1)
    if ok.any() and np.isnan(ood[ok]).all():
        log.warning("this model has no out-of-distribution scorer (trained before wbcid 0.2?); nothing is flagged")
    return pd.DataFrame(
        {
            "label": [CLASSES[i] if k else "" for i, k in zip(best, ok)],
            "probability": np.where(ok, np.nan_to_num(probs).max(1), np.nan),
            "ood_score": ood,
            "flagged": flagged(ood) | ~ok | (problem != ""),  # an image without a prediction needs eyes too
            "error": [PROBLEMS.get(k, "") if readable else UNREADABLE_MESSAGE for k, readable in zip(problem, ok)],
            **{f"p_{name}": probs[:, i] for i, name in enumerate(CLASSES)},
        }
    )


def agreement(reference: Model, other: Model, paths: Sequence[Path]) -> dict:
    """How closely two models agree (e.g. fp32 vs fp16, PyTorch vs ONNX Runtime) on real images."""
    p_ref, _, ok, _ = predict_proba(reference, paths)
    p_other = predict_proba(other, paths).probs
    return {
        "images": int(ok.sum()),
        "label_agreement": float(np.mean(p_ref[ok].argmax(1) == p_other[ok].argmax(1))),
        "max_probability_difference": float(np.abs(p_ref[ok] - p_other[ok]).max()),
    }


def predict(
    model: Model | str | os.PathLike | None,
    paths: Inputs,
    out_csv: str | os.PathLike | None = None,
    batch_size: int = 64,
    adabn: bool = False,
    tta: bool | None = None,
    precision: str = "auto",
    resume: bool = False,
) -> pd.DataFrame:
    """Classify image files (folders are searched recursively); one row per image.

    Columns: ``path``, ``label``, ``probability``, ``ood_score``, ``flagged`` (not like the cells
    the model knows, or unreadable: check by eye, see :mod:`wbcid.ood`), ``error``, ``p_<class>``
    for each class and ``model`` (as reports name it). Unreadable images keep their row with an
    empty label and an ``error``, so no input silently disappears; if none could be read the CSV
    is still written and :class:`WbcidError` is raised. ``precision``: see :func:`wbcid.serving.choose_precision`.
    Until the CSV is written, each finished batch is kept in :func:`progress_log`: ``resume=True``
    continues an interrupted prediction there (same model and settings) without redoing them.
    """
    progress = None
    if out_csv is not None:
        out_csv = prediction_output(out_csv)
        refuse_reviewed(out_csv, prediction_review(out_csv))
        progress = progress_log(out_csv)
        if not resume and progress.exists():
            raise WbcidError(
                f"{progress} holds an interrupted prediction into {out_csv}: pass --resume to continue it, or delete it"
            )
    elif resume:
        raise WbcidError("resume continues a prediction into a CSV: give the CSV it was writing (out_csv)")
    if resume and adabn:
        raise WbcidError("--adabn estimates from all the images at once, so it cannot --resume: run it again whole")
    files = list_images(paths)  # missing or empty inputs fail before the model loads
    name = describe_model(model)
    if resume and precision == "auto":  # continue in the arithmetic it began in: ``auto`` measures afresh
        precision = logged_settings(progress).get("precision", precision)
    model = resolve_model(model, "AdaBN" if adabn else None, choose_precision(precision, len(files)))
    if progress is None or adabn:
        scores = predict_proba(model, files, batch_size, adabn=adabn, tta=tta)
    else:
        scores = _predict_kept(model, files, progress, name, batch_size, tta)
    table = prediction_table(*scores)
    ok = scores.readable
    for i in np.flatnonzero(~ok):  # say why, as count does: a truncated file, a whole-slide scan, ...
        if reason := why_unreadable(files[i]):
            table.loc[i, "error"] = f"{UNREADABLE_MESSAGE} ({reason})"
    table.insert(0, "path", [str(f) for f in files])
    table["model"] = name  # which model answered: a review's Grad-CAM maps are by it, and merged CSVs keep it
    if out_csv is not None:
        Path(out_csv).parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(out_csv, index=False, float_format="%.5f")
        if progress is not None:
            progress.unlink(missing_ok=True)
    if not ok.any():
        raise WbcidError(f"none of the {len(files)} images could be read (each has a row with an 'error')")
    return table


def progress_log(out_csv: Path) -> Path:
    """Where a prediction into ``out_csv`` keeps its finished images until the CSV is written."""
    return out_csv.with_name(out_csv.name + ".progress.jsonl")


def _predict_kept(
    model: Model, files: list[Path], progress: Path, name: str, batch_size: int, tta: bool | None
) -> Scores:
    """:func:`predict_proba`, keeping each finished image in ``progress`` (one JSON line) and taking
    the images a stopped run kept there as they are: resumed, the scores are those of one whole run."""
    settings = {"model": name, "tta": resolve_tta(model, tta), "precision": served_precision(model)["arithmetic"]}
    words = {"model": ("model", str), "tta": ("TTA", lambda on: "on" if on else "off"), "precision": ("precision", str)}
    done = finished_work(progress, settings, words, f"delete {progress} to start again, or write to another --out")
    todo = [i for i, path in enumerate(files) if str(path) not in done]
    if done:
        log.info("resuming: %d of %d images were classified before", len(files) - len(todo), len(files))

    def keep(batch_files: Sequence[Path], scores: Scores) -> None:
        for path, probs, ood, ok, problem in zip(batch_files, *scores):
            entry = {"path": str(path), "probs": probs.tolist() if ok else None, "ood": float(ood), "problem": problem}
            kept.write(json.dumps(entry) + "\n")
        kept.flush()

    progress.parent.mkdir(parents=True, exist_ok=True)
    with appending(progress, settings) as kept:
        new = predict_proba(model, [files[i] for i in todo], batch_size, tta=tta, on_batch=keep)
    probs, ood = np.full((len(files), len(CLASSES)), np.nan, np.float32), np.full(len(files), np.nan)
    ok, problem = np.zeros(len(files), bool), np.full(len(files), "", object)
    probs[todo], ood[todo], ok[todo], problem[todo] = new
    for i, path in enumerate(files):
        if (entry := done.get(str(path))) is not None:  # "grey": a bool, before other problems were found
            ok[i], ood[i] = entry["probs"] is not None, entry["ood"]
            problem[i] = entry.get("problem", "grey" if entry.get("grey") else "")
            if ok[i]:
                probs[i] = entry["probs"]
    return Scores(probs, ood, ok, problem)
