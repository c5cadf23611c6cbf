"""How many training cells do the recorded batch-norm statistics need? (``wbcid.testtime.STATISTICS_CELLS``)

    python benchmarks/bn_statistics.py --model runs/pbc [--data ../shared/data] [--out docs/bn_statistics]

Training records every BN layer's input statistics on its cells, which test-time AdaBN maps a new
lab's onto. This compares, per channel, the statistics of ``STATISTICS_CELLS`` random training cells
and those of all of them, against two yardsticks: the same model's statistics on PBC's test split
(the same lab, other cells: what sampling alone moves) and on each other lab (what AdaBN corrects).
Deviations: |difference of means| over the standard deviation, and |difference of log variances|;
50th / 99th percentile / maximum over all channels of all layers. Writes ``OUT.json`` and ``OUT.md``.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from common import parser, setup, write_results

from wbcid.benchmark import OTHER_SOURCES
from wbcid.data import read_cells
from wbcid.decoding import load_images
from wbcid.loading import resolve_model
from wbcid.preprocess import Preprocess
from wbcid.testtime import STATISTICS_CELLS, Statistics, batchnorm_statistics


def deviation(a: Statistics, b: Statistics) -> dict[str, list[float]]:
    """Percentiles (50, 99, 100) over channels of how far ``a``'s statistics are from ``b``'s."""
    mean = torch.cat([((a[k][0] - b[k][0]).abs() / b[k][1].sqrt().clamp_min(1e-3)).flatten() for k in b])
    log_var = torch.cat([(a[k][1].clamp_min(1e-5).log() - b[k][1].clamp_min(1e-5).log()).abs().flatten() for k in b])
    return {
        name: np.percentile(x.numpy(), [50, 99, 100]).round(3).tolist()
        for name, x in (("mean", mean), ("log_var", log_var))
    }


def main() -> None:
    options = parser(__doc__)
    options.add_argument("--model", type=Path, default=Path("runs/pbc"))
    options.add_argument("--out", type=Path, default=Path("docs/bn_statistics"))
    args = options.parse_args()
    command = setup()
    model = resolve_model(args.model, needs_torch="batch-norm statistics")
    prep = Preprocess.of(model.config)
    cells = read_cells(args.data / "cells.csv")
    train, _ = load_images(cells.select(["pbc"], ["train"]).known(), prep)
    start = time.perf_counter()
    full = batchnorm_statistics(model, train, cells=len(train))
    seconds_full = time.perf_counter() - start
    start = time.perf_counter()
    sample = batchnorm_statistics(model, train)
    seconds_sample = time.perf_counter() - start
    rows = {f"{STATISTICS_CELLS} random training cells": deviation(sample, full)}
    for name, source, split in (("pbc test", "pbc", ["test"]), *((s, s, None) for s in OTHER_SOURCES)):
        images, _ = load_images(cells.select([source], split).known(), prep)
        rows[f"{name} ({len(images)} cells)"] = deviation(batchnorm_statistics(model, images), full)
    result = {"command": command, "training_cells": len(train), "seconds": [seconds_full, seconds_sample], "rows": rows}
    lines = [
        "# Batch-norm statistics: how many training cells",
        "",
        f"`{command}`",
        "",
        f"Against the statistics of all {len(train)} PBC training cells (recorded in {seconds_full:.1f} s here; "
        f"{STATISTICS_CELLS} cells: {seconds_sample:.1f} s). Percentiles 50 / 99 / 100 over every channel of every "
        "batch-norm layer.",
        "",
        "| cells | mean: difference / sd | log variance: difference |",
        "|---|---|---|",
        *(
            f"| {k} | {' / '.join(map(str, v['mean']))} | {' / '.join(map(str, v['log_var']))} |"
            for k, v in rows.items()
        ),
    ]
    write_results(args.out, result, "\n".join(lines))


if __name__ == "__main__":
    main()
