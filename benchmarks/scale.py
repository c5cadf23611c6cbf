"""Scale from the red cells, and WBC detection with it, on every TXL-PBC source.

    python benchmarks/scale.py [--data ../shared/data] [--out docs/scale]

For every field of ``smears/txl_pbc`` (four labs at four magnifications, YOLO boxes) and of
``smears/bccd`` (the original BCCD set, VOC boxes; row ``bccd (VOC)``):

* the red-cell diameter ``wbcid.smear.scale.rbc_diameter`` measures, against the truth: the
  median longer side of the field's annotated RBC boxes that do not touch the border;
* the run-level estimate ``wbcid count`` uses (``estimate_scale``: median over 20 fields spread
  over the run), here one run per source;
* WBC detection (recall, precision at IoU 0.5) at that scale and at the old fixed default
  (200 px), with one set of constants for all sources.

Writes ``OUT.json`` and ``OUT.md``. Constants' provenance: ``wbcid/smear/scale.py``.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from common import parser, setup, smear_sources, write_results
from PIL import Image

from wbcid.smear.counting import DEFAULT_CELL_DIAMETER, estimate_scale
from wbcid.smear.detect import detect_cells, match_boxes
from wbcid.smear.scale import rbc_diameter

WITHIN = 0.15


def main() -> None:
    options = parser(__doc__)
    options.add_argument("--out", type=Path, default=Path("docs/scale"))
    args = options.parse_args()
    command = setup()
    result: dict = {"command": command, "within": WITHIN, "sources": {}}
    for source, group in smear_sources(args.data):
        paths = [path for path, *_ in group]
        began = time.perf_counter()
        run_scale = estimate_scale(paths)
        run_seconds = time.perf_counter() - began
        errors, truths, scale_seconds = [], [], 0.0
        counts = {"auto": np.zeros(3), "default": np.zeros(3)}
        for path, width, height, label, boxes in group:
            wbc, truth = boxes(label, width, height)
            with Image.open(path) as image:
                image = image.convert("RGB")
                start = time.perf_counter()
                measured = rbc_diameter(image)
                scale_seconds += time.perf_counter() - start
                for name, diameter in (("auto", run_scale["cell_diameter"]), ("default", DEFAULT_CELL_DIAMETER)):
                    counts[name] += match_boxes([d.box for d in detect_cells(image, diameter)], wbc)
            truths.append(truth)
            errors.append(np.nan if measured is None else measured / truth - 1)
        errors = np.array(errors)[~np.isnan(truths)]
        truth = float(np.nanmedian(truths))
        result["sources"][source] = {
            "fields": len(group),
            "rbc_truth_median": truth,
            "field_median_relative_error": float(np.nanmedian(errors)),
            "field_within": float(np.mean(np.abs(np.nan_to_num(errors, nan=np.inf)) <= WITHIN)),
            "field_unmeasured": int(np.isnan(errors).sum()),
            "ms_per_field": 1000 * scale_seconds / len(group),
            "run_scale": run_scale,
            "run_rbc_relative_error": run_scale.get("rbc_diameter", np.nan) / truth - 1,
            "run_scale_seconds": run_seconds,
            "detection": {
                name: {
                    "recall": tp / max(1, tp + fn),
                    "precision": tp / max(1, tp + fp),
                    "wbcs": int(tp + fn),
                }
                for name, (tp, fp, fn) in counts.items()
            },
        }
    write_results(args.out, result, report(result))
    print(report(result))


def report(r: dict) -> str:
    rows = []
    for source, s in r["sources"].items():
        auto, default = s["detection"]["auto"], s["detection"]["default"]
        rows.append(
            f"| {source} | {s['fields']} | {s['rbc_truth_median']:.0f} | {s['field_median_relative_error']:+.1%} | "
            f"{s['field_within']:.0%} | {s['field_unmeasured']} | {s['run_rbc_relative_error']:+.1%} | "
            f"{s['run_scale']['cell_diameter']:.0f} | {auto['recall']:.3f} / {auto['precision']:.3f} | "
            f"{default['recall']:.3f} / {default['precision']:.3f} | {s['ms_per_field']:.0f} |"
        )
    return f"""# Scale from the red cells, and WBC detection with it (TXL-PBC, BCCD)

Command: `{r["command"]}` (this project's 2-core machine). Truth: the median longer side of a
field's RBC boxes clear of the border. Method and constants: `wbcid/smear/scale.py` (both
constants were chosen on BCCD; the other three sources were not used to choose anything).

| source | fields | RBC truth px | per field: median error | within {r["within"]:.0%} | not measured | run estimate (20 fields): error | WBC diameter used px | detection, auto scale: recall / precision | detection at 200 px | ms per field (scale) |
|---|---:|---:|---:|---:|---:|---:|---:|---|---|---:|
{chr(10).join(rows)}

Detection: IoU >= 0.5, one-to-one matching, every annotated WBC box (also those cut by the border).
"""


if __name__ == "__main__":
    main()
