"""WBC detection on whole smear fields, per source, as ``wbcid count`` runs it (scale measured, not given).

    python benchmarks/detection.py [--detector learned|stain] [--data ../shared/data] [--out docs/detection]
        [--tint-every 4]

For each TXL-PBC lab (YOLO boxes) and BCCD (VOC boxes): the run's scale from the red cells
(``estimate_scale``, 20 fields), then the detector on every field, scored against the
annotated WBC boxes (recall, precision at IoU 0.5, one-to-one matching). Then the same on copies
of every ``--tint-every``-th field with the background tinted as by another camera or lamp:
pink, purple, and a pink-to-purple gradient across the field (written as PNG, so nothing but the
tint changes). One set of constants for all. The learned detector is scored only on fields it was
not trained on (TXL-PBC's val and test splits; BCCD's fields that are not in TXL's train split).
Writes ``OUT.json`` (every miss and false positive) and ``OUT.md``.

Annotations have errors. ``detection_corrections.csv`` lists the ones found by looking, on the
pictures, at every disagreement of the learned detector with the annotation on the fields above:
annotated "WBCs" that are red cells or platelets, and WBCs that nobody boxed. A second score
("after the checked corrections") drops the former from the truth, adds the latter to it (with
the box the detector drew), and counts identical annotated boxes in one field once. Only
disagreements were looked at, so that score is an upper estimate and the one as annotated a lower.
"""

from __future__ import annotations

import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
from common import parser, setup, smear_sources, write_results
from PIL import Image

from wbcid.smear.counting import DETECTORS, RED_CELL_BOXES, estimate_scale, on_edge
from wbcid.smear.detect import match_boxes

TINTS = {  # per-channel gains (R, G, B): a camera's white balance or a lamp's colour
    "pink": np.array([1.0, 0.72, 0.85]),
    "purple": np.array([0.85, 0.65, 1.0]),
}


def tinted(rgb: np.ndarray, tint: str) -> np.ndarray:
    """A field as another camera would record it: one tint, or pink on the left to purple on the right."""
    if tint in TINTS:
        gain = TINTS[tint]
    else:
        across = np.linspace(0, 1, rgb.shape[1])[None, :, None]
        gain = (1 - across) * TINTS["pink"] + across * np.array([0.8, 0.62, 1.0])
    return np.clip(rgb * gain, 0, 255).astype(np.uint8)


CORRECTIONS = Path(__file__).with_name("detection_corrections.csv")


def read_corrections(source: str) -> dict[str, dict[str, list[tuple[int, ...]]]]:
    """The checked corrections of one source's annotations: image stem -> kind -> boxes."""
    table = pd.read_csv(CORRECTIONS)
    fixes: dict[str, dict[str, list[tuple[int, ...]]]] = defaultdict(lambda: defaultdict(list))
    for row in table[table.source == source].itertuples():
        fixes[row.image][row.kind].append((row.x0, row.y0, row.x1, row.y1))
    return fixes


def corrected(truth: list, fixes: dict[str, list]) -> list:
    """One field's annotated WBC boxes after its checked corrections (module docstring)."""
    truth = list(dict.fromkeys(map(tuple, truth)))  # identical boxes: one cell boxed several times
    missing = [box for box in fixes["not a WBC"] if box not in truth]
    if missing:
        raise ValueError(f"corrections of boxes that are not annotated: {missing}")
    return [box for box in truth if box not in fixes["not a WBC"]] + fixes["WBC not boxed"]


def score(fields: list[tuple[Path, list]], find: Callable, refine: Callable | None, fixes: dict | None = None) -> dict:
    """Detection by ``find`` at the run's measured scale (``estimate_scale(..., refine)``, as ``wbcid
    count`` does) on ``(image path, WBC boxes)`` pairs; also after ``fixes`` (:func:`read_corrections`)."""
    scale = estimate_scale([path for path, _ in fields], refine=refine)
    totals, whole, errors, seconds = np.zeros(3, dtype=int), np.zeros(4, dtype=int), [], 0.0
    fixed = np.zeros(3, dtype=int)
    for path, truth in fields:
        with Image.open(path) as image:
            image = image.convert("RGB")
            start = time.perf_counter()
            found = [d.box for d in find(image, scale["cell_diameter"]).wbcs]
            seconds += time.perf_counter() - start
        counts = match_boxes(found, truth)
        totals += counts
        if fixes is not None:
            fixed += match_boxes(found, corrected(truth, fixes[path.stem]))
        inside = [[box for box in boxes if not on_edge(box, image.size, margin=2)] for boxes in (found, truth)]
        whole += (match_boxes(found, inside[1])[0], match_boxes(inside[0], truth)[1], len(inside[1]), len(inside[0]))
        if counts[1] or counts[2]:
            errors.append({"image": path.name, "false_positives": counts[1], "missed": counts[2]})
    return {
        "fields": len(fields),
        **_rates(totals),
        "cell_diameter": scale["cell_diameter"],
        "ms_per_field": 1000 * seconds / max(1, len(fields)),
        "clear_of_border": {  # recall of the annotated cells clear of it; precision of the boxes found clear of it
            "wbcs": int(whole[2]),
            "recall": whole[0] / max(1, whole[2]),
            "precision": 1 - whole[1] / max(1, whole[3]),
        },
        "errors": errors,
    } | ({"corrected": _rates(fixed)} if fixes is not None else {})


