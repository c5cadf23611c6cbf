"""Few-shot lab adaptation: the label-efficiency curve (macro-F1 against verified cells per class).

    python benchmarks/adaptation.py --model runs/pbc --name groups2 [--trainable-groups 2] [--ks 0 1 2 5 10 20]
        [--draws 5] [--labs lisc tecom cellavision bccd] [--unlabelled] [--replay pbc|recorded] [--twins-together]
        [--data ../shared/data]
    python benchmarks/adaptation.py --report        # docs/adaptation.md and .png from every result

The model must never have seen the target labs: the PBC-only default model
(``wbcid train --data ../shared/data/cells.csv --source pbc --out runs/pbc``). For each lab and K,
``--draws`` random draws of K verified cells per class (``wbcid.splits.draw_per_class``: at most half
of a class, groups kept whole) adapt the model (``wbcid.adaptation.adapt_model``, the function
``wbcid adapt`` calls), which is then scored on the lab's *remaining* cells (macro-F1 over the
classes present, share flagged), on PBC's test split (forgetting) and on the OOD task (AUROC of
``ood_score``, PBC's non-WBC cells vs PBC test). Adaptation replays PBC's training cells
(``--replay recorded``: those the base model recorded, for a base trained on several labs;
``--no-replay``: none). K = 0 is the model as it is. ``--unlabelled`` adds rows where the lab's
remaining cells, unlabelled, add pseudo-labels (transductive: they are also the cells scored),
and a K = 0 row with AdaBN (``--adabn``). Writes ``docs/adaptation/NAME.json``.
"""

from __future__ import annotations

import json
import logging
import time
import typing
from dataclasses import asdict, replace
from pathlib import Path

import matplotlib
import numpy as np
import torch
from common import parser, setup, write_results
from sklearn.metrics import roc_auc_score
from torch import nn

from wbcid.adaptation import (
    AdaptConfig,
    adapt_model,
    decode_replay,
    make_replay,
    prefix_views,
    stage_taps,
    suffix_scores,
)
from wbcid.benchmark import OTHER_SOURCES
from wbcid.data import CLASSES, CellSet, file_identity, read_cells
from wbcid.decoding import load_images
from wbcid.evaluation import compute_metrics
from wbcid.inference import predict_scores
from wbcid.loading import resolve_model
from wbcid.preprocess import Preprocess
from wbcid.splits import draw_per_class
from wbcid.testtime import adapt_batchnorm

OUT = Path("docs/adaptation")
ANCHOR = (
    "Chossegros et al., J. Pathol. Inform. 2024: EfficientNet fine-tuned on <= 100 labelled images per "
    "target dataset, > 80 % accuracy on each of 8 targets, > 90 % on more than half"
)


def main() -> None:
    options = parser(__doc__)
    options.add_argument("--model", type=Path)
    options.add_argument("--name", default="default")
    options.add_argument("--labs", nargs="+", default=list(OTHER_SOURCES))
    options.add_argument("--ks", nargs="+", type=int, default=[0, 1, 2, 5, 10, 20])
    options.add_argument("--draws", type=int, default=5)
    options.add_argument(
        "--trainable-groups",
        type=int,
        nargs="+",
        default=[AdaptConfig.trainable_groups],
        help="one result file per value (NAME-gN when several)",
    )
    options.add_argument("--steps", type=int, default=AdaptConfig.steps)
    options.add_argument(
        "--set", nargs="+", default=[], metavar="FIELD=VALUE", help="any other AdaptConfig field, e.g. lr=0.003"
    )
    options.add_argument("--no-replay", action="store_true")
    options.add_argument(
        "--replay",
        choices=["pbc", "recorded"],
        default="pbc",
        help="replay PBC's training cells, or the training data the base model recorded (as wbcid adapt does)",
    )
    options.add_argument("--no-cross-fit", action="store_true", help="calibrate flags on the verified cells' views")
    options.add_argument("--unlabelled", action="store_true")
    options.add_argument(
        "--twins-together",
        action="store_true",
        help="byte-identical images share a group, so no draw verifies one and scores its twin (lisc lists 24 such "
        "pairs as separate cells)",
    )
    options.add_argument("--report", action="store_true", help="only write docs/adaptation.md from the results")
    args = options.parse_args()
    command = setup(logging.WARNING)
    if args.report:
        write_report()
        return
    torch.set_num_threads(2)
    base = resolve_model(args.model, needs_torch="adaptation")
    prep = Preprocess.of(base.config)
    cells = read_cells(args.data / "cells.csv", known_only=False)

    def decode(cellset):  # unreadable images are dropped with their labels
        return load_images(cellset, prep, "decoding")

    pbc = cells.select(["pbc"]).known()
    test_images, test_cells = decode(pbc.select(splits=["test"]))
    replay = None
    if not args.no_replay:
        replay, origin = decode_replay(base, None if args.replay == "recorded" else pbc, prep, AdaptConfig())
        if replay is None:
            raise SystemExit(f"{args.model}: recorded no training data that exists here; use --replay pbc")
        print(f"replay: {origin}, {len(replay['labels'])} cells", flush=True)
    data = {
        "test": (test_images, test_cells.labels),
        "other": decode(cells.select(["pbc_other"]))[0],
        "replay": replay,  # make_replay's arguments; None: --no-replay
    }
    twins = twins_together if args.twins_together else lambda cellset: cellset
    labs = {lab: decode(twins(cells.select([lab]).known())) for lab in args.labs}
    for groups in args.trainable_groups:
        config = AdaptConfig(
            trainable_groups=groups, steps=args.steps, cross_fit=not args.no_cross_fit, **_overrides(args.set)
        )
        rows = run_curve(base, config, data, labs, args)
        name = args.name if len(args.trainable_groups) == 1 else f"{args.name}-g{groups}"
        result = {
            "command": command,
            "model": str(args.model),
            "config": asdict(config),
            "replay": False if args.no_replay else args.replay,
            "rows": rows,
        }
        write_results(OUT / name, result)


