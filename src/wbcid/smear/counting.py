"""From smear fields to a differential count: detect every WBC, classify it, count, and report.

Each percentage comes with its exact 95 % binomial interval (:mod:`wbcid.smear.differential`).
Cells the model flags as unlike anything it knows (:mod:`wbcid.ood`) are listed apart and left out
of the percentages.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from tqdm.auto import tqdm

from ..contract import flagged
from ..crop import unlit
from ..data import CLASSES
from ..decoding import (
    GREY_MODES,
    GREY_REASON,
    PROBLEMS,
    UNREADABLE,
    blank_or_dark,
    map_ahead,
    pictures,
    unreadable_reason,
)
from ..errors import WbcidError
from ..files import (
    COUNT_LOG,
    Inputs,
    appending,
    finished_work,
    input_paths,
    list_images,
    logged_settings,
    output_folder,
    refuse_reviewed,
    restate,
    short_name,
)
from ..inference import predict_scores, resolve_tta, softmax
from ..loading import Model, describe_model, resolve_model
from ..preprocess import Preprocess, upright_rgb
from ..serving import choose_precision, served_precision
from .detect import Box, FieldObjects, detect_cells
from .differential import REFERENCE_RANGES, REFERENCE_SOURCE, differential, unfamiliar
from .learned import MAX_JITTER, find_objects
from .scale import SETTLED, confirmed, rbc_diameters, wbc_diameter
from .specimens import cells_short, group_fields, specimen_table

log = logging.getLogger("wbcid")

DEFAULT_CELL_DIAMETER = 200.0  # px: BCCD's 640x480 fields at 100x; used when no field shows red cells
SCALE_FIELDS = 20  # fields sampled to measure the scale (each at least twice: the coarsest copy, a finer one)
REFINE_ROUNDS = 3  # at most; each runs the sampled fields through the detector again (~10 ms each)
# Fields of several microscopes or magnifications in one folder get one scale, wrong for some of them. A
# field's own red-cell size (the learned detector's, each field's rbc_diameter) lay within 15 % of the
# annotated one on 95-100 % of the held-out fields of each of TXL-PBC's four labs and BCCD (docs/scale.md,
# second table), so one microscope's sampled fields rarely leave that band around their median; more than
# a third of them outside it (about 7x the share expected) points to several scales in one folder.
# Granulometry alone (--detector stain) is too loose for this (within 15 % on 79-96 %: first table).
SCALE_BAND, MIXED_SHARE = 0.15, 1 / 3
MAX_CELLS_ACROSS = 40  # a field wider than 40 WBCs is not a smear field at WBC magnification (reasoned)
MIN_FIELD = 16  # pixels: a smaller image cannot show a WBC at any magnification (reasoned, not fitted)


def _stain_objects(image: Image.Image, cell_diameter: float) -> FieldObjects:
    """The stain detector's WBCs; it boxes no red cells, so the scale stays the granulometric one."""
    return FieldObjects(detect_cells(image, cell_diameter))


DETECTORS = {"learned": find_objects, "stain": _stain_objects}  # docs/detection.md compares them
RED_CELL_BOXES = {"learned": find_objects}  # the detectors that also box red cells (refine the scale)
CONTEXT = 1.5  # side of the patch cut around a detection, as a multiple of the box's longer side
BOX_COLOURS = {
    "neutrophil": "#1f77b4",
    "lymphocyte": "#2ca02c",
    "monocyte": "#ff7f0e",
    "eosinophil": "#d62728",
    "basophil": "#9467bd",
    "flagged": "#7f7f7f",
}


@dataclass
class CellCall:
    """One detected WBC and what the model says about it."""

    box: Box
    label: str
    confidence: float
    ood_score: float
    flagged: bool  # for review, not counted: unlike the training cells (ood_score > 1) or cut by the edge
    edge: bool = False  # the box touches the field's border or an eyepiece's dark ring: part of the cell is unseen


def cell_patch(image: Image.Image, box: Box, prep: Preprocess) -> np.ndarray:
    """The model's input for one detection: a square patch around it, framed as in training.

    The patch stops at the field's edge (PIL would fill the rest with black, which no training
    image has); the canonical crop then centres the nucleus and pads with the background colour.
    """
    x0, y0, x1, y1 = box
    half = CONTEXT * max(x1 - x0, y1 - y0) / 2
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    window = (
        max(0, round(cx - half)),
        max(0, round(cy - half)),
        min(image.width, round(cx + half)),
        min(image.height, round(cy + half)),
    )
    return prep(image.crop(window))


