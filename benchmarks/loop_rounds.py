"""The lab's loop run twice: what a second round of review and adaptation should learn from.

    python benchmarks/loop_rounds.py [--model runs/pbc] [--budget 25] [--seeds 0 1 2]

The same splits of BCCD's 364 fields as ``benchmarks/loop.py`` (the same seeds give the same two
halves); the first half is cut again in two (slides 1 and 2 of one lab), the second half is scored.
Round 1: slide 1 is counted with ``--model`` (the PBC-only model), ``--budget`` cells are verified
down the review queue (the simulated technologist of loop.py) and exported, and the model adapted:
``round1``. Round 2: slide 2 is counted with ``round1``, ``--budget`` more cells verified down *that*
count's queue and exported, and the lab's model made three ways:

- ``chain``: ``round1`` tuned further on round 2's cells alone (``wbcid adapt --model round1 --data
  round2 --no-earlier``; what ``adapt`` did before it learnt from earlier rounds);
- ``all_from_round1``: ``round1`` tuned further on both rounds' verified cells (``--no-earlier``, both
  exports as ``--data``; what ``adapt`` does where the first round's base is gone);
- ``all_from_base``: ``--model`` adapted to both rounds' verified cells, as if verified at once: what
  ``wbcid adapt --model round1 --data round2`` does by default (it is called so here).

Each model then counts the second half, scored as loop.py scores it. Writes
``docs/loop_rounds.json`` and ``docs/loop_rounds.md``; scratch runs in ``runs/loop-rounds``. Run it
with nothing else running (it times each adaptation).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from common import parser, setup, write_results
from loop import bccd_fields, halves, rendered_again, review, score, with_outputs

from wbcid.adaptation import AdaptConfig, adapt
from wbcid.data import CLASSES, CellSet, read_cells
from wbcid.smear.counting import count
from wbcid.web import ReviewStore, export_review

WAYS = ("chain", "all_from_round1", "all_from_base")


def main() -> None:
    options = parser(__doc__)
    options.add_argument("--model", type=Path, default=Path("runs/pbc"), help="the lab's starting model")
    options.add_argument("--budget", type=int, default=25, help="cells verified in each round")
    options.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one split of the fields each")
    args = with_outputs(options, "loop_rounds").parse_args()
    if rendered_again(args, report):
        return
    command = setup()
    types, fields = bccd_fields(args)
    rows = [run_split(args, types, fields, seed) for seed in args.seeds]
    result = {"command": command, "model": str(args.model), "budget": args.budget, "rows": rows}
    text = report(result)
    write_results(args.out, result, text)
    print(text)


def run_split(args: argparse.Namespace, types: dict[str, list[str]], fields: list[Path], seed: int) -> dict:
    """Both rounds and the three second-round models on one split of the fields; returns its row."""
    first, second = halves(fields, seed)
    slides = np.array_split(np.array(first, dtype=object), 2)
    work = args.work / f"seed{seed}"
    row: dict = {"seed": seed, "verified": {}, "adapt_seconds": {}, "scores": {}}

    def verify(model: Path, slide: np.ndarray, name: str) -> CellSet:
        count(model, list(slide), work / f"count-{name}")
        store = ReviewStore.open(work / f"count-{name}")
        row["verified"][name] = review(store, store.cells(), types, args.budget)
        return read_cells(export_review(store, work / f"verified-{name}"))

    def adapted(name: str, cells: CellSet, model: Path, config: AdaptConfig | None = None) -> Path:
        began = time.perf_counter()
        run = adapt(cells, work / name, model, config)
        row["adapt_seconds"][name] = round(time.perf_counter() - began, 1)
        row["scores"][name] = score(count(run, second, work / f"second-{name}"), types)
        print(name, json.dumps(row["scores"][name]))
        return run

    row["scores"]["before"] = score(count(args.model, second, work / "second-before"), types)
    first_cells = verify(args.model, slides[0], "round1")
    round1 = adapted("round1", first_cells, args.model)
    second_cells = verify(round1, slides[1], "round2")
    alone = AdaptConfig(earlier=False)
    adapted("chain", second_cells, round1, alone)
    adapted("all_from_round1", CellSet.merged([first_cells, second_cells]), round1, alone)
    adapted("all_from_base", second_cells, round1)  # the default: round1's base, both rounds' cells
    print(json.dumps(row))
    return row


def report(r: dict) -> str:
    keys = ("accuracy", "macro_f1", "flagged_inside", "differential_distance")
    names = ("before", "round1", *WAYS)
    lines = ["| split | model | adapt, s | " + " | ".join(keys) + " |", "|---:|---|---:|" + "---:|" * len(keys)]
    for row in r["rows"]:
        for name in names:
            s = row["scores"][name]
            seconds = row["adapt_seconds"].get(name)
            lines.append(
                f"| {row['seed']} | {name} | {'-' if seconds is None else f'{seconds:.0f}'} | "
                + " | ".join("-" if s[k] is None else f"{s[k]:.3f}" for k in keys)
                + " |"
            )
    means = ["| model | " + " | ".join(keys) + " |", "|---|" + "---:|" * len(keys)]
    for name in names:
        got = [[row["scores"][name][k] for row in r["rows"]] for k in keys]
        means.append(f"| {name} | " + " | ".join(f"{np.mean([v for v in g if v is not None]):.3f}" for g in got) + " |")
    verified = "; ".join(
        f"split {row['seed']}: "
        + ", ".join(f"{n} {'/'.join(str(v[c]) for c in CLASSES)}" for n, v in row["verified"].items())
        for row in r["rows"]
    )
    return f"""# The loop twice: what the second round learns from

Command: `{r["command"]}` (model {r["model"]}; {r["budget"]} cells verified per round; nothing else
ran). What each row is: the script's docstring; each score as `benchmarks/loop.py` scores it, on the
second half of the fields (the same halves as docs/loop.md, so `before` is its row 0). Verified per
type (N/L/M/E/B): {verified}.

`all_from_base` is what `wbcid adapt --model ROUND1 --data ROUND2` does by default. Before it did,
this script made that row by adapting `--model` to both rounds' cells passed together; that run gave
every score on this page to the last digit (only the seconds differ).

{chr(10).join(lines)}

Mean over the splits:

{chr(10).join(means)}
"""


if __name__ == "__main__":
    main()
