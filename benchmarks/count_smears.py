"""``wbcid count`` end to end on BCCD's smear fields, against the WBC types BCCD lists per field.

    python benchmarks/count_smears.py [--model RUN] [--smears ../shared/data/smears/bccd] [--out docs/count_bccd]

Runs the whole command (detection, canonical crop, classification, OOD flags, report) into
``runs/count_bccd`` and compares: the per-field label where a field has one listed WBC and one
detection, and the differential of all fields against the one from BCCD's labels. Writes
``OUT.json`` and ``OUT.md`` (not the annotated images: they are copies of the data).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pandas as pd
from common import parser, setup, write_results

from wbcid.data import CLASSES, parse_label
from wbcid.smear.counting import count
from wbcid.smear.differential import differential


def listed_types(smears: Path) -> dict[str, list[str]]:
    """The WBC types BCCD lists for each field (by file stem); an empty list where it lists none."""
    listed = pd.read_csv(smears / "labels.csv", dtype=str, keep_default_na=False)
    return {
        f"BloodImage_{int(i):05d}": [CLASSES[parse_label(t.strip())] for t in c.split(",") if t.strip()]
        for i, c in zip(listed["Image"], listed["Category"])
    }


def main() -> None:
    options = parser(__doc__)
    options.add_argument("--model", type=Path, help="run directory or model file; default: the bundled model")
    options.add_argument("--smears", type=Path, help="default: DATA/smears/bccd")
    options.add_argument("--run", type=Path, default=Path("runs/count_bccd"))
    options.add_argument("--out", type=Path, default=Path("docs/count_bccd"))
    args = options.parse_args()
    command = setup()
    args.smears = args.smears or args.data / "smears" / "bccd"

    types = listed_types(args.smears)
    fields = sorted((args.smears / "images").glob("*.jpg"))
    shutil.rmtree(args.run, ignore_errors=True)  # this benchmark's own scratch count, made again
    began = time.perf_counter()
    result = count(args.model, fields, args.run)
    seconds = time.perf_counter() - began

    single = correct = single_flagged = 0
    reference_labels = []
    for entry in result["images"]:
        truth = types.get(Path(entry["path"]).stem, [])
        reference_labels += truth
        if len(truth) == 1 and len(entry["detections"]) == 1:
            detection = entry["detections"][0]
            single_flagged += detection["flagged"]
            if not detection["flagged"]:
                single += 1
                correct += detection["label"] == truth[0]
    listed_differential = differential(reference_labels)
    summary = {
        "command": command,
        "model": str(args.model or "bundled"),
        "fields": len(fields),
        "seconds": seconds,
        "fields_per_second": len(fields) / seconds,
        "totals": result["totals"],
        "listed_differential": listed_differential,
        "single_cell_fields": {
            "unflagged": single,
            "correct": correct,
            "accuracy": correct / max(1, single),
            "flagged": single_flagged,
        },
        "fields_without_detection": sum(not e["detections"] for e in result["images"]),
    }
    write_results(args.out, summary, report(summary))
    print(report(summary))


def report(s: dict) -> str:
    t, ref = s["totals"], s["listed_differential"]
    rows = "\n".join(
        f"| {name} | {c['count']} | {c['percent']:.1f} [{c['ci95'][0]:.1f}, {c['ci95'][1]:.1f}] | "
        f"{ref['classes'][name]['count']} | {ref['classes'][name]['percent']:.1f} |"
        for name, c in t["classes"].items()
        if c["percent"] is not None
    )
    one = s["single_cell_fields"]
    return f"""# `wbcid count` on BCCD smear fields

Command: `{s["command"]}` ({s["fields"]} fields, 640x480; model: {s["model"]}). The whole
count took {s["seconds"]:.0f} s: {s["fields_per_second"]:.1f} fields/s including detection,
classification, annotated images and the report.

{t["detected"]} WBCs found, {t["counted"]} counted, {t["flagged"]} flagged for review;
{s["fields_without_detection"]} field(s) without a detection.

| class | counted | % [95 % interval] | listed by BCCD | % listed |
|---|---|---|---|---|
{rows}

Fields with one listed WBC and one detection: {one["unflagged"]} not flagged, of which
{one["correct"]} got BCCD's type ({one["accuracy"]:.1%}); {one["flagged"]} were flagged.
"""


if __name__ == "__main__":
    main()
