"""``wbcid adapt``: verified cells in, an ordinary run directory out; a later round learns from every cell."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path

import pandas as pd
import torch

from ..data import CLASSES, Cell, CellSet, read_all, read_cells
from ..decoding import load_images
from ..errors import WbcidError
from ..files import list_images, moved_with, output_folder
from ..loading import ADAPTED_CELLS, describe_model, resolve_model
from ..models import WBCNet, save_model
from ..preprocess import Preprocess
from ..splits import group_ids
from .config import AdaptConfig
from .finetune import adapt_model
from .replay import decode_replay, make_replay

log = logging.getLogger("wbcid")


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
    from ..export import export_run
    from ..testtime import batchnorm_statistics

    started = time.perf_counter()
    config = config or AdaptConfig()
    config = replace(config, precision=config.resolved_precision)
    if (Path(out_dir) / ADAPTED_CELLS).is_file():  # the lab verified more cells and adapts "again" into it
        raise WbcidError(
            f"{out_dir} already holds an adapted model; to teach it more verified cells, name it as the base "
            f"and write the new model elsewhere: --model {out_dir} --out ANOTHER (it learns the cells it "
            "was adapted to and the new ones together)"
        )
    out = output_folder(out_dir, "the adapted run", run=True)
    cells = _without_test(data if isinstance(data, CellSet) else read_all(data))  # fails before the model loads
    base = resolve_model(model, needs_torch="adaptation")
    base.split(config.trainable_groups)  # a number of layer groups the model lacks fails before any decoding
    start, new = model, len(cells)
    if config.earlier and base.config.adaptation:
        start, cells = earlier_rounds(base, model, cells)
        base = base if start is model else resolve_model(start, needs_torch="adaptation")
    earlier = len(cells) - new  # counted before decoding, which drops unreadable cells of either round
    origin = _origin(start)
    prep = Preprocess.of(base.config)
    found = CellSet([Cell(p) for p in list_images(unlabelled)], origin="unlabelled cells") if unlabelled else None
    replay = read_cells(replay) if isinstance(replay, (str, os.PathLike)) else replay
    images, cells = load_images(cells, prep, "decoding verified cells")  # after every input is found: fail fast
    unlabelled_images = None if found is None else load_images(found, prep, "decoding unlabelled cells")[0]
    log.info(
        "adapting to %d verified cells (%s)", len(cells), ", ".join(f"{k} {v}" for k, v in cells.class_counts().items())
    )
    replay_arguments, replay_origin = decode_replay(base, replay, prep, config)
    bank = None
    if replay_arguments is not None:
        bank = make_replay(base, config=config, desc="replay cells through the frozen layers", **replay_arguments)
    else:
        log.warning(
            "no training cells of the base model to replay (pass --replay DATA): the adapted model "
            "may forget the labs it knew, and its OOD threshold rests on the verified cells alone"
        )
    adapted = adapt_model(base, images, cells.labels, config, bank, unlabelled_images, group_ids(cells))
    statistics_images = images if bank is None else torch.cat([images, bank.images])
    adapted.source_statistics = batchnorm_statistics(adapted, statistics_images)
    verified = [[str(c.path.resolve()), CLASSES[c.label]] for c in cells.cells]
    adaptation = {**origin, "cells": cells.class_counts(), "verified": verified, "folder": str(out.resolve())}
    adapted.config = replace(adapted.config, adaptation=adaptation)
    if warning := adapted.config.unverified_warning():
        log.warning(warning)
    partial = out.with_name(f"{out.name}.partial-{os.getpid()}")  # its own: two adapts into one --out at once
    partial.mkdir(parents=True)
    try:
        save_model(adapted, partial / "model.pt")
        export_run(adapted, partial)  # what predict and count serve: 4x faster than PyTorch
        pd.DataFrame(verified, columns=["path", "label"]).to_csv(partial / ADAPTED_CELLS, index=False)
        record = {
            "adapt": asdict(config),
            "model": adapted.config.to_dict(),
            "base_model": origin["base"],
            "continued_from": None if start is model else str(model),
            "earlier_cells": earlier,  # verified for the model's earlier rounds (earlier_rounds)
            "verified_cells": cells.class_counts(),
            "skipped": dict(cells.skipped),
            "replay": replay_origin,
            "unlabelled_cells": 0 if unlabelled_images is None else len(unlabelled_images),
            "seconds": round(time.perf_counter() - started, 1),
        }
        (partial / "config.json").write_text(json.dumps(record, indent=2, default=str))
    except BaseException:  # interrupted or failed: a half-written model is never left to load
        shutil.rmtree(partial, ignore_errors=True)
        raise
    try:
        if out.exists():
            out.rmdir()
        os.replace(partial, out)
    except OSError as exc:  # filled meanwhile: the model is whole, and kept
        raise WbcidError(
            f"{out} was filled while this adaptation ran (another `wbcid adapt` into it?); this adapted model is "
            f"kept in {partial}: move it where you want it"
        ) from exc
    return out


def _without_test(cells: CellSet) -> CellSet:
    """The cells adaptation learns from: those of a ``test`` split (a manifest's column, a ``test/``
    folder) never train, as in ``wbcid train``, so the adapted model can still be scored on them."""
    kept = cells.subset([c.split != "test" for c in cells.cells])
    if held := len(cells) - len(kept):
        if not kept.cells:
            raise WbcidError(
                f"{cells.origin}: all {held} cells are in the test split, and test cells never train: pass the "
                "train split's cells, or a review's export"
            )
        reason = "in the test split: left out of training (score the adapted model on them: evaluate --split test)"
        kept.skipped[reason] += held
        log.warning("%s: %d cell(s) %s", cells.origin, held, reason)
    return kept


def _origin(model: str | os.PathLike | None) -> dict:
    """How an adapted model records its base: its name for reports, and where to find it again for a
    later round (``base_path``: None for the bundled model; absent for a model passed as an object)."""
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
    then = record.get("folder")  # where the run was made; absent in runs adapted before wbcid recorded it
    now = None
    if isinstance(model, (str, os.PathLike)):
        now = str(Path(model).resolve() if Path(model).is_dir() else Path(model).resolve().parent)

    kept = [
        Cell(Path(moved_with(path, then, now)), CLASSES.index(label), source="verified earlier")
        for path, label in record["verified"]
    ]
    earlier = CellSet([c for c in kept if c.path.is_file()], origin=f"cells verified for {model}")
    if missing := len(kept) - len(earlier):
        earlier.skipped["verified for an earlier round, no longer on disk"] = missing
        log.warning("%s: %d of the cells verified for its earlier rounds are no longer on disk", model, missing)
    log.info("adding the %d cells verified for %s's earlier rounds", len(earlier), model)
    start = record.get("base_path", model)
    start = start if start is None or start == model else moved_with(start, then, now)
    if start is not None and not Path(start).exists():
        log.warning(
            "%s's base model %s is not here: the adapted model itself is tuned to all its verified cells",
            model,
            start,
        )
        start = model
    merged = CellSet.merged([earlier, cells])
    if again := len(earlier) + len(cells) - len(merged):  # a later review shows its earlier cells verified
        log.info("%d of the verified cells are also among the earlier rounds' (the same pictures): learned once", again)
    return start, merged
