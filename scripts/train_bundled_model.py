"""Train the bundled model: the default recipe on every labelled source, shipped in fp16 and ONNX.

All five-class cells of every source in the data folder train it (PBC's train/val splits kept,
PBC's test split and each other source split 85/15 into train/val). The fp16 copy goes to
``src/wbcid/weights/wbcid-default.pt`` and its ONNX export (what prediction runs) beside it;
their agreement with the fp32 model and the training data's composition go to
``docs/bundled_model.json`` (quoted by the model card). ``--skip-training`` redoes only the
training statistics (batch-norm, OOD scorer), the export and the checks from an existing run.
``--statistics-only`` (formerly ``--stage-statistics-only``) records again in the shipped file only
the training cells' statistics that change none of its outputs, the batch-norm statistics (AdaBN)
and the layer groups' that ``wbcid adapt`` scores
(:func:`wbcid.training_statistics.record_data_statistics`), for a model shipped before training
recorded them as it does now; its weights, scorer and ONNX export stay as they are.

    python scripts/train_bundled_model.py [--data ../shared/data] [--run runs/bundled]
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import asdict
from pathlib import Path

from wbcid.contract import BUNDLED, BUNDLED_ONNX
from wbcid.data import default_data_root, read_cells
from wbcid.export import export_onnx
from wbcid.inference import agreement
from wbcid.loading import resolve_model
from wbcid.models import load_checkpoint, save_model
from wbcid.splits import training_pool
from wbcid.train import TrainConfig, fit
from wbcid.training_statistics import record_data_statistics, refit_training_statistics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=default_data_root())
    parser.add_argument("--run", type=Path, default=Path("runs/bundled"))
    parser.add_argument("--report", type=Path, default=Path("docs/bundled_model.json"))
    parser.add_argument("--skip-training", action="store_true")
    parser.add_argument(
        "--statistics-only",
        "--stage-statistics-only",
        action="store_true",
        help="only record the batch-norm and layer groups' statistics in the shipped model; nothing else changes",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")

    cells = read_cells(args.data)
    pool = training_pool(cells)
    if args.statistics_only:
        record_data_statistics(BUNDLED, pool.select(splits=["train"]))
        return
    config = TrainConfig()
    report = json.loads(args.report.read_text()) if args.skip_training else {}
    if not args.skip_training:
        start = time.perf_counter()
        fit(pool, args.run, config)
        report["train_minutes"] = (time.perf_counter() - start) / 60
    else:  # what training records after the epochs (batch-norm statistics, OOD scorer) may have changed
        refit_training_statistics(args.run, pool.select(splits=["train"]), pool.select(splits=["val"]))
    full = load_checkpoint(args.run)
    save_model(
        full, BUNDLED, half=True, trained_on={s: _counts(pool, s) for s in sorted({c.source for c in pool.cells})}
    )
    bundled = resolve_model(needs_torch="the fp16 checks")
    export_onnx(bundled, BUNDLED_ONNX)

    report.update(
        {
            "command": "python scripts/train_bundled_model.py",
            "recipe": asdict(config) | {"data": None},
            "training_cells": {s: _counts(pool, s) for s in sorted({c.source for c in pool.cells})},
            "file_mb": BUNDLED.stat().st_size / 2**20,
            "onnx_file_mb": BUNDLED_ONNX.stat().st_size / 2**20,
            "fp16_vs_fp32": report.get("fp16_vs_fp32") or agreement(full, bundled, cells.paths),
            "onnx_vs_pytorch_pbc_test": agreement(
                bundled, resolve_model(BUNDLED_ONNX), cells.select(["pbc"], ["test"]).paths
            ),
        }
    )
    args.report.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


def _counts(pool, source: str) -> dict[str, int]:
    return {split: sum(c.source == source and c.split == split for c in pool.cells) for split in ("train", "val")}


if __name__ == "__main__":
    main()