def _pair(rates: dict) -> str:
    return f"{rates['recall']:.3f} / {rates['precision']:.3f}"


def _rates(counts: np.ndarray) -> dict:
    """Recall and precision from ``(true positives, false positives, false negatives)``."""
    tp, fp, fn = (int(v) for v in counts)
    return {
        "wbcs": tp + fn,
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "recall": tp / max(1, tp + fn),
        "precision": tp / max(1, tp + fp),
    }


def main() -> None:
    options = parser(__doc__)
    options.add_argument("--detector", choices=list(DETECTORS), default="learned")
    options.add_argument("--out", type=Path, default=Path("docs/detection"))
    options.add_argument("--tint-every", type=int, default=4, help="tint every n-th field of each source")
    args = options.parse_args()
    command = setup()
    tmp = Path(tempfile.mkdtemp())
    result: dict = {"command": command, "detector": args.detector, "sources": {}}
    detector = DETECTORS[args.detector], RED_CELL_BOXES.get(args.detector)
    for source, group in smear_sources(args.data):
        fields = [
            (path, boxes(label, width, height)[0])
            for path, width, height, label, boxes, split in group
            if args.detector != "learned" or split != "train"
        ]
        fixes = read_corrections(source) if args.detector == "learned" else None  # checked on its held-out fields
        unknown = set(fixes or ()) - {path.stem for path, _ in fields}
        if unknown:
            raise ValueError(f"{CORRECTIONS.name}: {sorted(unknown)} are not scored fields of {source}")
        rows = {"as recorded": score(fields, *detector, fixes)}
        for tint in (*TINTS, "gradient"):
            copies = []
            for path, truth in fields[:: args.tint_every]:
                copy = tmp / tint / source / f"{path.stem}.png"
                copy.parent.mkdir(parents=True, exist_ok=True)
                with Image.open(path) as image:
                    Image.fromarray(tinted(np.asarray(image.convert("RGB")), tint)).save(copy)
                copies.append((copy, truth))
            rows[tint] = score(copies, *detector, fixes)
        result["sources"][source] = rows
        print(source, {k: (round(v["recall"], 3), round(v["precision"], 3)) for k, v in rows.items()}, flush=True)
    write_results(args.out, result, report(result, NOTES[args.detector]))


def report(result: dict, notes: str) -> str:
    """The page: one row per source (tinted columns where measured), then ``notes``."""
    tints = [t for t in (*TINTS, "gradient") if t in next(iter(result["sources"].values()))]
    with_corrections = all("corrected" in rows["as recorded"] for rows in result["sources"].values())
    lines = []
    for source, rows in result["sources"].items():
        plain = rows["as recorded"]
        tinted_cells = "".join(f" {_pair(rows[t])} |" for t in tints)
        whole = plain.get("clear_of_border")
        whole = f"{_pair(whole)} ({whole['wbcs']})" if whole else "-"
        fixed = f" {_pair(plain['corrected'])} ({plain['corrected']['wbcs']}) |" * with_corrections
        lines.append(
            f"| {source} | {plain['fields']} | {plain['wbcs']} | {plain['cell_diameter']:.0f} | "
            f"**{plain['recall']:.3f}** / **{plain['precision']:.3f}** |{fixed} {whole} | {plain['ms_per_field']:.0f} |"
            f"{tinted_cells}"
        )
    table = "\n".join(lines)
    middle = " after the checked corrections (WBCs) |" * with_corrections + " cells clear of the border (WBCs) |"
    header = "".join(f" {t} |" for t in tints)
    return f"""# WBC detection on smear fields, per source: the {result["detector"]} detector

`{result["command"]}`

What `wbcid count` does, with no `--cell-diameter`: the scale is measured from the red cells of
20 fields per source (one run per source), then every field is searched. A detection is correct
when its box overlaps an annotated WBC box with IoU >= 0.5 (one-to-one matching). Every annotated
box counts, also cells cut by the field's border; `wbcid count` flags those for review and leaves
them out of the differential, so the column "clear of the border" scores only boxes (annotated
and found) at least 2 px from it. Tinted columns
rerun every 4th field with its colours changed as another camera or lamp would (`tinted` in
`benchmarks/detection.py`: pink, purple, pink to purple across the field).

| source | fields | WBCs | WBC diameter used px | recall / precision |{middle} ms per field (detection) |{header}
|---|---:|---:|---:|---|{"---|" * with_corrections}---|---:|{"---|" * len(tints)}
{table}

The bar (issue 12): recall >= 0.95 and precision >= 0.90 on every source.

{notes.strip()}
"""


