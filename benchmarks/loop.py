"""The lab's loop end to end on BCCD's smear fields: count, review, adapt, count again.

    python benchmarks/loop.py [--model runs/pbc] [--budgets 10 25 50 100] [--seeds 0 1 2]
    python benchmarks/loop.py --report [--out docs/loop]   # OUT.md again from OUT.json, nothing rerun

BCCD's 364 fields are split at random (one split per ``--seeds``) into two halves: two slides of
one lab. The first is counted with ``--model`` (default ``runs/pbc``: trained on PBC only, it never
saw BCCD) and opened in the review store (:class:`wbcid.web.ReviewStore`, what ``wbcid review``
serves). A simulated technologist works down the store's queue (flagged first, then least
confident; ``--order random``: in a random order instead; ``--order balanced``: the groups by type
in turn, the first cell of each type the model called, then the second of each, and so on;
``--order by-type``: group after group, all the cells the model called a neutrophil first, as the
review page's "by type" view walks them) and verifies each cell whose type is known here, a field where BCCD lists one WBC and
the count found one, with BCCD's label; cells of other fields are passed over (their types are not
known here). After ``--budgets`` verified cells (cumulative: 10, then 15 more to 25, and so on)
the review is exported (what ``wbcid review --export`` writes) and the model adapted with
``wbcid adapt``'s defaults; then the second half is counted with the adapted model, and once with
the model before.

Scored on the second half: the fields where BCCD lists one WBC and the count found one (the only
cells whose type is known): accuracy and macro-F1 (over the types present) of every such cell's
label, flagged ones included; the share flagged, split into the cells on the field's edge (flagged
by design: part of the cell is cut off) and the share of the others that the OOD score flags; the
accuracy of the unflagged; and the differential of all counted (unflagged) cells against the one
BCCD lists for those fields, as the total variation distance (half the sum of the absolute
differences of the five percentages: the share of the count that sits in the wrong type). Writes
``docs/loop.json`` and ``docs/loop.md``; its scratch runs go to ``runs/loop``. Run it with nothing
else running (it times each adaptation).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from collections import Counter
from collections.abc import Callable
from itertools import zip_longest
from pathlib import Path

import numpy as np
from common import parser, setup, write_results
from count_smears import listed_types
from sklearn.metrics import f1_score

from wbcid.adaptation import adapt
from wbcid.data import CLASSES
from wbcid.smear.counting import count
from wbcid.smear.differential import differential
from wbcid.web import ReviewStore, export_review


def main() -> None:
    options = parser(__doc__)
    options.add_argument("--model", type=Path, default=Path("runs/pbc"), help="the lab's starting model")
    options.add_argument("--budgets", type=int, nargs="+", default=[10, 25, 50, 100], help="verified cells, cumulative")
    options.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one split of the fields each")
    options.add_argument(
        "--order",
        choices=["queue", "random", "balanced", "by-type"],
        default="queue",
        help="which cells the technologist verifies first",
    )
    args = with_outputs(options, "loop").parse_args()
    if rendered_again(args, report):
        return
    command = setup()
    types, fields = bccd_fields(args)
    rows = []
    for seed in args.seeds:
        first, second = halves(fields, seed)
        work = args.work / f"seed{seed}"
        count(args.model, first, work / "first")
        before = score(count(args.model, second, work / "second-before"), types)
        store = ReviewStore.open(work / "first")
        queue = store.cells()  # the page's order: flagged first, then least confident
        if args.order == "random":
            queue = [queue[i] for i in np.random.default_rng(seed).permutation(len(queue))]
        elif args.order == "balanced":
            queue = balanced(queue)
        elif args.order == "by-type":
            queue = [cell for group in by_type(queue) for cell in group]
        for budget in sorted(args.budgets):
            verified = review(store, queue, types, budget)
            exported = export_review(store, work / f"verified-{budget}")
            began = time.perf_counter()
            run = adapt(exported / "manifest.csv", work / f"adapted-{budget}", args.model)
            seconds = time.perf_counter() - began
            after = score(count(run, second, work / f"second-{budget}"), types)
            rows.append(
                {"seed": seed, "budget": budget, "verified": verified, "adapt_seconds": seconds}
                | {"before": before, "after": after}
            )
            print(json.dumps(rows[-1]))
    result = {"command": command, "model": str(args.model), "order": args.order, "fields": len(fields), "rows": rows}
    text = report(result)
    write_results(args.out, result, text)
    print(text)


def with_outputs(options: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    """``--work`` (scratch runs), ``--out`` (the docs page) and ``--report`` of a loop benchmark."""
    options.add_argument("--work", type=Path, default=Path("runs") / name.replace("_", "-"))
    options.add_argument("--out", type=Path, default=Path("docs") / name)
    options.add_argument("--report", action="store_true", help="only write OUT.md from OUT.json")
    return options


def rendered_again(args: argparse.Namespace, report: Callable[[dict], str]) -> bool:
    """With ``--report``, write the page again from its JSON (nothing rerun); says whether it did."""
    if args.report:
        result = json.loads(args.out.with_suffix(".json").read_text())
        write_results(args.out, result, report(result))
    return args.report


def bccd_fields(args: argparse.Namespace) -> tuple[dict[str, list[str]], list[Path]]:
    """BCCD's listed WBC types per field and its fields; clears ``--work`` (the benchmark's own
    scratch runs, made again)."""
    smears = args.data / "smears" / "bccd"
    shutil.rmtree(args.work, ignore_errors=True)
    return listed_types(smears), sorted((smears / "images").glob("*.jpg"))


def halves(fields: list[Path], seed: int) -> tuple[list[Path], list[Path]]:
    """The fields split at random in two halves (two slides of one lab), each in file order."""
    order = np.random.default_rng(seed).permutation(len(fields))
    first, second = ([fields[i] for i in sorted(half)] for half in np.array_split(order, 2))
    return first, second


def by_type(queue: list[dict]) -> list[list[dict]]:
    """The queue in groups, one per type the model called (the five, then "other"), each in the queue's order."""
    return [[cell for cell in queue if cell["label"] == name] for name in (*CLASSES, "other")]


