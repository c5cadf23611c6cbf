"""Heads on frozen features against fine-tuning: the other few-shot methods the adaptation issue names.

    python benchmarks/frozen_heads.py --model runs/pbc [--ks 5 10] [--draws 5] [--compare docs/adaptation/musts-tta.json]

The draws are those of ``benchmarks/adaptation.py`` (``wbcid.splits.draw_per_class``, seed = draw), so
every row pairs with the fine-tuned row of ``--compare`` made from the same base model. The base
model stays frozen; its penultimate features of the verified cells, over the 8 rotations and flips
of each, fit one of two heads that replace its own:

- **prototypes**: a cell goes to the class whose mean feature is nearest by cosine, features centred
  and L2-normalised first (SimpleShot's CL2N nearest-class-mean rule, Wang et al. 2019, centred on
  the verified cells' mean rather than the training classes'; the rule of prototypical networks,
  Snell et al. 2017, on fixed features);
- **linear probe**: multinomial logistic regression on standardised features (scikit-learn's
  defaults, C = 1; nothing tuned).

Each is scored on the lab's remaining cells (macro-F1 over the classes present), their features
averaged over the 8 rotations and flips, as the adapted models predict. No constant was fitted to
a lab. Writes ``docs/frozen_heads.json`` and ``.md``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
from common import parser, setup, write_results
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from wbcid.benchmark import OTHER_SOURCES
from wbcid.data import read_cells
from wbcid.decoding import load_images
from wbcid.evaluation import compute_metrics
from wbcid.inference import dihedral_views
from wbcid.loading import resolve_model
from wbcid.models import WBCNet
from wbcid.ood import image_features
from wbcid.preprocess import Preprocess
from wbcid.splits import draw_per_class

OUT = Path("docs/frozen_heads")
HEADS = ("prototypes", "linear probe")


def main() -> None:
    options = parser(__doc__)
    options.add_argument("--model", type=Path, required=True)
    options.add_argument("--labs", nargs="+", default=list(OTHER_SOURCES))
    options.add_argument("--ks", nargs="+", type=int, default=[5, 10])
    options.add_argument("--draws", type=int, default=5)
    options.add_argument("--compare", type=Path, default=Path("docs/adaptation/musts-tta.json"))
    args = options.parse_args()
    command = setup(logging.WARNING)
    torch.set_num_threads(2)
    base = resolve_model(args.model, needs_torch="its penultimate features").eval()
    prep = Preprocess.of(base.config)
    cells = read_cells(args.data / "cells.csv", known_only=False)  # known_only would warn of PBC's other cells
    rows = []
    for lab in args.labs:
        images, lab_cells = load_images(cells.select([lab]).known(), prep, "decoding")
        features, labels = view_features(base, images), lab_cells.labels
        with torch.no_grad():  # the base model's own head on each cell as given (its K = 0 row elsewhere)
            zero_shot = compute_metrics(labels, base.head(torch.from_numpy(features[:, 0])).argmax(1).numpy())
        print(f"{lab}: zero-shot macro-F1 {zero_shot['macro_f1']:.4f}", flush=True)
        for k in args.ks:
            for draw in range(args.draws):
                picked, rest = draw_per_class(lab_cells, k, seed=draw)
                fit_x = features[picked].reshape(-1, features.shape[-1])
                fit_y = np.repeat(labels[picked], features.shape[1])
                scored = features[rest].mean(1)
                row = {"lab": lab, "k": k, "draw": draw, "verified": len(picked), "scored": len(rest)}
                row["zero_shot"] = zero_shot["macro_f1"]  # the same in every draw: the check on the base model
                for head, predicted in zip(HEADS, (prototypes(fit_x, fit_y, scored), probe(fit_x, fit_y, scored))):
                    row[head] = compute_metrics(labels[rest], predicted)["macro_f1"]
                rows.append(row)
                print(json.dumps(row), flush=True)
    compared = json.loads(args.compare.read_text())
    result = {"command": command, "model": str(args.model), "compare": str(args.compare), "rows": rows}
    write_results(OUT, result, report(result, compared))


def view_features(model: WBCNet, images: torch.Tensor) -> np.ndarray:
    """Penultimate features of each cell's 8 rotations and flips: ``(cells, 8, features)``."""
    views = dihedral_views(images.numpy())
    return torch.stack([image_features(model, torch.from_numpy(view)) for view in views], 1).numpy()


def prototypes(fit_x: np.ndarray, fit_y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """The nearest class mean by cosine, of centred, L2-normalised features (CL2N): uncentred, the
    features share one large mean (they follow ReLU6), which every cosine would carry."""
    centre = fit_x.mean(0)
    fit_x, x = fit_x - centre, x - centre
    classes = np.unique(fit_y)
    means = np.stack([_unit(fit_x[fit_y == c]).mean(0) for c in classes])
    return classes[(_unit(x) @ _unit(means).T).argmax(1)]


def probe(fit_x: np.ndarray, fit_y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Multinomial logistic regression on standardised features (scikit-learn's defaults)."""
    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000)).fit(fit_x, fit_y).predict(x)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True).clip(1e-12)


def report(result: dict, compared: dict) -> str:
    """The page: mean (worst draw) macro-F1 of each head beside the fine-tuned model on the same draws."""
    tuned = {(r["lab"], r["k"], r["draw"]): r["macro_f1"] for r in compared["rows"] if not r["unlabelled"]}
    lines = [
        "# Few-shot heads on frozen features against fine-tuning",
        "",
        __doc__.split("\n\n", 2)[2].strip(),
        "",
        f"`{result['command']}`",
        "",
        f"Fine-tuned: the same draws in `{compared['command']}` (macro-F1 with rotations and flips, "
        "as `wbcid adapt`'s models predict). Zero-shot: the base model's own head on every cell of the lab as "
        "given, from this run's features (marked where it differs from a K = 0 row of that run: another base model).",
        "",
        "Macro-F1 on each lab's remaining cells, mean over the draws (worst draw):",
        "",
        "| lab | K | zero-shot | prototypes | linear probe | fine-tuned (wbcid adapt) | draws |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    groups: dict[tuple, list[dict]] = {}
    for row in result["rows"]:
        groups.setdefault((row["lab"], row["k"]), []).append(row)
    for (lab, k), rows in groups.items():
        cells = [_mean_worst([r[head] for r in rows]) for head in HEADS]
        paired = [tuned.get((lab, k, r["draw"])) for r in rows]
        cells.append(_mean_worst(paired) if None not in paired else "-")
        zero, reference = rows[0]["zero_shot"], tuned.get((lab, 0, 0))  # --compare may have no K = 0 row
        zero = f"{zero:.3f}" + ("" if reference is None or abs(zero - reference) < 1e-9 else " (differs)")
        lines.append(f"| {lab} | {k} | {zero} | {' | '.join(cells)} | {len(rows)} |")
    return "\n".join(lines)


def _mean_worst(values: list[float]) -> str:
    return f"{np.mean(values):.3f} ({min(values):.3f})"


if __name__ == "__main__":
    main()
