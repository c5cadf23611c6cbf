"""Out-of-distribution flags: does ``ood_score`` separate non-WBC cells from the five types, and
how good are the answers that are not flagged, on every source?

    python benchmarks/ood.py --model runs/generalization/domain+crop/model [--data ../shared/data]

The model should be a single-source (PBC) benchmark model, so that every other source is truly
unseen. If it was trained before the OOD scorer existed, the scorer is fitted first on the
cells it was trained on (PBC train, calibrated on PBC val); no out-of-distribution cell is used.
Writes ``docs/ood.json`` and ``docs/ood.md``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from common import parser, setup, write_results
from sklearn.metrics import roc_auc_score

from wbcid.benchmark import OTHER_SOURCES, TRAIN_SOURCE
from wbcid.contract import flagged
from wbcid.data import CLASSES, read_cells
from wbcid.evaluation import compute_metrics, flagged_metrics
from wbcid.inference import predict_proba
from wbcid.loading import resolve_model
from wbcid.ood import QUANTILE
from wbcid.training_statistics import refit_training_statistics

SOURCES = (TRAIN_SOURCE, *OTHER_SOURCES)


def main() -> None:
    options = parser(__doc__)
    options.add_argument("--model", type=Path, help="run directory or model file; default: the bundled model")
    options.add_argument("--out", type=Path, default=Path("docs/ood"))
    args = options.parse_args()
    command = setup()

    cells = read_cells(args.data / "cells.csv")
    model = resolve_model(args.model, needs_torch="the feature benchmark")
    if model.ood is None and args.model is not None:
        model = refit_training_statistics(args.model, cells.select(["pbc"], ["train"]), cells.select(["pbc"], ["val"]))

    def score(cellset):
        probs, ood, ok, _ = predict_proba(model, cellset.paths)
        return probs[ok], ood[ok], cellset.subset(ok)

    p_in, ood_in, pbc_test = score(cells.select(["pbc"], ["test"]))
    other = read_cells(args.data / "cells.csv", ["pbc_other"], known_only=False)
    p_out, ood_out, other = score(other)
    raw = np.array([c.raw_label for c in other.cells])

    def auroc(out_scores: np.ndarray, in_scores: np.ndarray) -> float:
        return float(
            roc_auc_score(np.r_[np.zeros(len(in_scores)), np.ones(len(out_scores))], np.r_[in_scores, out_scores])
        )

    result = {
        "command": command,
        "model": str(args.model or "bundled"),
        "threshold_quantile": QUANTILE,
        "auroc": {
            "pbc_other": auroc(ood_out, ood_in),
            **{kind: auroc(ood_out[raw == kind], ood_in) for kind in sorted(set(raw))},
        },
        "auroc_max_softmax_baseline": {"pbc_other": auroc(-p_out.max(1), -p_in.max(1))},
        "pbc_other_flagged_share": {kind: float(flagged(ood_out[raw == kind]).mean()) for kind in sorted(set(raw))},
        "sources": {},
    }
    for source in SOURCES:
        subset = cells.select([source], ["test"]).known()
        probs, ood, kept = (p_in, ood_in, pbc_test) if source == "pbc" else score(subset)
        predicted = probs.argmax(1)
        result["sources"][source] = {
            "n": len(kept),
            **{k: compute_metrics(kept.labels, predicted)[k] for k in ("accuracy", "macro_f1")},
            **flagged_metrics(kept.labels, predicted, flagged(ood)),
        }
    text = report(result)
    write_results(args.out, result, text)
    print(text)


def report(r: dict) -> str:
    kinds = [k for k in r["auroc"] if k != "pbc_other"]
    rows = "\n".join(
        f"| {s} | {m['n']} | {m['accuracy']:.3f} | {m['macro_f1']:.3f} | {m['flagged_share']:.1%} | "
        f"{m['accuracy_unflagged']:.3f} | {m['macro_f1_unflagged']:.3f} |"
        for s, m in r["sources"].items()
    )
    return f"""# Out-of-distribution flags

Command: `{r["command"]}`. Model: `{r["model"]}`. The scorer is fitted on the features of the
model's training cells; its threshold is the {r["threshold_quantile"]:.0%} quantile of its validation cells' scores.

## Non-WBC cells (PBC's other classes) against PBC's five-class test split

| | all | {" | ".join(kinds)} |
|---|---|{"---|" * len(kinds)}
| AUROC of `ood_score` | {r["auroc"]["pbc_other"]:.4f} | {" | ".join(f"{r['auroc'][k]:.4f}" for k in kinds)} |
| share flagged | | {" | ".join(f"{r['pbc_other_flagged_share'][k]:.1%}" for k in kinds)} |

Baseline, the maximum softmax probability as the score: AUROC {r["auroc_max_softmax_baseline"]["pbc_other"]:.4f}.

## Every source: the answers that are not flagged

| source | n | accuracy (all) | macro-F1 (all) | flagged | accuracy (unflagged) | macro-F1 (unflagged) |
|---|---|---|---|---|---|---|
{rows}

Classes of the five (`{", ".join(CLASSES)}`) only; macro-F1 over the classes present.
"""


if __name__ == "__main__":
    main()
