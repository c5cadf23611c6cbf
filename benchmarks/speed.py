"""Training and inference speed on this machine, side by side in one run.

Training (issue 14): the default ``wbcid train --data DATA/cells.csv --source pbc`` (``--precision
auto``: on a CPU with bf16 units, the frozen layer groups run in bf16, see ``wbcid.train.autocast``)
and the same command with ``--precision fp32``, each timed as a whole command (Python start-up,
decoding, the end-of-run statistics and the ONNX export included), then each scored under the
single-source protocol (``wbcid.benchmark.run_benchmark``: PBC test and the four other labs) and set
beside the run-to-run spread of the default recipe in docs/generalization.md.

Inference: end to end, image files on disk -> predictions CSV, model loading included
(``wbcid.inference.predict``): the bundled model in PyTorch and in ONNX Runtime (fp32), the
original project's seed CNN and VGG16 transfer model (their speed does not depend on their weights,
so untrained copies are timed), each at batch 1 and batched. Serving in bf16 and int8 has its own
pages: docs/serving.md and docs/precision.md. Writes ``docs/speed.md`` and ``docs/speed.json``; pages
measured on another machine share the suffix of ``--doc`` (docs/speed_amx.md links docs/serving_amx.md).

    python benchmarks/speed.py [--data ../shared/data] [--images 2000] [--vgg-images 300]
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import cpu_description, parser, setup, write_results

from wbcid.benchmark import IN_DOMAIN, run_benchmark
from wbcid.contract import BUNDLED
from wbcid.data import read_cells
from wbcid.export import export_onnx
from wbcid.inference import predict
from wbcid.loading import resolve_model
from wbcid.models import create_model, save_model

SEED_RUNS = ("domain+crop", "domain+crop@seed1", "domain+crop@seed2")  # the default recipe, three seeds


def time_predict(model_path: Path, files: list[Path], batch_size: int, out: Path) -> float:
    """Images per second for ``wbcid predict`` (loading the model included)."""
    start = time.perf_counter()
    predict(model_path, files, out / "predictions.csv", batch_size=batch_size, precision="fp32")
    return len(files) / (time.perf_counter() - start)


def time_training(data: Path, out: Path, precision: str) -> dict:
    """One whole ``wbcid train`` command on PBC, then the run scored under the single-source protocol."""
    command = [sys.executable, "-m", "wbcid", "train", "--data", str(data / "cells.csv"), "--source", "pbc"]
    start = time.perf_counter()
    subprocess.run([*command, "--out", str(out / "run"), "--precision", precision], check=True, capture_output=True)
    seconds = time.perf_counter() - start
    scored = run_benchmark(data, out / "benchmark", model=out / "run")
    config = json.loads((out / "run" / "config.json").read_text())["train"]
    return {
        "seconds": seconds,
        "precision": config["precision"],
        "epochs": len((out / "run" / "history.csv").read_text().splitlines()) - 1,
        "pbc_test_macro_f1": scored["sources"][IN_DOMAIN]["macro_f1"],
        "out_of_domain": {k: v["macro_f1"] for k, v in scored["sources"].items() if k != IN_DOMAIN},
        "mean_out_of_domain_macro_f1": scored["mean_out_of_domain_macro_f1"],
    }


def main() -> None:
    options = parser(__doc__)
    options.add_argument("--images", type=int, default=2000)
    options.add_argument("--vgg-images", type=int, default=300, help="VGG16 is slow: time it on fewer images.")
    options.add_argument("--doc", type=Path, default=Path("docs/speed.md"))
    args = options.parse_args()
    command = setup()
    tmp = Path(tempfile.mkdtemp())
    training = {p: time_training(args.data, tmp / p, p) for p in ("auto", "fp32")}
    spread = [
        json.loads((Path("docs/generalization") / f"{name}.json").read_text())["mean_out_of_domain_macro_f1"]
        for name in SEED_RUNS
    ]

    files = read_cells(args.data, ["pbc"]).select(splits=["test"]).paths[: args.images]
    onnx_path = export_onnx(resolve_model(BUNDLED), tmp / "bundled.onnx")
    candidates = {
        "bundled model, PyTorch": (BUNDLED, files),
        "bundled model, ONNX Runtime": (onnx_path, files),
        "seed-cnn (original small CNN)": (save_model(create_model("seed-cnn"), tmp / "seed.pt"), files),
        "vgg16 (original transfer model)": (
            save_model(create_model("vgg16", pretrained=False), tmp / "vgg.pt"),
            files[: args.vgg_images],
        ),
    }
    rates = {
        name: {b: time_predict(path, subset, b, tmp) for b in (1, 64)} for name, (path, subset) in candidates.items()
    }
    write_results(
        args.doc.with_suffix(""),
        {"cpu": cpu_description(), "training": training, "seed_spread": spread, "inference": rates},
        page(
            training,
            spread,
            rates,
            candidates,
            len(files),
            args.vgg_images,
            command,
            args.doc.stem.removeprefix("speed"),
        ),
    )
    print(args.doc.read_text())


def page(
    training: dict,
    spread: list[float],
    rates: dict,
    candidates: dict,
    images: int,
    vgg_images: int,
    command: str,
    suffix: str = "",
) -> str:
    """docs/speed.md from the run's numbers; ``suffix`` names the serving and precision pages of the same machine."""
    serving, precision = f"docs/serving{suffix}.md", f"docs/precision{suffix}.md"
    auto, fp32 = training["auto"], training["fp32"]
    rows = "\n".join(
        f"| `--precision {name}` ({run['precision']}) | {run['seconds']:.0f} s ({run['seconds'] / 60:.1f} min) | "
        f"{run['epochs']} | {run['pbc_test_macro_f1']:.4f} | "
        + " | ".join(f"{v:.3f}" for v in run["out_of_domain"].values())
        + f" | {run['mean_out_of_domain_macro_f1']:.3f} |"
        for name, run in training.items()
    )
    labs = " | ".join(auto["out_of_domain"])
    models = "\n".join(
        f"| {name} | {resolve_model(path).config.input_size} px"
        f"{' + canonical crop' if resolve_model(path).config.crop else ''} | {rates[name][1]:.1f} | {rates[name][64]:.1f} |"
        for name, (path, _) in candidates.items()
    )
    vgg = rates["bundled model, ONNX Runtime"][64] / rates["vgg16 (original transfer model)"][64]
    return f"""# Speed

CPU: {cpu_description()}; torch {torch.__version__}, {torch.get_num_threads()} threads. Everything on
this page ran in one run, one thing at a time, nothing else running.

## Training

The default recipe on PBC (`wbcid train --data DATA/cells.csv --source pbc`), each timed as a whole
command (start-up, decoding, six epochs at most, the end-of-run statistics and the ONNX export), then
scored under the single-source protocol (macro-F1 over the classes present; the four other labs
whole, served as `wbcid evaluate` serves them). `auto` runs the frozen layer groups in bf16 on a CPU
with bf16 units (fp32 elsewhere); the trained layers stay fp32 on a CPU (slower in bf16 here,
{precision}).

| command | time | epochs | PBC test | {labs} | mean out-of-domain |
|---|---:|---:|---:|{"---:|" * len(auto["out_of_domain"])}---:|
{rows}

Default against fp32: {auto["seconds"] / fp32["seconds"]:.2f} of its time. Run-to-run spread of the
default recipe's mean out-of-domain macro-F1 over three training seeds (docs/generalization.md):
{min(spread):.3f}-{max(spread):.3f}.

## Inference, the bundled model against the original project's

End to end: image files on disk -> predictions CSV, model loading included (`wbcid.inference.predict`,
what `wbcid predict` runs, here in fp32), {images} PBC test images ({vgg_images} for VGG16, whose rate
is the same per image). Whole commands with bf16 serving: {serving}; int8 and bf16 against
fp32: {precision}.

| model | input | images/s, batch 1 | images/s, batch 64 |
|---|---:|---:|---:|
{models}

Bundled model (ONNX Runtime, batch 64) vs the original VGG16 transfer model: {vgg:.1f}x faster.

Produced by:

```
{command}
```

Checks on a lent GPU (correctness, not this page's timings): [gpu.md](gpu.md).
"""


if __name__ == "__main__":
    main()
