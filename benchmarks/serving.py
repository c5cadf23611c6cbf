"""Serving speed as a user meets it: whole commands, Python start-up and imports included.

Side by side in one run, the bundled model served from its ONNX file in fp32 (ONNX Runtime,
``--precision fp32``), as served by default (``auto``: bf16 in OpenVINO with close calls rechecked
in fp32, from 512 images on a CPU with bf16 units where it measures faster; see :mod:`wbcid.serving`), in bf16 where
``auto`` keeps fp32 (``--precision bf16``), and in PyTorch (``--model .../wbcid-default.pt``, which
never uses bf16 here): ``wbcid --help``, ``wbcid predict`` on 10 and on N PBC test images,
``wbcid count`` on the BCCD smear fields; and, to show where the time goes, the network alone and
decoding alone. With ``--adapt-lab LAB`` (default lisc), the bundled model is first adapted to 10
verified cells per class of that lab (``wbcid adapt``, timed as a whole command); ``predict`` is
timed with the adapted run (which averages 8 rotations and flips) in fp32 and as served by
default, and ``count`` with the run as served (its ``model.onnx``) and with its ``model.pt``.
Each command runs ``--repeats`` times, alternating the paths; the table gives the median and the
range. Writes ``docs/serving.md`` and ``docs/serving.json``.

    python benchmarks/serving.py [--data ../shared/data] [--images 2000] [--repeats 3]
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from common import cpu_description, parser, setup, write_results

from wbcid.contract import BUNDLED, BUNDLED_ONNX
from wbcid.data import CLASSES, read_cells
from wbcid.decoding import image_batches
from wbcid.preprocess import Preprocess
from wbcid.serving import PROBE_IMAGES, OnnxModel, bf16_missing
from wbcid.splits import draw_per_class

WBCID = [sys.executable, "-m", "wbcid"]


def seconds(args: list[str]) -> float:
    """Wall time of one whole command (it must succeed), its ``--out`` removed first."""
    out = Path(args[args.index("--out") + 1]) if "--out" in args else None
    if out is not None and out.is_dir():
        shutil.rmtree(out)
    start = time.perf_counter()
    subprocess.run(args, check=True, capture_output=True)
    return time.perf_counter() - start


def repeated(commands: dict[str, list[str]], repeats: int) -> dict[str, list[float]]:
    """Each command ``repeats`` times, interleaved so that drift in the machine hits all alike."""
    times: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(repeats):
        for name, args in commands.items():
            times[name].append(seconds(args))
    return times


def auto_choice() -> str:
    """What ``auto`` chose for the bundled model here, measured once more in this process."""
    if missing := bf16_missing():
        return f"not here: {missing}"
    model = OnnxModel(BUNDLED_ONNX, precision="auto")
    times = ", ".join(f"{k.split('_')[0]} {v:.2f} ms" for k, v in model.measured.items())
    return f"here {model.precision}: per image on {PROBE_IMAGES} images, {times}"


def component_rates(files: list[Path], batch: int = 64) -> dict[str, float]:
    """Images/s of decoding alone and of the network alone (one decoded batch, repeated, every core),
    in each precision this machine serves."""
    prep = Preprocess.of(OnnxModel(BUNDLED_ONNX).config)
    start = time.perf_counter()
    decoded = [batch.images for batch in image_batches(files, prep, batch)]
    rates = {"decode_and_crop": len(files) / (time.perf_counter() - start)}
    x = decoded[0].astype(np.float32) / 255
    for precision in ("fp32", "bf16")[: 1 + (bf16_missing() is None)]:
        model = OnnxModel(BUNDLED_ONNX, threads=os.cpu_count(), precision=precision)
        model.scores(x)  # warm-up
        start = time.perf_counter()
        for _ in range(20):
            model.scores(x)
        rates[f"network_batch64_{precision}"] = 20 * len(x) / (time.perf_counter() - start)
    return rates


def main() -> None:
    options = parser(__doc__)
    options.add_argument("--images", type=int, default=2000)
    options.add_argument("--repeats", type=int, default=3)
    options.add_argument("--out", type=Path, default=Path("docs/serving"))
    options.add_argument(
        "--adapt-lab", default="lisc", help="Lab to adapt to for the adapted-run rows ('' skips them)."
    )
    args = options.parse_args()
    command = setup()
    tmp = Path(tempfile.mkdtemp())
    files = [str(p) for p in read_cells(args.data, ["pbc"]).select(splits=["test"]).paths[: args.images]]
    fields = args.data / "smears" / "bccd" / "images"
    n_fields = len(list(fields.iterdir()))
    fp32, auto, bf16 = ["--precision", "fp32"], [], ["--precision", "bf16"]
    paths = {"fp32 (ONNX Runtime)": fp32, "auto (default)": auto, "PyTorch": ["--model", str(BUNDLED)]}
    forced = {"fp32 (ONNX Runtime)": fp32, "auto (default)": auto, "bf16 (forced)": bf16}  # auto = fp32 here
    rows = []
    tasks = [
        ("`wbcid --help`", None, {"": []}, lambda model: ["--help"]),
        (
            "`wbcid predict`, 10 images",
            10,
            {k: v for k, v in paths.items() if k != "PyTorch"} | {"PyTorch": paths["PyTorch"]},
            lambda model: ["predict", "--out", str(tmp / "p.csv"), *model, *files[:10]],
        ),
        (
            f"`wbcid predict`, {len(files)} images",
            len(files),
            paths,
            lambda model: ["predict", "--out", str(tmp / "p.csv"), *model, *files],
        ),
        (
            f"`wbcid count`, {n_fields} BCCD fields",
            n_fields,
            forced | {"PyTorch": paths["PyTorch"]},
            lambda model: ["count", str(fields), "--out", str(tmp / "count"), *model],
        ),
    ]
    adapt_seconds = None
    if args.adapt_lab:
        run = tmp / "adapted"
        cells = read_cells(args.data, [args.adapt_lab])
        picked, _ = draw_per_class(cells, 10, seed=0)
        verified = pd.DataFrame({"path": [str(cells.cells[i].path) for i in picked], "label": cells.labels[picked]})
        verified.assign(label=[CLASSES[i] for i in verified.label]).to_csv(tmp / "verified.csv", index=False)
        adapt_seconds = seconds(WBCID + ["adapt", "--data", str(tmp / "verified.csv"), "--out", str(run)])
        served, checkpoint = ["--model", str(run)], ["--model", str(run / "model.pt")]
        tasks += [
            (
                f"`wbcid predict`, {len(files)} images, adapted to {args.adapt_lab}",
                len(files),
                {"run, fp32": [*served, *fp32], "run, auto (default)": served},
                lambda model: ["predict", "--out", str(tmp / "p.csv"), *model, *files],
            ),
            (
                f"`wbcid count`, {n_fields} BCCD fields, adapted to {args.adapt_lab}",
                n_fields,
                {"run (its model.onnx)": served, "run's model.pt": checkpoint},
                lambda model: ["count", str(fields), "--out", str(tmp / "count"), *model],
            ),
        ]
    for task, items, flags, build in tasks:
        variants = {name: build(flag) for name, flag in flags.items()}
        times = repeated({name: WBCID + cmd for name, cmd in variants.items()}, args.repeats)
        for name, values in times.items():
            median = statistics.median(values)
            rows.append(
                {
                    "task": task,
                    "path": name or "-",
                    "seconds_median": median,
                    "seconds": values,
                    "per_second": items / median if items else None,
                }
            )
            print(rows[-1], flush=True)
    components = component_rates([Path(f) for f in files[:640]])
    lines = [
        "# Serving speed: whole commands",
        f"`{command}`",
        f"Machine: {cpu_description()}; nothing else ran. Each command "
        f"ran {args.repeats} times, the model paths interleaved; wall time of the whole process (Python "
        "start-up, imports, model loading, writing included): median and range. `auto` serves bf16 from "
        f"512 images where the CPU has bf16 units and bf16 measures faster there ({auto_choice()}), so it "
        "is fp32 for 10 images and for the count (fewer fields); `bf16 (forced)` shows what bf16 would do there.",
        "| command | model | seconds (median) | range | per second |\n|---|---|---:|---:|---:|",
    ]
    for r in rows:
        rate = f"{r['per_second']:.1f}" if r["per_second"] else ""
        lines[-1] += (
            f"\n| {r['task']} | {r['path']} | {r['seconds_median']:.2f} | "
            f"{min(r['seconds']):.2f}-{max(r['seconds']):.2f} | {rate} |"
        )
    if adapt_seconds is not None:
        lines.append(
            f"`wbcid adapt` with 10 verified {args.adapt_lab} cells per class (`wbcid.splits.draw_per_class`, "
            f"seed 0), the bundled model as base, replaying its training cells, whole command: {adapt_seconds:.1f} s "
            "(once; it now also exports the run's model.onnx)."
        )
    network = ", ".join(
        f"{k.rsplit('_', 1)[1]} {v:.0f} images/s" for k, v in components.items() if k.startswith("network")
    )
    lines.append(
        f"Where the time goes (in one process, 640 PBC test images): decoding, canonical crop and colour "
        f"in threads {components['decode_and_crop']:.0f} images/s; the network alone (batch 64, on all "
        f"cores; bf16 as served, close calls rechecked in fp32): {network}."
    )
    result = {"command": command, "rows": rows, "components": components, "adapt_seconds": adapt_seconds}
    write_results(args.out, result, "\n\n".join(lines))
    print("\n\n".join(lines))


if __name__ == "__main__":
    main()
