"""Train the learned WBC detector that ships in the package, or measure it on a lab it never saw.

    python benchmarks/train_detector.py [--data ../shared/data] [--epochs 30]
        # the shipped weights: TXL-PBC's train split of all four labs -> src/wbcid/weights/wbc-detector.onnx
    python benchmarks/train_detector.py --leave-out [--epochs 15]
        # for each lab: train on the other three labs' train split, detect on every field of the left-out lab
        # -> docs/detector_leave_one_out.json and .md

Held-out numbers for the shipped weights (TXL's val and test splits, BCCD's fields that are not
in TXL's train split) come from ``benchmarks/detection.py --detector learned``.
"""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path

import torch
from common import parser, setup, smear_sources, write_results

from wbcid.smear.learned import WEIGHTS, find_objects
from wbcid.smear.train_detector import DetectorConfig, export_detector, train_detector, txl_fields

LABS = ("bccd", "bcd", "pbc", "raabin")
LEAVE_ONE_OUT = """
Each row is a detector trained on the train split of the *other three* TXL-PBC labs (same recipe
as the shipped one, `--epochs` as in the command) and scored on every field of the left-out lab:
how the learned detector does on a microscope, camera and stain it has never seen. The shipped
detector was trained on all four labs (`detection.md`).
"""


def main() -> None:
    options = parser(__doc__)
    options.add_argument("--epochs", type=int, default=DetectorConfig.epochs)
    options.add_argument("--leave-out", action="store_true", help="one detector per left-out lab, scored on it")
    options.add_argument("--out", type=Path, default=WEIGHTS)
    args = options.parse_args()
    command = setup()
    torch.set_num_threads(2)
    root = args.data / "smears" / "txl_pbc"
    config = DetectorConfig(epochs=args.epochs)
    if not args.leave_out:
        started = time.perf_counter()
        model = train_detector(txl_fields(root, splits=["train"]), config)
        export_detector(model, args.out)
        print(f"{args.out}: trained in {time.perf_counter() - started:.0f} s")
        return
    from detection import report, score  # the detection benchmark's scoring, so the numbers compare

    sources = dict(smear_sources(args.data))
    result: dict = {"command": command, "detector": "learned", "epochs": args.epochs, "sources": {}}
    for lab in LABS:
        started = time.perf_counter()
        model = train_detector(txl_fields(root, [other for other in LABS if other != lab], ["train"]), config)
        weights = export_detector(model, Path("runs") / "detector" / f"without-{lab}.onnx")
        fields = [(path, boxes(label, width, height)[0]) for path, width, height, label, boxes, _ in sources[lab]]
        find = partial(find_objects, weights=weights)
        scored = score(fields, find, find)
        result["sources"][lab] = {"as recorded": scored | {"seconds": time.perf_counter() - started}}
        print(lab, round(result["sources"][lab]["as recorded"]["recall"], 3), flush=True)
    write_results(Path("docs/detector_leave_one_out"), result, report(result, LEAVE_ONE_OUT))


if __name__ == "__main__":
    main()
