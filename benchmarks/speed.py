"""End-to-end inference speed (files on disk -> CSV, model loading included) and training time.

All in one run on one machine, side by side: the bundled model in PyTorch and in ONNX Runtime,
the original project's seed CNN and VGG16 transfer model (their speed does not depend on their
weights, so untrained copies are timed when no trained ones exist), each at batch 1 and batched;
plus one epoch of the default training recipe on PBC. Writes ``docs/speed.md``.

    python benchmarks/speed.py [--data ../shared/data] [--images 2000] [--vgg-images 300]
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import parser, setup

from wbcid.contract import BUNDLED
from wbcid.data import read_cells
from wbcid.export import export_onnx
from wbcid.inference import predict
from wbcid.loading import resolve_model
from wbcid.models import create_model, save_model
from wbcid.train import TrainConfig, fit


def time_predict(model_path: Path, files: list[Path], batch_size: int, out: Path) -> float:
    """Images per second for ``wbcid predict`` (loading the model included)."""
    start = time.perf_counter()
    predict(model_path, files, out / "predictions.csv", batch_size=batch_size)
    return len(files) / (time.perf_counter() - start)


def main() -> None:
    options = parser(__doc__)
    options.add_argument("--images", type=int, default=2000)
    options.add_argument("--vgg-images", type=int, default=300, help="VGG16 is slow: time it on fewer images.")
    options.add_argument("--doc", type=Path, default=Path("docs/speed.md"))
    args = options.parse_args()
    command = setup()
    tmp = Path(tempfile.mkdtemp())
    cells = read_cells(args.data, ["pbc"])
    files = cells.select(splits=["test"]).paths[: args.images]

    start = time.perf_counter()
    onnx_path = export_onnx(resolve_model(BUNDLED), tmp / "bundled.onnx")
    export_seconds = time.perf_counter() - start
    candidates = {
        "bundled model, PyTorch": (BUNDLED, files),
        "bundled model, ONNX Runtime": (onnx_path, files),
        "seed-cnn (original small CNN)": (save_model(create_model("seed-cnn"), tmp / "seed.pt"), files),
        "vgg16 (original transfer model)": (
            save_model(create_model("vgg16", pretrained=False), tmp / "vgg.pt"),
            files[: args.vgg_images],
        ),
    }
    rows = {
        name: {b: time_predict(path, subset, b, tmp) for b in (1, 64)} for name, (path, subset) in candidates.items()
    }
    start = time.perf_counter()  # the command a user types, Python start-up and imports included
    subprocess.run(
        [sys.executable, "-m", "wbcid", "predict", "--out", str(tmp / "cli.csv"), *map(str, files)],
        check=True,
        capture_output=True,
    )
    cli_rate = len(files) / (time.perf_counter() - start)

    start = time.perf_counter()
    fit(cells, tmp / "train", TrainConfig(epochs=1))
    epoch_minutes = (time.perf_counter() - start) / 60
    ratio = rows["bundled model, ONNX Runtime"][64] / rows["vgg16 (original transfer model)"][64]

    lines = [
        "# Speed",
        f"Machine: {os.cpu_count()} CPU cores, {platform.processor() or platform.machine()}, torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads. End to end: image files on disk -> "
        "predictions CSV, model loading included (`wbcid.inference.predict`, what `wbcid predict` runs). "
        f"{len(files)} PBC test images ({args.vgg_images} for VGG16, whose rate is the same per image).",
        "| model | input | images/s, batch 1 | images/s, batch 64 |",
    ]
    lines[-1] += "\n|---|---:|---:|---:|"
    for name, (path, _) in candidates.items():
        config = resolve_model(path).config
        size = f"{config.input_size} px" + (" + canonical crop" if config.crop else "")
        lines[-1] += f"\n| {name} | {size} | {rows[name][1]:.1f} | {rows[name][64]:.1f} |"
    lines += [
        f"`wbcid predict --out FILE.csv` on the same {len(files)} files with the bundled model (what it serves: "
        f"ONNX Runtime, batch 64), timed as a whole command including Python start-up: {cli_rate:.1f} images/s.",
        f"Bundled model (ONNX Runtime, batch 64) vs the original VGG16 transfer model: {ratio:.1f}x faster.",
        f"ONNX export of the bundled model: {export_seconds:.0f} s. One epoch of the default training recipe "
        f"on PBC ({sum(cells.select(splits=['train']).class_counts().values())} images; decoding, "
        f"validation and the end-of-run steps included): {epoch_minutes:.1f} min (`TrainConfig(epochs=1)`, "
        "written to a temporary folder).",
        f"Produced by:\n\n```\n{command}\n```",
    ]
    args.doc.write_text("\n\n".join(lines) + "\n")
    print(args.doc.read_text())


if __name__ == "__main__":
    main()
