"""Does averaging PBC-only models trained with different recipes travel better than one model?

Each model under ``runs/generalization/<recipe>/model`` (trained by ``generalization.py``) is
run with its own preprocessing on PBC's test split and the four other labs; the class
probabilities of every combination of models are averaged and scored (macro-F1 over the classes
present). Results go to ``docs/ensemble.json`` and ``docs/ensemble.md``:

    python benchmarks/ensemble.py --recipes domain+crop domain+crop+white-balance domain+lowres+crop domain+crop+frozen-bn
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import numpy as np

from wbcid.benchmark import IN_DOMAIN
from wbcid.data import default_data_root, read_cells
from wbcid.evaluate import compute_metrics
from wbcid.models import load_model
from wbcid.predict import predict_proba

OTHER_LABS = ("lisc", "tecom", "cellavision", "bccd")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=default_data_root())
    parser.add_argument("--recipes", nargs="+", required=True)
    parser.add_argument("--runs", type=Path, default=Path("runs/generalization"))
    parser.add_argument("--out", type=Path, default=Path("docs/ensemble"))
    args = parser.parse_args()

    cells = read_cells(args.data)
    sources = {IN_DOMAIN: cells.select([IN_DOMAIN], ["test"]), **{s: cells.select([s]) for s in OTHER_LABS}}
    probs = {}
    for recipe in args.recipes:
        model = load_model(args.runs / recipe / "model")
        probs[recipe] = {s: predict_proba(model, c.paths, progress=False)[0] for s, c in sources.items()}
    rows = []
    for k in range(1, len(args.recipes) + 1):
        for combo in itertools.combinations(args.recipes, k):
            scores = {s: compute_metrics(c.labels, np.mean([probs[r][s] for r in combo], axis=0).argmax(1))["macro_f1"]
                      for s, c in sources.items()}
            rows.append({"models": list(combo), **scores, "mean_out_of_domain": float(np.mean([scores[s] for s in OTHER_LABS]))})
    command = " ".join(["python benchmarks/ensemble.py", *sys.argv[1:]])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"command": command, "results": rows}, indent=2))
    lines = ["# Ensembles of PBC-only recipes",
             "Class probabilities averaged over models trained on PBC with different recipes (each model with its "
             "own preprocessing); macro-F1 over the classes present. Training and inference cost grow with the "
             "number of models (one model: about 12 minutes of training here).",
             f"| models | PBC test | {' | '.join(OTHER_LABS)} | mean out-of-domain |\n|---|---:|---:|---:|---:|---:|---:|"
             + "".join(f"\n| {' + '.join(r['models'])} | {r[IN_DOMAIN]:.3f} | "
                       + " | ".join(f"{r[s]:.3f}" for s in OTHER_LABS) + f" | {r['mean_out_of_domain']:.3f} |"
                       for r in rows),
             f"Produced by:\n\n```\n{command}\n```"]
    args.out.with_suffix(".md").write_text("\n\n".join(lines) + "\n")
    print(f"wrote {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
