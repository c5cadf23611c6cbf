"""What a review is made of: the cells of a run, read once into the review's database.

A run is the output of ``wbcid count`` (a folder with ``counts.json``: each field's boxes) or of
``wbcid predict`` (a CSV: one cell image a row). Each cell becomes a row of the review's cells table
(see :data:`wbcid.web.store.SCHEMA`), its image found where it is now (:func:`located`), and a
flagged one says why.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from ..contract import flagged
from ..data import CLASSES
from ..errors import WbcidError
from ..files import (
    COUNT_LOG,
    IMAGE_SUFFIXES,
    PREDICTION_COLUMNS,
    first_file,
    prediction_review,
    read_table,
    relocated,
)
from ..smear.differential import REFERENCE_RANGES

CUT = "cut by the field's edge or the dark beyond it"  # a flagged cell's reasons (``why``), joined by "and"
UNLIKE = "unlike the cells the model learned from"
SEVERAL = " + "  # joins the models of a CSV merged from several predictions


def read_run(run: Path) -> tuple[Path, Path, list[tuple], dict, dict | None]:
    """A count folder's or prediction CSV's cells as rows of the cells table: the run (a count's folder
    where its counts.json was named), the review's folder, the rows, the meta, and where the run was
    made (``counted_in``: None for a count made before wbcid recorded it)."""
    if run.is_file() and run.name == "counts.json":  # the count's file named instead of its folder
        run = run.parent
    if run.is_dir() and (run / "counts.json").is_file():
        result = json.loads((run / "counts.json").read_text())  # read once: rows and meta both come from it
        return run, run, _count_rows(result), _count_meta(result), result.get("counted_in")
    if run.is_file() and run.suffix.lower() not in IMAGE_SUFFIXES:  # `predict --out` takes any name
        # not recorded in a CSV: taken to have run in the CSV's folder (as a manifest's paths are read)
        made_in = {"cwd": os.path.abspath(run.parent), "folder": os.path.abspath(run)}
        return run, prediction_review(run), *_prediction_rows(run), made_in
    if run.is_dir() and (run / COUNT_LOG).is_file():
        raise WbcidError(f"{run}: the count did not finish; complete it with `wbcid count ... --resume` first")
    hint = "; to review cell images, classify them first: `wbcid predict --out cells.csv IMAGES`"
    raise WbcidError(
        f"{run}: expected the output of `wbcid count` (a folder with counts.json) "
        f"or of `wbcid predict` (a .csv){hint * (run.suffix.lower() in IMAGE_SUFFIXES or run.is_dir())}"
    )


def _count_rows(result: dict) -> list[tuple]:
    return [
        (
            entry["path"],
            entry.get("specimen", Path(entry["path"]).parent.name),  # counts before specimens: the folder
            json.dumps(d["box"]),
            d["label"],
            d["confidence"],
            d["ood_score"],
            int(d["flagged"]),
            _why(d["flagged"], d["ood_score"], CUT if d.get("edge") else ""),
            d["label"],
        )
        for entry in result["images"]
        for d in entry.get("detections", [])
    ]


def common_folder(images: Iterable[str]) -> str:
    """The folder that holds every one of ``images`` (absolute paths), however deep."""
    folders = [os.path.dirname(image) for image in images]
    try:
        return os.path.commonpath(folders)
    except ValueError:  # Windows: images on several drives
        return folders[0]


def located(
    rows: list[tuple], run: Path, made_in: dict | None = None, images: str | os.PathLike | None = None
) -> list[tuple]:
    """``rows`` with each image's path made absolute, so that a review started from any folder finds
    them: ``count`` and ``predict`` record paths as given, relative ones to the folder they ran in.
    A count also records that folder and its own (``made_in``, its ``counted_in``): moved together
    with its fields, they are found where they lay relative to it; a prediction CSV's are also looked
    for relative to the CSV's folder; with ``images`` (``--images``), below that folder as they lay
    below their common one. No image found is an error here (the review started from another
    folder), not a page of broken pictures; some missing (moved or deleted since) are a warning
    when the server starts."""
    root = common_folder(os.path.abspath(row[0]) for row in rows) if images is not None else ""

    def where(image: str) -> str:
        candidates = [os.path.abspath(image)]
        if made_in:
            candidates.append(relocated(os.path.join(made_in["cwd"], image), made_in["folder"], os.path.abspath(run)))
        if images is not None:
            candidates.append(relocated(os.path.abspath(image), root, os.path.abspath(images)))
        return first_file(candidates, candidates[0])

    found = {image: where(image) for image in {row[0] for row in rows}}
    missing = sorted(image for image, path in found.items() if not os.path.isfile(path))
    if len(missing) == len(found):
        advice = (
            "moved since? pass --images with the folder they were moved to, or put them back"
            if os.path.isabs(missing[0])  # the folder the review starts from makes no difference
            else f"relative paths are read from the folder you are in ({os.getcwd()}): start the review from "
            "the folder the count or prediction ran in"
        )
        raise WbcidError(
            f"{run}: {len(missing)} of its {len(found)} images are not where it records them, e.g. {missing[0]}; "
            + advice
        )
    return [(found[row[0]], *row[1:]) for row in rows]


def _count_meta(result: dict) -> dict:
    return {
        "model": result.get("model"),
        "reference": result.get("reference", {}).get("ranges", REFERENCE_RANGES),
        "kind": "count",
        "warnings": result.get("warnings", []),  # e.g. types the model was adapted without: shown on the page
    }


def _prediction_rows(csv_path: Path) -> tuple[list[tuple], dict]:
    """The cells of a `wbcid predict` CSV, and its meta: the model that answered, where the CSV names one."""
    table = read_table(csv_path)
    missing = PREDICTION_COLUMNS - set(table.columns)
    if missing:
        raise WbcidError(f"{csv_path}: not a `wbcid predict` CSV (missing columns {sorted(missing)})")
    models = sorted(set(table.get("model", [])))
    meta = {"kind": "predictions", "model": SEVERAL.join(models) or None}
    table = table[table["label"].isin(CLASSES)]  # unreadable images have no call to review
    flags = table["flagged"].astype(str).str.lower().isin(["true", "1"])
    oods = [None if score == "" else float(score) for score in table["ood_score"]]
    return [
        (
            str(row.path),
            "",  # a prediction run is one group: its folders may be classes, not specimens
            None,
            row.label,
            float(row.probability),
            ood,
            int(flag),
            _why(flag, ood, getattr(row, "error", "")),
            row.label,
        )
        for row, flag, ood in zip(table.itertuples(index=False), flags, oods)
    ], meta


def _why(flagged_: bool, ood_score: float | None, *reasons: str) -> str | None:
    """Why a flagged cell is flagged, in words, for the page: the count's or predict's own reasons (a
    cell cut by the field's edge, a grey picture) and an OOD score over its threshold."""
    if not flagged_:
        return None
    said = [*filter(None, reasons), *([UNLIKE] if ood_score is not None and flagged(ood_score) else [])]
    return " and ".join(said) or None