def classify_field(
    model: Model,
    image: Image.Image,
    cell_diameter: float = DEFAULT_CELL_DIAMETER,
    detector: str = "learned",
    tta: bool | None = None,
) -> tuple[list[CellCall], float | None]:
    """Detect (with one of :data:`DETECTORS`) and classify every WBC in one RGB smear field; also the
    field's red-cell diameter where the detector measures it. ``tta``: as in :func:`predict_scores`."""
    found = DETECTORS[detector](image, cell_diameter)
    boxes = [d.box for d in found.wbcs]
    if not boxes:
        return [], found.rbc_diameter
    prep = Preprocess.of(model.config)
    patches = np.stack([cell_patch(image, b, prep) for b in boxes]).transpose(0, 3, 1, 2)
    logits, ood = predict_scores(model, [patches], tta)
    probs = softmax(logits)
    edges = [on_edge(box, image.size) or in_the_dark(image, box) for box in boxes]
    calls = [
        CellCall(box, CLASSES[int(p.argmax())], float(p.max()), float(o), bool(f or e), e)
        for box, p, o, f, e in zip(boxes, probs, ood, flagged(ood), edges)
    ]
    return calls, found.rbc_diameter


def on_edge(box: Box, size: tuple[int, int], margin: int = 1) -> bool:
    """Whether a detection touches the field's border, i.e. the cell is cut by it.

    Such a cell is flagged for review and not counted: its visible part may lack the nucleus lobes
    or granules that tell the types apart, and the next field may show the rest of it, so a
    technologist decides (the battlement rule of manual differentials likewise counts cells on
    some edges only). ``wbcid review`` shows it with the other flagged cells."""
    x0, y0, x1, y1 = box
    return x0 <= margin or y0 <= margin or x1 >= size[0] - margin or y1 >= size[1] - margin


def in_the_dark(image: Image.Image, box: Box) -> bool:
    """Whether a detection reaches pixels no light reached (:func:`wbcid.crop.unlit`): the dark ring
    of a photo taken through the eyepiece cuts a cell as the image's border does (:func:`on_edge`).
    Of the WBCs found in 364 BCCD and 200 TXL-PBC fields, only cells already on the border did."""
    x0, y0, x1, y1 = (round(v) for v in box)
    inside = (max(0, x0), max(0, y0), min(image.width, x1), min(image.height, y1))  # PIL pads outside with black
    return bool(unlit(np.asarray(image.crop(inside))).any())