NOTES = {
    "stain": """Where it fails, from looking at raabin's misses: the WBCs are found, but their boxes are wrong.
The cell region runs into neighbouring red cells (bluish in raabin's stain), or stops at the
nucleus where the cytoplasm is pale, or a neutrophil's lobes come out as separate cells. Box
quality, not finding, is what a better detector (e.g. one trained on TXL-PBC's boxes) must fix.

The tinted columns test the background correction (`stain` in `wbcid/smear/detect.py`): purple
is measured from the field's own background wherever that background is more purple than grey.
The detector before that correction, measured by this same script, is in
`detection_before_background.md` (its first line says how it was run). Raabin's background is yellow, so the correction does
nothing to it as recorded; tinted, it loses its yellow and the bluish red cells merge with the
WBCs more often.

Where the constants come from (`wbcid/smear/detect.py`), so that these numbers are read for what
they are. The smallest nucleus (a quarter of a WBC diameter) comes from cell sizes (platelets are
2-3 um, WBCs 10-15 um). The cytoplasm threshold (a third of the nucleus threshold) was picked
among 1/3, 1/2 and 0.6 on BCCD's 364 fields (VOC boxes; recall 0.987, 0.954 and 0.892 at 200 px, before
the background correction).
The background window (twice a WBC diameter) is the smallest that surely reaches past a cell to
the background; it was not tuned. The scale's two constants were chosen on BCCD
(`wbcid/smear/scale.py`, docs/scale.md). So BCCD is seen data; the four TXL-PBC labs are not,
except that TXL's bccd fields come from the same BCCD pictures.
""",
    "learned": """
Only fields the detector was not trained on are scored: TXL-PBC's val and test splits, and BCCD's
fields outside TXL's train split (TXL's bccd fields are BCCD's pictures, byte for byte). It was
trained on TXL-PBC's train split of all four labs (`python benchmarks/train_detector.py`, 14 min
here; `wbcid/smear/train_detector.py` says how), so these are new fields of labs it has seen. On a
lab it has never seen: `detector_leave_one_out.md`. The stain detector, by the same script on all
fields: `detection_stain.md`.

Every disagreement with the annotation on these fields (42 boxes: each miss and false positive;
`OUT.json` lists the fields) was looked at on the pictures, at full size. Raabin's 12 misses: 7
annotated "WBCs" are red cells (bluish in raabin's stain; 6 cut by the border), 3 are WBCs cut by
the border (2 not found, 1 found with a box twice as tall as the annotated sliver), and in 2 the
annotated box holds the nucleus only and the found box the whole cell (IoU under 0.5; these 3
found boxes also count as false positives). 4 of raabin's 8 false positives are the central WBC
of a field whose label file has no WBC box at all. Pbc: 5 of
its 7 misses are one cell boxed six times in one label file. BCCD (VOC): 7 of its 8 false positives
are WBCs nobody boxed (4 cut by the border), and one annotated "WBC" is a platelet-sized object.
These are listed, with a note each, in `benchmarks/detection_corrections.csv` and make the column
"after the checked corrections". Left as annotated: what could not be told for sure (a 45 px purple
object in a pbc field, a ragged purple object at raabin's border, slivers too thin to tell) and
the box disagreements (nucleus-only boxes). A WBC nobody boxed is added to the truth with the box
the detector drew. Only disagreements were looked at, so the corrected score is an upper estimate
and the score as annotated a lower one. An earlier version of this page
said that 8 of raabin's misses were WBC slivers scored under the threshold and 2 were red cells:
looked at at full size, 7 are red cells. After the checked corrections the bar is met on every source
(raabin 0.968 / 0.974); as annotated, raabin's recall (0.925) is under it.

Where the constants come from: the peak threshold (0.3) is CenterNet's usual one and was not
tuned; the work scale (a WBC 48 px across), the crop, the epochs and the learning rate were set
once, before any measurement; the scale jitter (40 %) covers the scale estimate's errors
(docs/scale.md); the white-balance gains (0.6-1.0 per channel) were set to cover lamps and cameras
and overlap the tints of the tinted columns, which therefore test a variation the detector was
trained for. Duplicate peaks in one cell are removed by a rule, not a threshold: a peak whose
centre lies in a more certain cell's box is dropped.

Changes made after a measurement on these same held-out fields, so read the numbers with that in
mind: a first version (WBCs only; cells cut by a training crop's edge dropped from its boxes; no
white-balance gains) scored bccd 1.000 / 1.000, bcd 0.954 / 1.000, pbc 0.957 / 1.000, raabin
0.925 / 0.967, BCCD (VOC) 0.995 / 0.973, and 0.709 / 0.696 on BCCD (VOC) tinted purple. Cut cells
were then kept as cells (it had missed them at the border), the white-balance gains added (the
purple tint), and the red-cell class added (for the scale, docs/scale.md).
""",
}


if __name__ == "__main__":
    main()
