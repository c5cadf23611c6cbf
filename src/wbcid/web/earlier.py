"""Cells verified in a lab's earlier rounds, carried into the review of a later count of them.

In the loop (count, review, adapt, count again) the second count is often of the same fields, now
made by the adapted model, and its review asked again for every cell verified in the first round. An
adapted run lists the exported cells it learned from (its ``labelled.csv``); each lies in a review's
export, whose counts.json gives every verified cell's field, box, label, reviewer and time. A cell of
the new run in the same field whose box overlaps such a cell's by an IoU of at least ``MATCH_IOU`` is
imported verified as it was. The same detector at the same scale finds the same boxes: 70 BCCD
fields counted with the bundled model and again with a model adapted to 40 of their cells gave the
same 78 boxes.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from ..data import CLASSES, read_cells
from ..errors import WbcidError
from ..files import first_file, moved_with, review_export
from ..loading import ADAPTED_CELLS

log = logging.getLogger("wbcid")
MATCH_IOU = 0.5  # PASCAL VOC's criterion for one object found twice; not fitted to any data here


@dataclass(frozen=True)
class Verdict:
    """A person's label for one cell of an earlier review."""

    image: str  # the field (or cell image), resolved
    box: tuple[float, ...] | None
    label: str
    reviewer: str | None
    reviewed_at: str | None


def earlier_verdicts(model: str | None, counted_in: str | None = None) -> tuple[list[Verdict], list[Path]]:
    """The verdicts of the reviews whose exports taught ``model`` (as a run recorded it; a relative
    path is also read from ``counted_in``, the folder the run was made in), and those exports.

    Each export is read as it is now: a cell by the type folder its picture lies in (moved by hand
    to another type's folder, it is that type), a cell verified as not a WBC too, one whose picture
    was deleted from the export asked again; cells verified and exported again after the model was
    adapted are carried as well.
    """
    run = _adapted_run(model, counted_in)
    if run is None:
        return [], []
    exports = sorted({p.parents[2] for p in _learned_cells(run) if len(p.parents) > 2 and review_export(p.parents[2])})
    verdicts = []
    for export in exports:
        try:
            verdicts += _export_verdicts(export)
        except (OSError, ValueError, KeyError, TypeError, WbcidError) as exc:  # an export damaged or edited by hand
            log.warning("%s: its verified cells cannot be read (%s); they are asked again", export, exc)
    return verdicts, exports


def _export_verdicts(export: Path) -> list[Verdict]:
    """The verified cells of one export, as :func:`earlier_verdicts` reads them."""
    kept = {cell.path.stem: CLASSES[cell.label] for cell in read_cells(export).cells}
    verdicts = []
    for cell in json.loads((export / "counts.json").read_text())["cells"]:
        label = kept.get(str(cell["id"]), None if cell["label"] in CLASSES else cell["label"])
        if cell["reviewed"] and label is not None:
            box = tuple(cell["box"]) if cell["box"] else None
            verdicts.append(Verdict(os.path.realpath(cell["image"]), box, label, cell["reviewer"], cell["reviewed_at"]))
    return verdicts


def matches(cells: Iterable[tuple[object, str, tuple | None]], verdicts: list[Verdict]) -> dict[object, Verdict]:
    """For each ``(key, image, box)`` cell, the latest earlier verdict on the same cell, where there is one."""
    by_image: dict[str, list[Verdict]] = {}
    for verdict in verdicts:
        by_image.setdefault(verdict.image, []).append(verdict)
    found = {}
    for key, image, box in cells:
        same = [v for v in by_image.get(os.path.realpath(image), []) if _iou(box, v.box) >= MATCH_IOU]
        if same:
            found[key] = max(same, key=lambda v: v.reviewed_at or "")
    return found


def _adapted_run(model: str | None, counted_in: str | None) -> Path | None:
    """The run directory of ``model`` if ``adapt`` made it (its list of verified cells is there)."""
    if not model:
        return None
    candidates = [Path(model)] + ([Path(counted_in) / model] if counted_in and not os.path.isabs(model) else [])
    found = first_file((path if path.is_dir() else path.parent) / ADAPTED_CELLS for path in candidates)
    return None if found is None else found.parent


def _learned_cells(run: Path) -> list[Path]:
    """An adapted run's verified cells, found where they lay relative to the run if the lab's folder
    moved since (as :func:`wbcid.adaptation.earlier_rounds` finds them)."""
    try:
        then = json.loads((run / "config.json").read_text())["model"]["adaptation"]["folder"]
    except (OSError, ValueError, KeyError, TypeError):
        then = None
    try:
        paths = pd.read_csv(run / ADAPTED_CELLS, dtype=str, usecols=["path"]).path.dropna()
    except (OSError, ValueError) as exc:  # edited by hand: no earlier round to carry, but the review goes on
        log.warning(
            "%s: cannot be read (%s); cells verified in earlier rounds are asked again", run / ADAPTED_CELLS, exc
        )
        return []
    return [Path(moved_with(path, then, str(run.resolve()))) for path in paths]


def _iou(a: tuple | None, b: tuple | None) -> float:
    """Intersection over union of two boxes (x0, y0, x1, y1); two cell images (no box) are one cell.
    (torchvision's ``box_iou`` would cost the review's start PyTorch's import, about 2 s.)"""
    if a is None or b is None:
        return float(a is None and b is None)
    width = min(a[2], b[2]) - max(a[0], b[0])
    height = min(a[3], b[3]) - max(a[1], b[1])
    common = max(0.0, width) * max(0.0, height)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - common
    return common / union if union > 0 else 0.0