def balanced(queue: list[dict]) -> list[dict]:
    """The groups of :func:`by_type` taken in turn: each group's first cell, then each one's second, ..."""
    return [cell for tier in zip_longest(*by_type(queue)) for cell in tier if cell is not None]


def review(store: ReviewStore, queue: list[dict], types: dict[str, list[str]], budget: int) -> dict[str, int]:
    """Verify cells in ``queue``'s order, where the type is known, until ``budget`` are verified;
    returns how many of each type are."""
    per_field = Counter(cell["image"] for cell in queue)
    reviewed = {cell["id"] for cell in store.cells() if cell["reviewed"]}
    done = len(reviewed)
    for cell in queue:
        listed = types.get(Path(cell["image"]).stem, [])
        if done >= budget:
            break
        if cell["id"] not in reviewed and len(listed) == 1 and per_field[cell["image"]] == 1:
            store.set_label(cell["id"], listed[0], reviewer="simulated")
            done += 1
    verified = Counter(cell["label"] for cell in store.cells() if cell["reviewed"])
    return {name: verified[name] for name in CLASSES}


def score(result: dict, types: dict[str, list[str]]) -> dict:
    """The count ``result`` against BCCD's listed types (see the module's docstring)."""
    truth, label, flagged, edge = [], [], [], []
    for entry in result["images"]:
        listed = types.get(Path(entry["path"]).stem, [])
        if len(listed) == 1 and len(entry["detections"]) == 1:
            detection = entry["detections"][0]
            truth.append(listed[0])
            label.append(detection["label"])
            flagged.append(detection["flagged"])
            edge.append(detection["edge"])
    truth, label = np.array(truth), np.array(label)
    flagged, edge = np.array(flagged, bool), np.array(edge, bool)
    listed_all = differential([t for e in result["images"] for t in types.get(Path(e["path"]).stem, [])])
    counted = result["totals"]
    distance = (
        0.5 * sum(abs(counted["classes"][c]["percent"] - listed_all["classes"][c]["percent"]) for c in CLASSES)
        if counted["counted"]
        else None  # nothing counted (JSON has no NaN)
    )
    return {
        "known_cells": len(truth),
        "known_per_type": {c: int((truth == c).sum()) for c in CLASSES},
        "accuracy": float((label == truth).mean()),
        "macro_f1": float(f1_score(truth, label, labels=sorted(set(truth)), average="macro")),
        "flagged": float(flagged.mean()),
        "on_edge": float(edge.mean()),  # flagged by design: part of the cell is outside the field
        "flagged_inside": float(flagged[~edge].mean()),  # flagged as unlike the cells the model knows
        "accuracy_unflagged": float((label == truth)[~flagged].mean()) if (~flagged).any() else None,
        "detected": counted["detected"],
        "counted": counted["counted"],
        "differential_distance": None if distance is None else distance / 100,
    }


def report(r: dict) -> str:
    keys = (
        "accuracy",
        "macro_f1",
        "flagged",
        "on_edge",
        "flagged_inside",
        "accuracy_unflagged",
        "differential_distance",
    )
    head = "| split | verified | per type (N/L/M/E/B) | adapt, s | " + " | ".join(keys) + " |"
    rule = "|---:|---:|---|---:|" + "---:|" * len(keys)

    def cells(s: dict) -> str:
        return " | ".join("-" if s[k] is None else f"{s[k]:.3f}" for k in keys)

    first: dict[int, dict] = {}  # each split's first row, which holds its "before"
    for row in r["rows"]:
        first.setdefault(row["seed"], row)
    lines = [head, rule]
    for seed, opening in first.items():
        lines.append(f"| {seed} | 0 (before) | - | - | {cells(opening['before'])} |")
        for row in (row for row in r["rows"] if row["seed"] == seed):
            per_type = "/".join(str(row["verified"][c]) for c in CLASSES)
            lines.append(
                f"| {seed} | {row['budget']} | {per_type} | {row['adapt_seconds']:.0f} | {cells(row['after'])} |"
            )
    means = ["", "Mean over the splits:", "", "| verified | " + " | ".join(keys) + " |", "|---:|" + "---:|" * len(keys)]
    budgets = [("0 (before)", [row["before"] for row in first.values()])]
    budgets += [
        (str(b), [row["after"] for row in r["rows"] if row["budget"] == b])
        for b in sorted({row["budget"] for row in r["rows"]})
    ]
    for name, scores in budgets:
        mean = {k: np.mean(got) if (got := [s[k] for s in scores if s[k] is not None]) else None for k in keys}
        means.append(f"| {name} | {cells(mean)} |")
    known = "; ".join(
        f"split {seed}: {'/'.join(str(row['before']['known_per_type'][c]) for c in CLASSES)}"
        for seed, row in first.items()
    )
    order = {
        "queue": "the review queue's",
        "random": "a random",
        "balanced": "a class-balanced",
        "by-type": "the by-type (group after group)",
    }[r["order"]]
    return f"""# The lab's loop on BCCD: count, review, adapt, count again

Command: `{r["command"]}` (model {r["model"]}; {r["fields"]} fields, split in two halves per split
seed; cells verified in {order} order; nothing else ran). What each column is: the script's
docstring. The second half's cells of known type (a field with one listed WBC and one detection),
per type (N/L/M/E/B): {known}.

{chr(10).join(lines)}
{chr(10).join(means)}
"""


if __name__ == "__main__":
    main()
