"""Scale from the red cells, and WBC detection with it, on every TXL-PBC source.

    python benchmarks/scale.py [--data ../shared/data] [--out docs/scale]

For every field of ``smears/txl_pbc`` (four labs at four magnifications, YOLO boxes) and of
``smears/bccd`` (the original BCCD set, VOC boxes; row ``bccd (VOC)``):

* the red-cell diameter ``wbcid.smear.scale.rbc_diameter`` measures, against the truth: the
  median longer side of the field's annotated RBC boxes that do not touch the border;
* the run-level estimate ``wbcid count`` uses (``estimate_scale``: median over 20 fields spread
  over the run), here one run per source;
* WBC detection (recall, precision at IoU 0.5) at that scale and at the old fixed default
  (200 px), with one set of constants for all sources;
* the learned detector's red-cell boxes (``wbcid.smear.learned.find_objects`` at the run's
  granulometric scale): the same per-field and run-level measures, on the fields it was not
  trained on (TXL-PBC's val and test splits, BCCD outside TXL's train split).

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
from wbcid.smear.learned import find_objects
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
        held_out = [path for path, *_, split in group if split != "train"]
        learned_run = estimate_scale(held_out, refine=find_objects)
        learned_errors, held_out_truths = [], []
        for path, width, height, label, boxes, split in group:
            wbc, truth = boxes(label, width, height)
            with Image.open(path) as image:
                image = image.convert("RGB")
                start = time.perf_counter()
                measured = rbc_diameter(image)
                scale_seconds += time.perf_counter() - start
                for name, diameter in (("auto", run_scale["cell_diameter"]), ("default", DEFAULT_CELL_DIAMETER)):
                    counts[name] += match_boxes([d.box for d in detect_cells(image, diameter)], wbc)
                boxed = find_objects(image, run_scale["cell_diameter"]).rbc_diameter if split != "train" else None
            truths.append(truth)
            errors.append(np.nan if measured is None else measured / truth - 1)
            if split != "train" and np.isfinite(truth):
                held_out_truths.append(truth)
                learned_errors.append(np.nan if boxed is None else boxed / truth - 1)
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
            "learned": {
                "fields": len(learned_errors),
                "field_median_relative_error": float(np.nanmedian(learned_errors)),
                "field_within": float(np.mean(np.abs(np.nan_to_num(learned_errors, nan=np.inf)) <= WITHIN)),
                "field_unmeasured": int(np.isnan(learned_errors).sum()),
                "run_scale": learned_run,
                "run_rbc_relative_error": learned_run.get("rbc_diameter", np.nan) / np.median(held_out_truths) - 1,
            },
            "detection": {
                name: {
                    "recall": tp / max(1, tp + fn),
                    "precision": tp / max(1, tp + fp),
                    "wbcs": int(tp + fn),
                }
                for name, (tp, fp, fn) in counts.items()
            },
        }
    text = report(result)
    write_results(args.out, result, text)
    print(text)


def report(r: dict) -> str:
    rows, learned = [], []
    for source, s in r["sources"].items():
        n = s["learned"]
        learned.append(
            f"| {source} | {n['fields']} | {n['field_median_relative_error']:+.1%} | {n['field_within']:.0%} | "
            f"{n['field_unmeasured']} | {n['run_rbc_relative_error']:+.1%} |"
        )
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

The learned detector's red-cell boxes, on the fields it was not trained on (its per-field
measure is what `counts.json` records as each field's `rbc_diameter`; its run estimate is the
scale `wbcid count` uses with the default `--detector learned`):

| source | held-out fields | per field: median error | within {r["within"]:.0%} | not measured | run estimate (20 fields): error |
|---|---:|---:|---:|---:|---:|
{chr(10).join(learned)}

Detection: the stain detector (`--detector stain`), IoU >= 0.5, one-to-one matching, every annotated
WBC box (also those cut by the border). The learned detector that `wbcid count` uses by default: detection.md.
"""


if __name__ == "__main__":
    main()
