"""The cross-domain protocol: train on one lab (or all but one), test on the labs never seen.

Single-source: train on PBC's train split (validation on PBC's val split only), test on PBC's
test split (in-domain) and on every other source. Leave-one-source-out: train on all sources
but one, test on the one held out. No target label is used for training, selection or
thresholds; test-time AdaBN (``adabn``) sees a target lab's images, never its labels.
A benchmark trains for minutes to an hour on a CPU; ``resume`` continues an interrupted one
without redoing what it finished (a training, a held-out source).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from .data import CellSet, read_cells
from .errors import WbcidError
from .evaluation import evaluate
from .files import output_folder
from .splits import training_pool
from .train import TrainConfig, fit

TRAIN_SOURCE = "pbc"
IN_DOMAIN = f"{TRAIN_SOURCE} (in-domain test)"
OTHER_SOURCES = ("lisc", "tecom", "cellavision", "bccd")  # the labs a PBC-trained model never saw
WRITTEN = ("benchmark.json", "report.md")  # into its folder: the first marks an earlier benchmark


def run_benchmark(
    data: CellSet | str | os.PathLike,
    out: str | os.PathLike,
    config: TrainConfig | None = None,
    model: str | os.PathLike | None = None,
    holdout: str | None = None,
    adabn: bool = False,
    tta: bool = False,
    resume: bool = False,
) -> dict:
    """Train (unless ``model`` is given) and test under the protocol; writes benchmark.json and report.md.

    ``holdout=None`` is the single-source protocol; ``holdout=S`` trains on every other source.
    ``resume``: continue the training in ``out/model`` (or keep it, if it finished) instead of
    refusing to train over it.
    """
    out = output_folder(out, "the benchmark", replaces=WRITTEN)
    cells = data if isinstance(data, CellSet) else read_cells(data)
    sources = sorted({c.source for c in cells.cells})
    if holdout is None:
        if TRAIN_SOURCE not in sources:
            raise WbcidError(f"{data}: the single-source protocol trains on {TRAIN_SOURCE!r}, which is absent")
        train = cells.select([TRAIN_SOURCE])
        targets = {
            IN_DOMAIN: train.select(splits=["test"]),
            **{s: cells.select([s]) for s in sources if s != TRAIN_SOURCE},
        }
    else:
        if holdout not in sources:
            raise WbcidError(f"cannot hold out {holdout!r}: sources are {', '.join(sources)}")
        rest = cells.subset(
            [c.source != holdout and not (c.source == TRAIN_SOURCE and c.split == "test") for c in cells.cells]
        )
        train, targets = training_pool(rest), {holdout: cells.select([holdout])}
    if model is None:
        model = fit(train, out / "model", config or TrainConfig(), resume=resume)
    results = {}
    for name, target in targets.items():
        metrics = evaluate(model, target, out / "sources" / _slug(name), title=name, adabn=adabn, tta=tta)
        results[name] = {
            k: metrics[k]
            for k in (
                "n",
                "accuracy",
                "balanced_accuracy",
                "macro_f1",
                "ci95",
                "classes_present",
                "confusion_matrix",
                "flagged",
            )
            if k in metrics
        }
    out_of_domain = [r["macro_f1"] for name, r in results.items() if name != IN_DOMAIN]
    summary = {
        "protocol": "single-source" if holdout is None else f"leave-one-source-out: {holdout}",
        "train_sources": sorted({c.source for c in train.cells}),
        "model": str(model),
        "config": json.loads((Path(model) / "config.json").read_text())
        if Path(model, "config.json").is_file()
        else None,
        "adabn": adabn,
        "tta": tta,
        "sources": results,
        "mean_out_of_domain_macro_f1": float(np.mean(out_of_domain)) if out_of_domain else None,
    }
    if IN_DOMAIN in results and out_of_domain:
        summary["generalization_gap"] = results[IN_DOMAIN]["macro_f1"] - summary["mean_out_of_domain_macro_f1"]
    (out / "benchmark.json").write_text(json.dumps(summary, indent=2))
    write_benchmark_report(summary, out)
    return summary


def leave_one_source_out(
    data: CellSet | str | os.PathLike,
    out: str | os.PathLike,
    config: TrainConfig | None = None,
    adabn: bool = False,
    tta: bool = False,
    resume: bool = False,
) -> dict:
    """One :func:`run_benchmark` per source, each trained on all the others; a table over all.
    ``resume`` keeps each source already benchmarked and continues the one interrupted."""
    out = output_folder(out, "the benchmark", replaces=WRITTEN)
    cells = data if isinstance(data, CellSet) else read_cells(data)
    sources = sorted({c.source for c in cells.cells})
    if len(sources) < 2:
        raise WbcidError(
            f"{cells.origin}: leave-one-source-out needs cells of two sources or more (a 'source' column); "
            f"found {', '.join(sources) or 'none'}"
        )
    runs = {
        s: json.loads((out / s / "benchmark.json").read_text())
        if resume and (out / s / "benchmark.json").is_file()
        else run_benchmark(cells, out / s, config, holdout=s, adabn=adabn, tta=tta, resume=resume)
        for s in sources
    }
    results = {s: run["sources"][s] for s, run in runs.items()}
    summary = {
        "protocol": "leave-one-source-out",
        "adabn": adabn,
        "tta": tta,
        "sources": results,
        "runs": {s: s for s in sources},
        "mean_out_of_domain_macro_f1": float(np.mean([r["macro_f1"] for r in results.values()])),
    }
    (out / "benchmark.json").write_text(json.dumps(summary, indent=2))
    write_benchmark_report(summary, out)
    return summary


def benchmark_table(results: dict[str, dict]) -> str:
    """Markdown table of per-source scores with their 95 % bootstrap intervals."""
    flags = all("flagged" in r for r in results.values())
    lines = ["| test source | n | accuracy | balanced accuracy | macro-F1 |", "|---|---:|---:|---:|---:|"]
    if flags:
        lines = [lines[0] + " flagged | accuracy (unflagged) |", lines[1] + "---:|---:|"]
    for name, r in results.items():
        cells = [
            f"{r[k]:.3f} [{r['ci95'][k][0]:.3f}, {r['ci95'][k][1]:.3f}]"
            for k in ("accuracy", "balanced_accuracy", "macro_f1")
        ]
        if flags:
            unflagged = r["flagged"]["accuracy_unflagged"]
            cells += [f"{r['flagged']['flagged_share']:.1%}", "-" if unflagged is None else f"{unflagged:.3f}"]
        lines.append(f"| {name} | {r['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_benchmark_report(summary: dict, out: Path) -> Path:
    lines = [
        f"# Cross-domain benchmark ({summary['protocol']})",
        f"Test-time adaptation (AdaBN): {'on' if summary.get('adabn', summary.get('adapt')) else 'off'}; "
        f"test-time augmentation: {'on' if summary['tta'] else 'off'}. Intervals: 95 % bootstrap "
        "(1000 resamples of cells). Macro-F1 and balanced accuracy average over the classes present.",
        benchmark_table(summary["sources"]),
    ]
    if summary.get("generalization_gap") is not None:
        lines.append(
            f"Mean out-of-domain macro-F1: {summary['mean_out_of_domain_macro_f1']:.3f}; "
            f"generalization gap (in-domain minus mean out-of-domain macro-F1): "
            f"{summary['generalization_gap']:.3f}."
        )
    lines.append("## Confusion matrices")
    for name in summary["sources"]:
        figure = Path(summary.get("runs", {}).get(name, "."), "sources", _slug(name), "confusion_matrix.png")
        lines.append(f"![{name}]({figure.as_posix()})")
    path = out / "report.md"
    path.write_text("\n\n".join(lines) + "\n")
    return path


def _slug(name: str) -> str:
    """Folder name for a test set: 'pbc (in-domain test)' -> 'pbc'."""
    return name.split()[0]