def count(
    model: Model | str | os.PathLike | None,
    paths: Inputs,
    out_dir: str | os.PathLike,
    cell_diameter: float | None = None,
    reference: dict[str, tuple[float, float]] | None = None,
    resume: bool = False,
    detector: str = "learned",
    tta: bool | None = None,
    precision: str = "auto",
) -> dict:
    """Count WBCs in smear fields; writes counts.json, annotated fields, flagged cells and report.html.

    An image that cannot be read, or holds no WBC, is reported as such; the others are counted.
    Each finished field is appended to ``fields.jsonl`` at once, so ``resume=True`` continues an
    interrupted count (same model and cell diameter) without redoing the fields already done, at
    the scale it began with (:func:`kept_scales`) unless ``cell_diameter`` is given; a specimen
    folder added meanwhile is counted at its own.
    ``cell_diameter`` (the WBC diameter in pixels) is measured from each specimen's red cells when
    not given (:func:`estimate_scale`); counts.json says which and how. A folder of folders is one
    specimen per subfolder (:mod:`wbcid.smear.specimens`): counts.json, ``specimens.csv`` and the
    report give each its differential. ``detector``: one of :data:`DETECTORS`. ``tta``: classify
    over rotations and flips (``None``: as the model's config says; adapted models do).
    ``precision``: ``auto`` is fp32 here: each field sends a few cells at a time, where OpenVINO's
    cost per call outweighs bf16 (docs/serving.md: forced bf16 counted slower); ``bf16`` forces it.
    """
    from ..reports import write_count_report

    name = describe_model(model)
    out_dir = output_folder(out_dir, "the count", replaces=(COUNT_LOG, "counts.json", "specimens.csv", "report.html"))
    if cell_diameter is not None and not (
        isinstance(cell_diameter, (int, float)) and math.isfinite(cell_diameter) and cell_diameter > 0
    ):
        raise WbcidError(f"--cell-diameter must be a positive number of pixels, not {cell_diameter}")
    if detector not in DETECTORS:
        raise WbcidError(f"--detector must be one of {', '.join(DETECTORS)}, not {detector!r}")
    if not resume and (out_dir / COUNT_LOG).exists():  # before the scale and the model: seconds to minutes
        raise WbcidError(f"{out_dir} already holds a count; pass --resume to continue it or choose another --out")
    refuse_reviewed(out_dir, out_dir)  # a resumed count would add fields its review never shows
    paths = input_paths(paths)
    fields = list_images(paths)  # missing or empty inputs fail before the model loads
    groups, notes = group_fields(paths, fields)
    for note in notes:
        log.warning(note)
    began = logged_settings(out_dir / COUNT_LOG).get("scales", {}) if resume else {}
    if gone := sorted(began.keys() - groups.keys()):  # was "made with other settings", every scale listed
        raise WbcidError(
            f"{out_dir} began with specimen(s) {', '.join(gone)}, which these inputs do not hold (a folder moved or "
            "renamed, or the inputs given otherwise): give the same inputs to resume it, or count these into "
            "another --out"
        )
    refine = RED_CELL_BOXES.get(detector)  # measured after the checks above: seconds to minutes
    measured = {specimen: estimate_scale(members, refine=refine) for specimen, members in groups.items()}
    scales = {s: m if cell_diameter is None else given_scale(cell_diameter, m) for s, m in measured.items()}
    if resume and cell_diameter is None:
        scales = kept_scales(began, scales)
    for specimen, scale in scales.items():
        if "warning" in scale:
            notes.append(f"specimen {specimen}: {scale['warning']}" if len(scales) > 1 else scale["warning"])
            log.warning(notes[-1])
    specimen_of = {field: specimen for specimen, members in groups.items() for field in members}
    model = resolve_model(model, precision=choose_precision("fp32" if precision == "auto" else precision, len(fields)))
    if unverified := model.config.unverified_warning():  # in counts.json and the report, beside the counts
        log.warning(unverified)
        notes.append(unverified)
    tta = resolve_tta(model, tta)
    (out_dir / "annotated").mkdir(parents=True, exist_ok=True)
    settings = {"model": name, "scales": scales, "detector": detector, "tta": tta}
    added = sorted(scales.keys() - began.keys()) if began else []
    compared = settings | {"scales": {s: scales[s] for s in began}} if added else settings  # the new ones: unlogged
    done = _finished_fields(out_dir / COUNT_LOG, compared)
    if added:  # specimen folders saved while the count was stopped: it was refused as "other settings"
        restate(out_dir / COUNT_LOG, settings)
        log.info(
            "%d specimen(s) added since the count began (%s): counted at their own scale", len(added), ", ".join(added)
        )

    def work(index: int) -> tuple[dict, bool]:
        """A field's entry, and whether it is new (not already in the log of a resumed count)."""
        path = fields[index]
        if str(path) in done:
            return done[str(path)], False
        diameter = scales[specimen_of[path]]["cell_diameter"]
        entry = count_field(model, path, diameter, out_dir, index + 1, detector, tta)
        return entry | {"specimen": specimen_of[path]}, True

    images = []
    with appending(out_dir / COUNT_LOG, settings) as field_log:
        counted = map_ahead(work, range(len(fields)))  # fields in parallel threads, the log written in order
        for entry, new in tqdm(counted, total=len(fields), desc="counting", disable=None, leave=False):
            if new:
                field_log.write(json.dumps(entry) + "\n")
                field_log.flush()
            images.append(entry)
    if not any("size" in e for e in images):
        raise WbcidError(f"none of the {len(images)} images could be read")
    specimens = {}
    for specimen, scale in scales.items():
        members = [e for e in images if e["specimen"] == specimen]
        totals = summarise(members, reference)
        specimens[specimen] = {
            "fields": len(members),
            "scale": scale,
            "totals": totals,
            "warnings": [w for w in (cells_short(totals), unfamiliar_cells(members)) if w],
        }
    if note := unfamiliar_cells(images):  # on the report and the review page: the lab's next step
        if any("measured" in scale for scale in scales.values()):  # given_scale's warning: cut at a wrong size
            note += (
                "; but first count again without --cell-diameter, which the red cells contradict (above): "
                "cells found at a wrong size look unlike the model's too"
            )
        log.warning(note)
        notes.append(note)
    result = {
        "model": name,
        "detector": detector,
        "tta": tta,
        "precision": served_precision(model),
        "images": images,
        "totals": summarise(images, reference),
        "specimens": specimens,
        "warnings": notes,
        "counted_in": {"folder": str(out_dir.resolve()), "cwd": os.getcwd()},  # a review finds fields moved with it
        "reference": {
            "source": REFERENCE_SOURCE if reference is None else "user-supplied",
            "ranges": reference or REFERENCE_RANGES,
        },
    }
    (out_dir / "counts.json").write_text(json.dumps(result, indent=2))
    specimen_table(specimens).to_csv(out_dir / "specimens.csv", index=False, float_format="%.1f")
    flagged_cells = [(e, call) for e in images for call in _calls(e) if call.flagged]
    write_count_report(result, _with_patches(flagged_cells), out_dir)
    return result


