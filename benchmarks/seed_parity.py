"""Reproduce the original project's experiment: train on PBC, test in-domain and on other labs.

For each model: train on PBC (``source=pbc``; the manifest's train/val split), then report
Train (PBC train), Test1 (PBC test) and Test2 (every other source, one by one and pooled) with
classification reports, confusion matrices and the history plot. Writes ``docs/seed_parity.md``
and its figures under ``docs/seed_parity/``; trained models go to ``--runs`` (not committed).

    python benchmarks/seed_parity.py                       # all models, data from ../shared/data
    python benchmarks/seed_parity.py --models seed-cnn --data /path/to/data
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from common import parser, setup

from wbcid.benchmark import OTHER_SOURCES
from wbcid.data import CellSet, read_cells
from wbcid.errors import WbcidError
from wbcid.evaluation import evaluate
from wbcid.loading import resolve_model
from wbcid.models import create_model
from wbcid.reports import metrics_table
from wbcid.train import TrainConfig, fit

# Per-model settings: the original CNN trains from scratch and needs more (cheap) epochs. The
# EfficientNet row is a like-for-like transfer model (whole image, basic augmentation); the
# default recipe (canonical crop, domain augmentation) is measured in docs/generalization.md.
RECIPES = {
    "seed-cnn": TrainConfig(model="seed-cnn", epochs=30, lr=1e-3, patience=6, augment="basic", crop=False),
    "efficientnet_lite0": TrainConfig(augment="basic", crop=False),
    "vgg16": TrainConfig(model="vgg16", epochs=6, augment="basic", crop=False),
}
ORIGINAL = {"seed-cnn": (96.1, 9.1), "vgg16": (92.2, 6.8)}


def run_model(name: str, data: Path, runs: Path, docs: Path) -> dict | str:
    """Train and evaluate one model; returns its metrics per test set, or why it was skipped."""
    config = RECIPES[name]
    try:
        create_model(name, pretrained=config.pretrained)
    except WbcidError as exc:
        return f"skipped: {str(exc).replace(str(Path.home()), '~')}"  # no home path of this machine in docs
    run = runs / name
    if run.exists():
        shutil.rmtree(run)
    start = time.perf_counter()
    fit(read_cells(data, ["pbc"]), run, config)
    minutes = (time.perf_counter() - start) / 60
    model = resolve_model(run)
    figures = docs / name
    figures.mkdir(parents=True, exist_ok=True)
    shutil.copy(run / "history.png", figures / "history.png")
    everything = read_cells(data)
    sets: dict[str, CellSet] = {
        "Train (PBC train)": everything.select(["pbc"], ["train"]),
        "Test1 (PBC test)": everything.select(["pbc"], ["test"]),
        "Test2 (all other sources)": everything.select(list(OTHER_SOURCES)),
        **{f"Test2: {s}": everything.select([s]) for s in OTHER_SOURCES},
    }
    results = {}
    for title, cells in sets.items():
        results[title] = evaluate(model, cells, figures / _slug(title), title=f"{name}: {title}")
    epochs = len((run / "history.csv").read_text().splitlines()) - 1
    return {"minutes": minutes, "epochs": epochs, "results": results}


def _slug(title: str) -> str:
    """'Test2: lisc' -> 'test2_lisc', 'Test1 (PBC test)' -> 'test1'."""
    return title.split(" (")[0].replace(": ", "_").replace(" ", "_").lower()


def write_doc(outcomes: dict[str, dict | str], docs: Path, command: str) -> Path:
    lines = [
        "# Seed parity: the original experiment, rerun",
        "Train on PBC (train split, validation on PBC val), test on PBC test (Test1) and on the four "
        "other labs (Test2). Produced by:",
        f"```\n{command}\n```",
        "Macro-F1 and balanced accuracy average over the classes present in each test set "
        "(tecom, cellavision and bccd have 1-3 basophils). All models here see the whole image with basic "
        "augmentation, like the original; the default recipe (canonical crop, domain augmentation) is "
        "measured under the same protocol in [generalization.md](generalization.md).",
    ]
    summary = [
        "| model | Test1 accuracy (original) | Test2 accuracy (original) | Test1 macro-F1 | Test2 macro-F1 | train time |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, outcome in outcomes.items():
        if isinstance(outcome, str):
            summary.append(f"| {name} | {outcome} | | | | |")
            continue
        r = outcome["results"]
        t1, t2 = r["Test1 (PBC test)"], r["Test2 (all other sources)"]
        o1, o2 = (f" ({v} %)" for v in ORIGINAL[name]) if name in ORIGINAL else ("", "")
        summary.append(
            f"| {name} | {100 * t1['accuracy']:.1f} %{o1} | {100 * t2['accuracy']:.1f} %{o2} | "
            f"{t1['macro_f1']:.3f} | {t2['macro_f1']:.3f} | {outcome['minutes']:.1f} min |"
        )
    lines += ["## Summary", "\n".join(summary)]
    for name, outcome in outcomes.items():
        if isinstance(outcome, str):
            continue
        lines += [
            f"## {name}",
            f"Trained {outcome['epochs']} epochs in {outcome['minutes']:.1f} min on this machine.",
            metrics_table(outcome["results"]),
            f"![history]({docs.name}/{name}/history.png)",
        ]
        for title, m in outcome["results"].items():
            lines += [
                f"### {title}",
                f"```\n{m['classification_report']}```",
                f"![confusion matrix]({docs.name}/{name}/{_slug(title)}/confusion_matrix.png)",
            ]
    path = docs.parent / f"{docs.name}.md"
    path.write_text("\n\n".join(lines) + "\n")
    return path


def main() -> None:
    options = parser(__doc__)
    options.add_argument("--models", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    options.add_argument("--docs", type=Path, default=Path("docs/seed_parity"))
    options.add_argument("--runs", type=Path, default=Path("runs/seed_parity"))
    args = options.parse_args()
    command = setup()
    outcomes = {name: run_model(name, args.data, args.runs, args.docs) for name in args.models}
    print(f"wrote {write_doc(outcomes, args.docs, command)}")


if __name__ == "__main__":
    main()
