"""Does the canonical crop frame the white cell? Checked against expert segmentations.

    python benchmarks/crop.py [--data ../shared/data] [--out docs/crop]

``masks/tecom`` and ``masks/cellavision`` hold an expert's segmentation of every cell of those
two labs (nucleus, cytoplasm, background), which no part of wbcid ever used. For each cell the box
``wbcid.crop.crop_box`` cuts (what every model sees) is compared with the segmented cell
(nucleus and cytoplasm): the share of the cell's pixels inside the box, and the box's side over
the cell's extent. Two labs the crop was not designed on, framed differently (tecom tight,
cellavision wide with many red cells). Writes ``OUT.json`` and ``OUT.md``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from common import parser, setup, write_results
from PIL import Image

from wbcid.crop import MARGIN, crop_box, extent, framing
from wbcid.data import CLASSES, CellSet, read_cells

SOURCES = ("tecom", "cellavision")
WHOLE = 0.95  # a cell counts as framed when this share of its pixels is inside the crop


def measure(cells: CellSet, masks: Path, source: str) -> pd.DataFrame:
    """One row per cell of ``source`` (its expert segmentations in ``masks/SOURCE``): label, nucleus
    found, share of the cell inside the crop, crop side / cell extent, found / expert nucleus extent."""
    rows = []
    for cell in cells.select([source]).cells:
        with Image.open(cell.path) as image:
            box = crop_box(image.convert("RGB"))
        mask = np.asarray(Image.open(masks / source / f"{cell.group}.png"))
        inside, ratio = framing(box, mask > 0) if box is not None else (np.nan, np.nan)
        expert = extent(*np.nonzero(mask == mask.max()))  # the nucleus is the brightest of the three grey levels
        found = box[2] / MARGIN / expert if box is not None else np.nan
        rows.append(
            {
                "label": CLASSES[cell.label],
                "found": box is not None,
                "inside": inside,
                "side_over_cell": ratio,
                "nucleus": found,
            }
        )
    return pd.DataFrame(rows)


def summary(table: pd.DataFrame) -> dict:
    """Cells, share with a nucleus found, share framed whole, median share inside, side / extent."""
    return {
        "cells": len(table),
        "found": float(table.found.mean()),
        "framed": float((table.inside >= WHOLE).mean()),
        "inside_median": float(table.inside.median()),
        "inside_worst": float(table.inside.min()),
        "side_over_cell_median": float(table.side_over_cell.median()),
        "side_over_cell_p5": float(table.side_over_cell.quantile(0.05)),
        "nucleus_median": float(table.nucleus.median()),
        "nucleus_p5": float(table.nucleus.quantile(0.05)),
    }


def page(result: dict) -> str:
    lines = [
        "# The canonical crop against expert segmentations",
        "",
        f"`{result['command']}`",
        "",
        f"Each cell's crop box (`wbcid.crop.crop_box`, side {MARGIN} x the nucleus extent) against the expert's",
        "segmentation of the cell (nucleus and cytoplasm) in `masks/`. *Framed*: at least",
        f"{WHOLE:.0%} of the cell's pixels inside the crop. *Side / cell*: the crop's side over the cell's",
        "longest extent (1 = the crop touches the cell; the crop's margin is the room around it).",
        "*Nucleus / expert*: the extent of the nucleus the crop found over that of the expert's nucleus",
        "(below 1: part of a lobed nucleus was taken for all of it, and the crop is too small).",
        "",
        "| lab | class | cells | nucleus found | framed | median inside | worst inside | side / cell median | 5th pct "
        "| nucleus / expert median | 5th pct |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for source, classes in result["sources"].items():
        for label, s in classes.items():
            lines.append(
                f"| {source} | {label} | {s['cells']} | {s['found']:.0%} | {s['framed']:.1%} | {s['inside_median']:.3f} "
                f"| {s['inside_worst']:.3f} | {s['side_over_cell_median']:.2f} | {s['side_over_cell_p5']:.2f} "
                f"| {s['nucleus_median']:.2f} | {s['nucleus_p5']:.2f} |"
            )
    return "\n".join(lines)


def main() -> None:
    options = parser(__doc__)
    options.add_argument("--out", type=Path, default=Path("docs/crop"))
    args = options.parse_args()
    result: dict = {"command": setup(), "whole": WHOLE, "sources": {}}
    cells = read_cells(args.data / "cells.csv")
    for source in SOURCES:
        table = measure(cells, args.data / "masks", source)
        per_class = {label: summary(table[table.label == label]) for label in CLASSES if (table.label == label).any()}
        result["sources"][source] = {"all": summary(table), **per_class}
    write_results(args.out, result, page(result))


if __name__ == "__main__":
    main()