def summarise(images: list[dict], reference: dict[str, tuple[float, float]] | None) -> dict:
    """The differential of these fields' unflagged cells, with what was detected and flagged."""
    calls = [call for e in images for call in _calls(e)]
    totals = differential([c.label for c in calls if not c.flagged], reference) | {
        "detected": len(calls),
        "flagged": sum(c.flagged for c in calls),
    }
    for name, row in totals["classes"].items():  # flags are not random: show which counts they may bias
        row["flagged_closest"] = sum(c.flagged and c.label == name for c in calls)
    return totals


def unfamiliar_cells(images: list[dict]) -> str | None:
    """:func:`unfamiliar` of these fields' whole cells: those cut by the edge are flagged for that."""
    whole = [c for e in images for c in _calls(e) if not c.edge and math.isfinite(c.ood_score)]
    return unfamiliar(int(flagged([c.ood_score for c in whole]).sum()), len(whole), "whole cells")


def _calls(entry: dict) -> list[CellCall]:
    return [CellCall(**{**d, "box": tuple(d["box"])}) for d in entry["detections"]]


def estimate_scale(
    fields: Sequence[Path], sample: int = SCALE_FIELDS, refine: Callable[..., FieldObjects] | None = None
) -> dict:
    """The WBC diameter for these fields, from the red cells of up to ``sample`` fields spread over
    them (one microscope and camera per run; the median is robust to a few odd fields).
    Falls back to ``DEFAULT_CELL_DIAMETER`` with a ``warning`` when no field shows red cells.

    The red cells are measured by granulometry (:mod:`wbcid.smear.scale`), on the coarsest copy of
    the fields that a finer copy confirms (:func:`wbcid.smear.scale.confirmed`). ``refine``, a detector
    that boxes red cells (:func:`wbcid.smear.learned.find_objects`), then refines that estimate:
    run at it on the same fields, it boxes the red cells as an annotator would, and their median
    size becomes the scale; again at the new scale, until it moves by less than 2 % (docs/scale.md
    compares the two against annotated boxes)."""
    picked = [fields[int(i)] for i in np.unique(np.linspace(0, len(fields) - 1, min(sample, len(fields))).round())]
    unreadable: set[Path] = set()  # said apart from fields without red cells: a different problem

    def opened(path: Path) -> Image.Image | None:
        try:
            return open_field(path)[0]
        except UNREADABLE:
            unreadable.add(path)
            return None

    def ladder(path: Path) -> list[float | None]:
        return [] if (image := opened(path)) is None else rbc_diameters(image)

    def measure(path: Path, diameter: float) -> float | None:
        return None if (image := opened(path)) is None else refine(image, diameter).rbc_diameter

    ladders = list(map_ahead(ladder, picked))
    found = [ladder for ladder in ladders if any(rbc is not None for rbc in ladder)]
    if not found:
        return {
            "cell_diameter": DEFAULT_CELL_DIAMETER,
            "how": "default: no red cells found",
            "fields_measured": 0,
            "warning": f"no red cells to measure the scale in {len(picked)} sampled field(s)"
            f"{f' ({len(unreadable)} of them unreadable)' if unreadable else ''}; assuming WBCs "
            f"{DEFAULT_CELL_DIAMETER:g} px across (BCCD's 640x480 fields): pass --cell-diameter if that is wrong",
        }
    rbc = granulometry = confirmed(ladders)
    how, measured = "from the red cells", []  # only the detector's boxes are tight enough to tell mixed scales
    for _ in range(REFINE_ROUNDS if refine is not None else 0):
        boxed = [m for m in map_ahead(partial(measure, diameter=wbc_diameter(rbc)), picked) if m is not None]
        if not boxed:
            break
        rbc, previous, how, measured = float(np.median(boxed)), rbc, "from the red cells, boxed by the detector", boxed
        if abs(rbc / previous - 1) < 0.02:  # settled: the detector sees the cells at the size it was trained on
            break
    diameter = round(wbc_diameter(rbc), 1)
    log.info(
        "scale from the red cells of %d field(s): red cells %.0f px, WBCs about %.0f px", len(found), rbc, diameter
    )
    scale = {
        "cell_diameter": diameter,
        "how": how,
        "rbc_diameter": round(rbc, 1),
        "rbc_granulometry": round(granulometry, 1),
        "fields_measured": len(found),
        "fields_without_red_cells": len(picked) - len(found),
    }
    off = [m for m in measured if abs(m / rbc - 1) > SCALE_BAND]
    if len(measured) >= 6 and len(off) > MIXED_SHARE * len(measured):
        scale["warning"] = (
            f"{len(off)} of {len(measured)} sampled fields have red cells more than {SCALE_BAND:.0%} off their "
            f"median {rbc:.0f} px ({min(measured):.0f} to {max(measured):.0f} px), unlike the fields of one "
            "microscope: if they come from several microscopes or magnifications, put each in its own folder "
            "(a folder of folders gets a scale per folder), or pass --cell-diameter"
        )
    return scale


