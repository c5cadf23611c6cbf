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

* cameras with many more pixels per field: BCCD fields pasted n x n into one image
  (n = 2, 3, 4, 6, 8, 12; at 6x6 the red cells are about as small against the field as a 5-megapixel
  camera shows them through a 40x objective and a 0.5x adapter; 12x12 is a 44-megapixel image),
  20 such images per n; the run estimate from the coarsest copy alone (what ``wbcid count`` used
  before it confirmed it on finer copies) and as confirmed, granulometric and learned, against the
  tiles' annotated red cells.

Writes ``OUT.json`` and ``OUT.md``. Constants' provenance: ``wbcid/smear/scale.py``.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
from common import parser, setup, smear_sources, write_results
from PIL import Image

from wbcid.smear.counting import DEFAULT_CELL_DIAMETER, estimate_scale
from wbcid.smear.detect import detect_cells, match_boxes
from wbcid.smear.learned import find_objects
from wbcid.smear.scale import MERGED_ACROSS, SETTLED, rbc_diameter

WITHIN = 0.15
TILED = (2, 3, 4, 6, 8, 12)  # tiles per side
TILED_FIELDS = 20  # images per n: what a run's estimate samples


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
    bccd = dict(smear_sources(args.data))["bccd (VOC)"]
    result["tiled"] = {str(n): tiled(bccd, n) for n in TILED}
    text = report(result)
    write_results(args.out, result, text)
    print(text)


def tiled(group: list, n: int) -> dict:
    """Scale estimates of ``TILED_FIELDS`` images of n x n BCCD fields, against their annotated red cells."""
    truths, paths = [], []
    with tempfile.TemporaryDirectory() as folder:
        for i in range(TILED_FIELDS):
            tiles = [group[(i * n * n + k) % len(group)] for k in range(n * n)]
            mosaic = Image.new("RGB", (640 * n, 480 * n))
            for k, (path, width, height, label, boxes, _) in enumerate(tiles):
                with Image.open(path) as tile:
                    mosaic.paste(tile.convert("RGB"), (640 * (k % n), 480 * (k // n)))
                truths.append(boxes(label, width, height)[1])
            mosaic.save(paths_i := Path(folder) / f"{i}.png")
            paths.append(paths_i)
        truth = float(np.nanmedian(truths))
        coarsest = np.median([m for m in map(_coarsest_only, paths) if m is not None])
        began = time.perf_counter()
        granulometry = estimate_scale(paths)
        seconds = time.perf_counter() - began
        learned = estimate_scale(paths, refine=find_objects)
    return {
        "size": (640 * n, 480 * n),
        "rbc_truth_median": truth,
        "coarsest_error": float(coarsest / truth - 1),
        "granulometry_error": granulometry["rbc_diameter"] / truth - 1,
        "granulometry_seconds": seconds,
        "learned_error": learned["rbc_diameter"] / truth - 1,
        "cell_diameter": learned["cell_diameter"],
    }


def _coarsest_only(path: Path) -> float | None:
    """A field's red cells measured on the coarsest copy alone, as ``wbcid count`` did before."""
    with Image.open(path) as image:
        return rbc_diameter(image)


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
            f"{default['recall']:.3f} / {default['precision']:.3f} | {s['ms_per_field']:.0f} | "
            f"{s['run_scale_seconds']:.2f} |"
        )
    tiled_rows = [
        f"| {n}x{n} | {t['size'][0]}x{t['size'][1]} | {t['rbc_truth_median']:.0f} | {t['coarsest_error']:+.0%} | "
        f"{t['granulometry_error']:+.0%} | {t['learned_error']:+.0%} | {t['cell_diameter']:.0f} | "
        f"{t['granulometry_seconds']:.1f} |"
        for n, t in r["tiled"].items()
    ]
    return f"""# Scale from the red cells, and WBC detection with it (TXL-PBC, BCCD)

Command: `{r["command"]}` (this project's 2-core machine). Truth: the median longer side of a
field's RBC boxes clear of the border. The run estimate's seconds include opening the 20 fields and
measuring each on a twice finer copy too, which confirms the coarsest one (below). Method and constants: `wbcid/smear/scale.py` (both
constants were chosen on BCCD; the other three sources were not used to choose anything).

| source | fields | RBC truth px | per field: median error | within {r["within"]:.0%} | not measured | run estimate (20 fields): error | WBC diameter used px | detection, auto scale: recall / precision | detection at 200 px | ms per field (coarsest copy) | seconds (run estimate) |
|---|---:|---:|---:|---:|---:|---:|---:|---|---|---:|---:|
{chr(10).join(rows)}

The learned detector's red-cell boxes, on the fields it was not trained on (its per-field
measure is what `counts.json` records as each field's `rbc_diameter`; its run estimate is the
scale `wbcid count` uses with the default `--detector learned`):

| source | held-out fields | per field: median error | within {r["within"]:.0%} | not measured | run estimate (20 fields): error |
|---|---:|---:|---:|---:|---:|
{chr(10).join(learned)}

Detection: the stain detector (`--detector stain`), IoU >= 0.5, one-to-one matching, every annotated
WBC box (also those cut by the border). The learned detector that `wbcid count` uses by default: detection.md.

## Cameras with more pixels per field

BCCD fields pasted n x n into one image, {TILED_FIELDS} PNG images per row (at 6x6 the red cells are
about as small against the field as a 5-megapixel camera shows them through a 40x objective and a
0.5x adapter; 12x12 is a 44-megapixel image). The coarsest copy (128 pixels wide) blurs them into clumps; the run estimate now takes the coarsest copy that a twice finer one confirms within {SETTLED:.0%}
(`wbcid/smear/scale.py`), and a copy whose red cells its region would hold fewer than {MERGED_ACROSS:g} times across
counts as merged, not measured (without that rule, one 12x12 image of BCCD's first 144 fields, by hand:
red cells 5,479 px across, truth about 110; `wbcid count` found none of its WBCs). Errors of the run estimate against the tiles' annotated red cells; the
learned detector refines the granulometric estimate as `wbcid count` does (it recovers from errors
within its training jitter, +-40 %, not beyond).

| tiles | image px | RBC truth px | coarsest copy only | granulometry, confirmed | learned, as counted | WBC diameter used px | seconds (granulometry) |
|---|---|---:|---:|---:|---:|---:|---:|
{chr(10).join(tiled_rows)}
"""


if __name__ == "__main__":
    main()
