"""Why adaptation lowers the OOD AUROC, and whether scoring several layers keeps it.

    python benchmarks/ood_layers.py --model runs/pbc [--labs lisc tecom cellavision bccd] [--draws 3] [--k 10]

The OOD task is the one of docs/adaptation.md: PBC's non-WBC cells (pbc_other) against PBC's test
split, scored by ``ood_score``. For the base model and for models adapted to each lab (K verified
cells per class, ``wbcid.adaptation.adapt_model`` with its default settings but ``cross_fit=False``:
cross-fitting moves only the threshold, so the AUROC is the same), it compares:

- ``replay``: the adapted model's penultimate scorer (refitted by ``wbcid.adaptation.refit_ood`` on the replay
  cells: 100 per class, 2 views, weighted back to the training cells' class mix);
- ``replay_even``: the same with the replay's classes counted evenly, as they are drawn (what
  adapted models did before the weighting);
- ``all_train``: the same features, the scorer fitted on *all* PBC training cells through the
  adapted model (what the refit would give with unlimited replay; PBC clusters only);
- ``train400``: likewise on 400 training cells per class, one view each (a larger replay for the
  refit alone);
- ``shipped``: the score adapted models ship now (``LayeredScore``: ``replay`` averaged with the
  two frozen stages, their scorers started from the statistics the base model recorded of all its
  training cells; fitted on the replay where it recorded none);
- ``base_net``: the *base* model's penultimate scorer (fitted on all training cells) on the base
  model's features, with the lab's verified views added as clusters (``with_lab_clusters``):
  flags from the unadapted network, which an adapted model would have to run beside its own
  last layer groups;
- ``+stage4``, ``+stage5``: the mean of a penultimate score and Mahalanobis scores (each over its
  own 95 % threshold) on the pooled mean and standard deviation of earlier stages' outputs (Lee
  et al., NeurIPS 2018, feature ensemble, here unweighted: no OOD data is used). Those stages are
  in the frozen prefix, so their PBC statistics hold exactly after adaptation; the lab's verified
  cells' views are added as clusters and their scatter averaged into the covariance, as
  ``wbcid.adaptation.refit_ood`` does for the penultimate layer. For the base model ``shipped``, ``replay``,
  ``all_train``, ``train400`` and ``base_net`` are the same score: its own.

Writes docs/ood_layers.json and docs/ood_layers.md.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from common import parser, setup, write_results
from sklearn.metrics import roc_auc_score

from wbcid.adaptation import AdaptConfig, adapt_model, class_shares, make_replay, prefix_views, with_lab_clusters
from wbcid.augment import train_augmentation
from wbcid.data import read_cells
from wbcid.decoding import load_images
from wbcid.loading import resolve_model
from wbcid.ood import MahalanobisScore, class_statistics
from wbcid.preprocess import Preprocess
from wbcid.splits import draw_per_class, sample_per_class

OUT = Path("docs/ood_layers")
TAPS = {"stage4": 4, "stage5": 5}  # layer groups of WBCNet.split (stem = 0) whose pooled outputs are scored
COMBOS = [
    ["shipped"],
    ["replay"],
    ["all_train"],
    ["train400"],
    ["replay", "stage5"],
    ["replay_even"],
    ["replay", "stage4", "stage5"],
    ["replay_even", "stage4", "stage5"],
    ["all_train", "stage4", "stage5"],
    ["train400", "stage4", "stage5"],
    ["base_net"],
    ["base_net", "stage4", "stage5"],
]


def layer_outputs(model, images: torch.Tensor, views: int = 1, seed: int = 0) -> dict[str, torch.Tensor]:
    """Pooled (mean, std) outputs of the tapped units, and the prefix output, of ``views`` views each."""
    torch.manual_seed(seed)
    prefix, _ = model.split(AdaptConfig.trainable_groups)
    acts, tapped = prefix_views(prefix, images, views, train_augmentation(AdaptConfig.augment), tuple(TAPS.values()))
    return dict(zip(TAPS, tapped)) | {"prefix": acts}


@torch.no_grad()
def features(suffix: torch.nn.Module, acts: torch.Tensor) -> torch.Tensor:
    """Penultimate features of cached prefix outputs."""
    return torch.cat([suffix(batch) for batch in acts.split(256)])


def auroc(test: torch.Tensor, other: torch.Tensor) -> float:
    return float(roc_auc_score(np.r_[np.zeros(len(test)), np.ones(len(other))], np.r_[test.numpy(), other.numpy()]))


def combos(scores: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
    return {
        "+".join(keys): auroc(*(torch.stack([scores[k][i] for k in keys]).mean(0) for i in (0, 1))) for keys in COMBOS
    }


def main() -> None:
    options = parser(__doc__)
    options.add_argument("--model", type=Path, required=True)
    options.add_argument("--labs", nargs="+", default=["lisc", "tecom", "cellavision", "bccd"])
    options.add_argument("--draws", type=int, default=3)
    options.add_argument("--k", type=int, default=10)
    args = options.parse_args()
    command = setup(logging.WARNING)
    torch.set_num_threads(2)
    base = resolve_model(args.model, needs_torch="OOD layers").eval()
    prep = Preprocess.of(base.config)
    cells = read_cells(args.data / "cells.csv", known_only=False)
    pbc = cells.select(["pbc"]).known()
    decoded = {
        "train": load_images(pbc.select(splits=["train"]), prep, "train"),
        "val": load_images(pbc.select(splits=["val"]), prep, "val"),
        "test": load_images(pbc.select(splits=["test"]), prep, "test"),
        "other": load_images(cells.select(["pbc_other"]), prep, "other"),
    }
    layers = {name: layer_outputs(base, images) for name, (images, _) in decoded.items()}
    train_labels = np.asarray(decoded["train"][1].labels)
    rng = np.random.default_rng(0)
    subset = np.concatenate([rng.permutation(np.flatnonzero(train_labels == c))[:400] for c in np.unique(train_labels)])
    taps = {name: MahalanobisScore.fit(layers["train"][name], train_labels, layers["val"][name]) for name in TAPS}
    suffix = base.split(AdaptConfig.trainable_groups)[1]
    base_features = {s: features(suffix, layers[s]["prefix"]) for s in ("val", "test", "other")}
    penultimate = tuple(base.ood(base_features[s]) for s in ("test", "other"))
    # the base scorer saw all training cells; the base model has no layered score of its own
    base_scores = dict.fromkeys(["shipped", "replay", "replay_even", "all_train", "train400", "base_net"], penultimate)
    base_scores |= {name: tuple(taps[name](layers[s][name]) for s in ("test", "other")) for name in TAPS}
    result = {
        "command": command,
        "model": str(args.model),
        "base": {name: auroc(*base_scores[name]) for name in TAPS} | combos(base_scores),
        "rows": [],
    }
    print(result["base"], flush=True)
    replay_images, replay_cells = load_images(sample_per_class(pbc.select(splits=["train"]), 100), prep, "replay")
    calibration = load_images(sample_per_class(pbc.select(splits=["val"]), 100), prep, "calibration")[0]
    config = AdaptConfig(cross_fit=False)
    replay = make_replay(base, replay_images, replay_cells.labels, calibration, config, class_shares(train_labels))
    for lab in args.labs:
        lab_images, lab_cells = load_images(cells.select([lab]).known(), prep, lab)
        for draw in range(args.draws):
            picked, _ = draw_per_class(lab_cells, args.k, seed=draw)
            model = adapt_model(base, lab_images[picked], lab_cells.labels[picked], config, replay)
            adapted_suffix = model.split(config.trainable_groups)[1]
            adapted = {s: features(adapted_suffix, layers[s]["prefix"]) for s in ("train", "val", "test", "other")}
            full = MahalanobisScore.fit(adapted["train"], train_labels, adapted["val"])
            larger = MahalanobisScore.fit(adapted["train"][subset], train_labels[subset], adapted["val"])
            assert model.ood.taps == tuple(TAPS.values())
            scores = {
                "shipped": tuple(model.ood(adapted[s], [layers[s][t] for t in TAPS]) for s in ("test", "other")),
                "replay": tuple(model.ood.penultimate(adapted[s]) for s in ("test", "other")),
                "all_train": tuple(full(adapted[s]) for s in ("test", "other")),
                "train400": tuple(larger(adapted[s]) for s in ("test", "other")),
            }
            views = layer_outputs(base, lab_images[picked], config.views, config.seed)
            view_labels = np.tile(lab_cells.labels[picked], config.views)
            even = with_lab_clusters(
                *class_statistics(features(adapted_suffix, replay.acts), replay.labels.numpy()),
                features(adapted_suffix, views["prefix"]),
                view_labels,
                features(adapted_suffix, replay.calibration),
            )
            scores["replay_even"] = tuple(even(adapted[s]) for s in ("test", "other"))
            base_net = with_lab_clusters(
                base.ood.means.double().numpy(),
                base.ood.covariance(),
                features(suffix, views["prefix"]),
                view_labels,
                base_features["val"],
            )
            scores["base_net"] = tuple(base_net(base_features[s]) for s in ("test", "other"))
            for name in TAPS:
                scorer = taps[name]
                refit = with_lab_clusters(
                    scorer.means.double().numpy(), scorer.covariance(), views[name], view_labels, layers["val"][name]
                )
                scores[name] = tuple(refit(layers[s][name]) for s in ("test", "other"))
            row = {
                "lab": lab,
                "draw": draw,
                "verified": len(picked),
                **combos(scores),
            }
            result["rows"].append(row)
            print(row, flush=True)
    write_results(OUT, result, _markdown(result))


def _markdown(result: dict) -> str:
    rows = result["rows"]
    keys = [k for k in rows[0] if k not in ("lab", "draw", "verified")]
    lines = [
        "# OOD AUROC after adaptation: the replay refit, and several layers",
        "",
        f"Command: `{result['command']}`. PBC's non-WBC cells against PBC test; see the script's docstring.",
        "",
        "Base model: " + ", ".join(f"{k} {v:.4f}" for k, v in result["base"].items()) + ".",
        "",
        "| lab | draw | verified | " + " | ".join(keys) + " |",
        "|---|---:|---:|" + "---:|" * len(keys),
    ]
    lines += [
        f"| {r['lab']} | {r['draw']} | {r['verified']} | " + " | ".join(f"{r[k]:.4f}" for k in keys) + " |"
        for r in rows
    ]
    lines += ["", "| mean | | | " + " | ".join(f"{np.mean([r[k] for r in rows]):.4f}" for k in keys) + " |"]
    lines += ["| worst | | | " + " | ".join(f"{np.min([r[k] for r in rows]):.4f}" for k in keys) + " |"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