def kept_scales(recorded: dict, measured: dict) -> dict:
    """The scales a resumed count goes on at: those it began with, where the fields measure within
    ``SETTLED`` of them again (fields saved since moved the sample's median, 196 to 207 px in four
    BCCD fields, and the resume was refused as made with other settings), or that ``--cell-diameter``
    gave (resumed without the option, the count was refused); a measured scale further off is another
    microscope's, and the one measured now stands, so that the resume is refused."""

    def kept(began: dict | None, now: dict) -> bool:
        return began is not None and (
            began["how"] == "given" or abs(now["cell_diameter"] / began["cell_diameter"] - 1) <= SETTLED
        )

    return {s: recorded[s] if kept(recorded.get(s), scale) else scale for s, scale in measured.items()}


def given_scale(cell_diameter: float, measured: dict) -> dict:
    """``--cell-diameter``, with a warning where the fields' red cells (``measured``: :func:`estimate_scale`)
    put WBCs at a size the detector cannot reach from it: it learned sizes within ``MAX_JITTER`` of the
    one it is given, and a diameter given in micrometres (12) found 15 'WBCs' in two BCCD fields."""
    scale = {"cell_diameter": cell_diameter, "how": "given"}
    if measured["fields_measured"] and not 1 / MAX_JITTER <= cell_diameter / measured["cell_diameter"] <= MAX_JITTER:
        scale["measured"] = measured["cell_diameter"]
        scale["warning"] = (
            f"--cell-diameter {cell_diameter:g} px, but the red cells of these fields put WBCs at about "
            f"{measured['cell_diameter']:.0f} px, beyond the sizes the detector finds from {cell_diameter:g} "
            "(pixels, not micrometres?): leave --cell-diameter out to use the measured scale"
        )
    return scale