def twins_together(cells: CellSet) -> CellSet:
    """``cells`` with byte-identical images in one group (the first one's): a verified cell's twin
    among the scored ones would be scored on a picture the model was taught."""
    first: dict[object, str] = {}
    together = [replace(c, group=first.setdefault(file_identity(c.path), c.group or str(c.path))) for c in cells.cells]
    if moved := sum(a.group != b.group for a, b in zip(cells.cells, together)):
        print(f"{cells.origin}: {moved} image(s) grouped with a byte-identical twin", flush=True)
    return CellSet(together, cells.skipped, cells.origin)


def _overrides(pairs: list[str]) -> dict:
    """``FIELD=VALUE`` pairs as AdaptConfig keyword arguments, each value of its field's type."""
    types = typing.get_type_hints(AdaptConfig)
    out = {}
    for pair in pairs:
        field, _, value = pair.partition("=")
        if field not in types or not value:
            raise SystemExit(f"--set {pair!r}: expected FIELD=VALUE with FIELD one of {', '.join(types)}")
        kind = next(t for t in typing.get_args(types[field]) or [types[field]] if t is not type(None))
        out[field] = value.lower() in ("1", "true", "yes") if kind is bool else kind(value)
    return out


def run_curve(base, config: AdaptConfig, data: dict, labs: dict, args) -> list[dict]:
    """Every (lab, K, draw[, unlabelled]) adaptation of ``base`` with ``config``, scored; one row each."""
    replay = None if data["replay"] is None else make_replay(base, config=config, **data["replay"])
    prefix, _ = base.split(config.trainable_groups)
    taps = stage_taps(base, config.trainable_groups) if replay is not None else ()  # what the adapted scorer reads
    cached_test = prefix_views(prefix, data["test"][0], 1, taps=taps)
    cached_other = prefix_views(prefix, data["other"], 1, taps=taps)
    rows = []
    for lab, (lab_images, lab_cells) in labs.items():
        cached_lab = prefix_views(prefix, lab_images, 1, taps=taps)
        for k in args.ks:
            for draw in range(args.draws if k else 1):
                picked, rest = draw_per_class(lab_cells, k, seed=draw)
                for unlabelled in [False, True] if args.unlabelled else [False]:
                    if k == 0 and not unlabelled:
                        model, seconds = base, 0.0
                    else:
                        started = time.perf_counter()
                        model = adapt_model(
                            base,
                            lab_images[picked],
                            lab_cells.labels[picked],
                            config,
                            replay,
                            lab_images[rest] if unlabelled else None,
                        )
                        seconds = time.perf_counter() - started
                    if unlabelled:  # AdaBN changed the prefix: the cached outputs do not hold for this model
                        inputs = [lab_images[rest], data["test"][0], data["other"]]
                        model_suffix = nn.Identity()
                    else:
                        inputs = [(cached_lab[0][rest], [x[rest] for x in cached_lab[1]]), cached_test, cached_other]
                        model_suffix = model.split(config.trainable_groups)[1]
                    row = {
                        "lab": lab,
                        "k": k,
                        "draw": draw,
                        "unlabelled": unlabelled,
                        "seconds": round(seconds, 2),
                        "verified": int(len(picked)),
                        "scored": int(len(rest)),
                        **_score(
                            model,
                            model_suffix,
                            inputs[0],
                            lab_cells.labels[rest],
                            inputs[1],
                            data["test"][1],
                            inputs[2],
                            full=unlabelled,
                        ),
                    }
                    rows.append(_with_tta(row, model, lab_images[rest], lab_cells.labels[rest]))
                    print(json.dumps(row), flush=True)
        if args.unlabelled:  # zero-shot AdaBN (test-time adaptation on the lab's images), for comparison
            adabn = adapt_batchnorm(base, lab_images)
            logits, ood = map(torch.from_numpy, predict_scores(adabn, lab_images.split(128)))
            rows.append(
                {
                    "lab": lab,
                    "k": 0,
                    "draw": 0,
                    "unlabelled": "adabn",
                    "seconds": 0.0,
                    "verified": 0,
                    "scored": len(lab_images),
                    **_lab_metrics(lab_cells.labels, logits),
                    "flagged": float((ood > 1).float().mean()),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    return rows


def _score(model, suffix, lab, lab_labels, test, test_labels, other, full: bool = False) -> dict:
    """Scores from cached ``(prefix outputs, tapped outputs)``, or (``full``) from uint8 images
    through the whole model."""
    if full:

        def run(x):
            return tuple(map(torch.from_numpy, predict_scores(model, x.split(128))))
    else:

        def run(x):
            return suffix_scores(model, suffix, *x)

    logits, ood = run(lab)
    test_logits, test_ood = run(test)
    _, other_ood = run(other)
    auroc = roc_auc_score(np.r_[np.zeros(len(test_ood)), np.ones(len(other_ood))], np.r_[test_ood, other_ood])
    return {
        **_lab_metrics(lab_labels, logits),
        "flagged": float((ood > 1).float().mean()),
        "pbc_macro_f1": compute_metrics(test_labels, test_logits.argmax(1).numpy())["macro_f1"],
        "pbc_flagged": float((test_ood > 1).float().mean()),
        "ood_auroc": float(auroc),
        "non_wbc_flagged": float((other_ood > 1).float().mean()),  # PBC's platelets, erythroblasts, IGs
    }


def _with_tta(row: dict, model, images: torch.Tensor, labels: np.ndarray) -> dict:
    """``row`` with the lab's scores as a user of ``model`` gets them where it predicts over rotations
    and flips (adapted models do by default); the single-view scores move to ``row["plain"]``.
    PBC's scores stay single-view (computed from cached prefix outputs)."""
    if model.config.tta:
        row["plain"] = {k: row[k] for k in ("macro_f1", "accuracy", "f1", "confusion_matrix")}
        row.update(_lab_metrics(labels, torch.from_numpy(predict_scores(model, images.split(128))[0])))
    return row


def _lab_metrics(labels: np.ndarray, logits: torch.Tensor) -> dict:
    metrics = compute_metrics(labels, logits.argmax(1).numpy())
    per_class = {name: scores["f1"] for name, scores in metrics["per_class"].items() if scores["f1"] is not None}
    return {
        "macro_f1": metrics["macro_f1"],
        "accuracy": metrics["accuracy"],
        "f1": per_class,
        "confusion_matrix": metrics["confusion_matrix"],
    }


def write_report() -> None:
    """docs/adaptation.md: one table per result file (mean and worst draw per lab and K) and the plot."""
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = [
        "# Few-shot lab adaptation: the label-efficiency curve",
        "",
        __doc__.split("\n\n", 2)[2].strip(),
        "",
        f"Anchor: {ANCHOR}.",
        "",
    ]
    findings = OUT / "findings.md"  # written by hand from the tables below
    if findings.is_file():
        lines += [findings.read_text().strip(), ""]
    for path in sorted(OUT.glob("*.json"), key=lambda p: (p.stem.startswith("pilot"), p.stem)):
        result = json.loads(path.read_text())
        lines += [
            f"## {path.stem}",
            "",
            f"`{result['command']}`",
            "",
            f"Settings: `{json.dumps(result['config'])}`, replay {result['replay']}.",
            "",
            "| lab | K | unlabelled | macro-F1 mean | worst | single-view macro-F1 mean | accuracy mean "
            "| flagged mean | PBC macro-F1 worst | OOD AUROC worst | non-WBCs flagged mean | verified cells | draws "
            "| seconds per adaptation |",
            "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        groups: dict[tuple, list[dict]] = {}
        for row in result["rows"]:
            groups.setdefault((row["lab"], row["k"], str(row["unlabelled"])), []).append(row)
        for (lab, k, unl), rows in groups.items():
            f1 = [r["macro_f1"] for r in rows]
            single = [r.get("plain", r)["macro_f1"] for r in rows]  # rows without TTA are single-view
            accuracy = [r["accuracy"] for r in rows if "accuracy" in r]
            pbc = [r["pbc_macro_f1"] for r in rows if "pbc_macro_f1" in r]
            auroc = [r["ood_auroc"] for r in rows if "ood_auroc" in r]
            other = [r["non_wbc_flagged"] for r in rows if "non_wbc_flagged" in r]
            nan = float("nan")
            lines.append(
                f"| {lab} | {k} | {unl} | {np.mean(f1):.3f} | {min(f1):.3f} | {np.mean(single):.3f} | "
                f"{np.mean(accuracy) if accuracy else nan:.3f} | {np.mean([r['flagged'] for r in rows]):.1%} | "
                f"{min(pbc) if pbc else nan:.3f} | {min(auroc) if auroc else nan:.3f} | {np.mean(other) if other else nan:.1%} | "
                f"{np.mean([r['verified'] for r in rows]):.0f} | {len(rows)} | "
                f"{_span([r['seconds'] for r in rows if r['seconds']])} |"  # K = 0 rows adapt nothing
            )
        lines += ["", *_per_class_table(groups)]
        _plot(result["rows"], OUT / f"{path.stem}.png", plt)
        lines += [f"![{path.stem}](adaptation/{path.stem}.png)", ""]
    Path("docs/adaptation.md").write_text("\n".join(lines) + "\n")


def _span(values: list[float]) -> str:
    """``lo-hi`` in whole numbers, one number where they round alike, ``-`` for none."""
    if not values:
        return "-"
    lo, hi = f"{min(values):.0f}", f"{max(values):.0f}"
    return lo if lo == hi else f"{lo}-{hi}"


def _per_class_table(groups: dict[tuple, list[dict]]) -> list[str]:
    """Mean F1 of each class over the draws (rows that recorded it): which types the macro-F1 loses."""
    recorded = {key: rows for key, rows in groups.items() if all("f1" in r for r in rows)}
    if not recorded:
        return []
    lines = [
        "F1 per class (mean over the draws; `-`: the class is not among the lab's scored cells):",
        "",
        f"| lab | K | unlabelled | {' | '.join(CLASSES)} | scored cells per class (draw 0) |",
        f"|---|---:|---|{'---:|' * len(CLASSES)}---|",
    ]
    for (lab, k, unl), rows in recorded.items():
        cells = [np.mean([r["f1"][c] for r in rows]) if c in rows[0]["f1"] else None for c in CLASSES]
        support = np.sum(rows[0]["confusion_matrix"], axis=1).tolist()
        lines.append(
            f"| {lab} | {k} | {unl} | "
            + " | ".join("-" if v is None else f"{v:.3f}" for v in cells)
            + f" | {'/'.join(map(str, support))} |"
        )
    return [*lines, ""]


def _plot(rows: list[dict], path: Path, plt) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    for lab in dict.fromkeys(r["lab"] for r in rows):
        ks = sorted({r["k"] for r in rows if r["lab"] == lab and r["unlabelled"] is False})
        means = [
            np.mean([r["macro_f1"] for r in rows if r["lab"] == lab and r["k"] == k and r["unlabelled"] is False])
            for k in ks
        ]
        ax.plot(ks, means, marker="o", label=lab)
    ax.axhline(0.9, color="grey", linestyle=":", linewidth=1)
    ax.set(xlabel="verified cells per class (K)", ylabel="macro-F1 on the lab's other cells", ylim=(0, 1))
    ax.set_xscale("symlog", linthresh=1)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
