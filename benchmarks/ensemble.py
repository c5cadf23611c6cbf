"""Does averaging PBC-only models trained with different recipes travel better than one model?

Each model under ``runs/generalization/<run>/model`` (trained by ``generalization.py``) is run
with its own preprocessing on PBC's test split and the four other labs; each ensemble (a
comma-separated list of runs) averages its models' class probabilities. Every model is also
scored alone. Macro-F1 over the classes present; results go to ``docs/ensemble.json`` and
``docs/ensemble.md``:

    python benchmarks/ensemble.py domain+crop,domain+crop@seed1,domain+crop@seed2 domain+crop,domain+crop+white-balance
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from common import parser, setup, write_results

from wbcid.benchmark import IN_DOMAIN, OTHER_SOURCES, TRAIN_SOURCE
from wbcid.data import read_cells
from wbcid.evaluation import compute_metrics
from wbcid.inference import predict_proba
from wbcid.loading import resolve_model


def main() -> None:
    options = parser(__doc__)
    options.add_argument("ensembles", nargs="+", help="Comma-separated runs under --runs, one ensemble each.")
    options.add_argument("--runs", type=Path, default=Path("runs/generalization"))
    options.add_argument("--out", type=Path, default=Path("docs/ensemble"))
    args = options.parse_args()
    command = setup()

    cells = read_cells(args.data)
    sources = {IN_DOMAIN: cells.select([TRAIN_SOURCE], ["test"]), **{s: cells.select([s]) for s in OTHER_SOURCES}}
    ensembles = [group.split(",") for group in args.ensembles]
    runs = list(dict.fromkeys(run for group in ensembles for run in group))
    probs = {}
    for run in runs:
        model = resolve_model(args.runs / run / "model")
        probs[run] = {s: predict_proba(model, c.paths, progress=False)[0] for s, c in sources.items()}
    rows = []
    for combo in [[run] for run in runs] + [group for group in ensembles if len(group) > 1]:
        scores = {
            s: compute_metrics(c.labels, np.mean([probs[r][s] for r in combo], axis=0).argmax(1))["macro_f1"]
            for s, c in sources.items()
        }
        rows.append(
            {"models": combo, **scores, "mean_out_of_domain": float(np.mean([scores[s] for s in OTHER_SOURCES]))}
        )
    lines = [
        "# Ensembles of PBC-only recipes",
        "Class probabilities averaged over models trained on PBC with different seeds or recipes (each model with its "
        "own preprocessing); macro-F1 over the classes present. Training and inference cost grow with the "
        "number of models (one model: about 12 minutes of training here).",
        f"| models | PBC test | {' | '.join(OTHER_SOURCES)} | mean out-of-domain |\n|---|---:|---:|---:|---:|---:|---:|"
        + "".join(
            f"\n| {' + '.join(r['models'])} | {r[IN_DOMAIN]:.3f} | "
            + " | ".join(f"{r[s]:.3f}" for s in OTHER_SOURCES)
            + f" | {r['mean_out_of_domain']:.3f} |"
            for r in rows
        ),
        f"Produced by:\n\n```\n{command}\n```",
    ]
    write_results(args.out, {"command": command, "results": rows}, "\n\n".join(lines))
    print(f"wrote {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