def count_field(
    model: Model,
    path: Path,
    cell_diameter: float,
    out_dir: Path,
    index: int,
    detector: str = "learned",
    tta: bool | None = None,
) -> dict:
    """Detect and classify one field; its entry in counts.json (an ``error`` if it cannot be read)."""
    entry: dict = {"path": str(path), "detections": [], "warnings": []}
    try:
        image, stored = open_field(path)
    except UNREADABLE as exc:
        entry["error"] = f"could not read the image ({unreadable_reason(exc)})"
        log.warning("%s: %s", path, entry["error"])
        return entry
    entry["size"] = list(image.size)
    if stored.mode in GREY_MODES:  # a detector may still find cells, but their types could not be told
        entry["warnings"].append(f"grey-scale image: not counted, {GREY_REASON}")
        return entry
    if stored.images > 1:
        entry["warnings"].append(
            f"the file holds {stored.images} images (pages or frames): only the first is counted; save each "
            "field as an image of its own"
        )
    entry["warnings"] += field_problems(image, cell_diameter)
    calls, rbc = classify_field(model, image, cell_diameter, detector, tta)
    entry["detections"] = [asdict(c) for c in calls]
    if rbc is not None:  # this field's own scale, beside the specimen's that was used
        entry["rbc_diameter"] = round(rbc, 1)
    if not calls:
        entry["warnings"].append("no WBC found in this field")
    entry["annotated"] = str(Path("annotated") / f"{index:04d}_{short_name(path.stem)}.jpg")
    annotate(image, calls).save(out_dir / entry["annotated"], quality=90)
    return entry


def field_problems(image: Image.Image, cell_diameter: float) -> list[str]:
    """Why a readable field cannot be counted as asked: too small, one flat colour, no light, or a WBC
    size (``--cell-diameter``) that cannot be right for an image of this size."""
    if min(image.size) < MIN_FIELD:
        return [f"image is only {image.width}x{image.height} pixels: too small to hold a white blood cell"]
    if problem := blank_or_dark(image):
        return [f"{PROBLEMS[problem]}: nothing to count"]
    if cell_diameter > min(image.size):
        return [
            f"a WBC {cell_diameter:g} px across does not fit in this {image.width}x{image.height} field: "
            "is --cell-diameter right for these images?"
        ]
    if cell_diameter * MAX_CELLS_ACROSS < max(image.size):
        return [
            f"a WBC {cell_diameter:g} px across is tiny in this {image.width}x{image.height} field "
            f"(over {MAX_CELLS_ACROSS} would fit side by side): is --cell-diameter right for these images?"
        ]
    return []


def _finished_fields(log_path: Path, settings: dict) -> dict[str, dict]:
    """Fields already counted in ``log_path`` (by path); refuses to mix counts of two settings."""

    def scale(scales: dict) -> str:
        return ", ".join(f"{name}: WBCs {s['cell_diameter']:g} px ({s['how']})" for name, s in scales.items())

    words = {
        "scales": ("scale", scale),
        "tta": ("TTA", lambda on: "on" if on else "off"),
        "detector": ("--detector", str),
        "model": ("model", str),
    }
    return finished_work(log_path, settings, words, "count these into another --out", unrecorded={"tta": False})


class Stored(NamedTuple):
    """How a field's file holds it: grey fields and files of several images get a warning."""

    mode: str
    images: int  # :func:`pictures`: a z-stack, a TIFF of several fields: only the first is read


def open_field(path: str | os.PathLike) -> tuple[Image.Image, Stored]:
    """A field as upright RGB, and how its file stored it."""
    with Image.open(path) as raw:
        return upright_rgb(raw), Stored(raw.mode, pictures(raw))


def _with_patches(flagged_cells: list[tuple[dict, CellCall]]) -> list[tuple[dict, CellCall, Image.Image]]:
    """Cut each flagged cell out of its field again for the report (fields are not kept in memory);
    each field is read once, however many of its cells are flagged."""
    patches, path, field = [], None, None
    for entry, call in flagged_cells:
        if entry["path"] != path:  # cells come grouped by field
            path, field = entry["path"], open_field(entry["path"])[0]
        patches.append((entry, call, field.crop(call.box)))
    return patches


def annotate(image: Image.Image, calls: Sequence[CellCall]) -> Image.Image:
    """A copy of the field with a box and label per cell (flagged cells grey, marked '?')."""
    image = image.copy()
    draw = ImageDraw.Draw(image)
    width = max(2, round(max(image.size) / 300))
    font = ImageFont.load_default(size=max(12, round(max(image.size) / 40)))
    for call in calls:
        colour = BOX_COLOURS["flagged" if call.flagged else call.label]
        text = f"? {call.label}" if call.flagged else f"{call.label} {call.confidence:.2f}"
        draw.rectangle(call.box, outline=colour, width=width)
        x0, y0 = call.box[0], max(0, call.box[1] - font.size - 2 * width)
        draw.rectangle(draw.textbbox((x0, y0), text, font=font), fill=colour)
        draw.text((x0, y0), text, fill="white", font=font)
    return image
