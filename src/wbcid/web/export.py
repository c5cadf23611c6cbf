"""Export a review: the verified cells as training data, and the verified differential.

``cells/<label>/<id>.png`` plus ``manifest.csv`` are readable by every ``--data`` option (and so
by ``wbcid adapt``); cells cut from one field share a ``group``, so a later split keeps them on
one side. ``counts.json`` and ``report.html`` say, cell by cell, whose label each count rests on, and
``audit.csv`` lists every change made in the review, in order, undone ones too.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import jinja2
import pandas as pd

from ..data import CLASSES
from ..errors import WbcidError
from ..files import makeable, one_at_a_time, review_export
from .store import AUDIT_COLUMNS, ReviewStore, cell_image

EXPORT_ENTRIES = {"cells", "manifest.csv", "counts.json", "audit.csv", "report.html"}  # all an export writes


def export_review(store: ReviewStore, out_dir: str | os.PathLike, chosen: bool = True) -> Path:
    """Write the verified cells and the verified differential to ``out_dir``; returns it. An
    earlier export there is replaced; any other folder is refused, never deleted. ``chosen``: the
    user named ``out_dir`` (the page's button exports to a fixed folder, so another is no choice)."""
    out = makeable(out_dir)
    with one_at_a_time(out.parent):  # the page's button and `wbcid review --export` at once: one failed, or both
        return _export(store, out, chosen)


def _export(store: ReviewStore, out: Path, chosen: bool) -> Path:
    then = " or choose another folder" if chosen else ", then export again"
    if out.is_file() or out.resolve() in (store.folder.resolve(), *store.folder.resolve().parents):
        what = "a file" if out.is_file() else "the run under review, or a folder holding it"  # "move it aside"
        raise WbcidError(f"{out} is {what}: export into a folder of its own, e.g. {store.folder / 'verified'}")
    if not _replaceable(out):
        raise WbcidError(
            f"{out} exists and is not an earlier export of a review; move it aside{then} (a folder that is not an "
            "export is never replaced)"
        )
    if out.is_dir() and (other := sorted(p.name for p in out.iterdir() if p.name not in EXPORT_ENTRIES)):
        raise WbcidError(
            f"{out} is an earlier export, but also holds what an export does not write ({', '.join(other[:3])}"
            f"{', ...' if len(other) > 3 else ''}), which replacing it would delete; move that out{then}"
        )
    if out.is_dir() and (edited := _edited_by_hand(out)):
        raise WbcidError(
            f"{out}: {edited} picture(s) moved, added or deleted in its cells/ since it was exported (read as "
            f"their folders say), which exporting again would undo: make those corrections in the review, or move "
            f"{out} aside{then}"
        )
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    cells = store.cells()
    rows, unreadable = [], []
    for cell in cells:
        if not cell["reviewed"] or cell["label"] not in CLASSES:
            continue
        try:  # an image gone since the review began costs its cell as training data, not the export
            picture = cell_image(cell)
        except WbcidError:
            unreadable.append(cell["id"])
            continue
        path = Path("cells") / cell["label"] / f"{cell['id']}.png"
        (partial / path).parent.mkdir(parents=True, exist_ok=True)
        picture.save(partial / path)
        rows.append(
            {
                "path": str(path),
                "label": cell["label"],
                "source": "review",
                "split": "",
                "group": cell["image"],
                "model_label": cell["model_label"],
                "reviewer": cell["reviewer"] or "",
                "reviewed_at": cell["reviewed_at"],
            }
        )
    partial.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(
        rows, columns=["path", "label", "source", "split", "group", "model_label", "reviewer", "reviewed_at"]
    ).to_csv(partial / "manifest.csv", index=False)
    totals = store.differential()
    result = {
        "model": store.meta("model"),
        "run": store.meta("run"),
        "totals": totals,
        "verified_by_person": totals["verified"],
        "exported": len(rows),  # the verified cells of the five types: the manifest's rows
        "not_exported": unreadable,  # ids of verified cells of the five types whose image could not be read
        "model_only": totals["to_review"],
        "cells": [
            {
                k: c[k]
                for k in (
                    "id",
                    "image",
                    "box",
                    "model_label",
                    "confidence",
                    "ood_score",
                    "flagged",
                    "label",
                    "reviewed",
                    "reviewer",
                    "reviewed_at",
                )
            }
            for c in cells
        ],
    }
    (partial / "counts.json").write_text(json.dumps(result, indent=2))
    audit = store.audit()
    pd.DataFrame(audit, columns=AUDIT_COLUMNS).to_csv(partial / "audit.csv", index=False)
    env = jinja2.Environment(loader=jinja2.PackageLoader("wbcid.web"), autoescape=True)
    corrected = [c for c in cells if c["reviewed"] and c["label"] != c["model_label"]]
    (partial / "report.html").write_text(
        env.get_template("verified_report.html").render(
            totals=totals, model=result["model"], run=result["run"], corrected=corrected, changes=len(audit)
        )
    )
    if out.exists():
        shutil.rmtree(out)
    os.replace(partial, out)
    return out


def export_summary(out: str | os.PathLike, result: dict | None = None) -> str:
    """What the export at ``out`` holds, in one line: the command prints it and the page shows it,
    so a technologist learns there, not from a failing `wbcid adapt`, that it holds no cell to adapt to.
    ``result``: its counts.json, if already read."""
    out = Path(out)
    result = result or json.loads((out / "counts.json").read_text())
    verified, exported = result["verified_by_person"], result["exported"]
    line = f"{exported} verified cell(s) of the five types exported to {out} (manifest: {out / 'manifest.csv'})"
    unreadable = len(result.get("not_exported", []))  # exports before wbcid recorded them have no such key
    if verified > exported + unreadable:  # "not a WBC" cells count in the differential's audit, not as training data
        line += f"; {verified - exported - unreadable} verified as not a WBC are in counts.json only"
    if unreadable:
        line += (
            f"; {unreadable} verified cell(s) whose image could not be read (moved or deleted?) are in the "
            "differential but not exported: put the images back and export again"
        )
    if not exported and not unreadable:
        line += "; nothing for `wbcid adapt` to learn from yet: verify some cells of the five types and export again"
    return line


def _edited_by_hand(out: Path) -> int:
    """How many of an earlier export's pictures are not where its manifest lists them, or not listed:
    a label corrected by moving a picture into another type's folder (:func:`wbcid.data.read_cells`
    reads the folders), a picture deleted or added."""
    listed = {Path(p).name: Path(p) for p in pd.read_csv(out / "manifest.csv", usecols=["path"]).path}
    found = {p.name: p.relative_to(out) for p in (out / "cells").rglob("*") if p.is_file()}
    return sum(listed.get(name) != found.get(name) for name in listed.keys() | found.keys())


def _replaceable(out: Path) -> bool:
    """Whether ``out`` may be replaced by an export: absent, an empty folder, or an earlier export
    (its manifest and the counts.json only an export writes). A count's folder, which also holds
    a counts.json (and the review's database), is not."""
    if not out.exists():
        return True
    if not out.is_dir():
        return False
    if not any(out.iterdir()):
        return True
    try:
        earlier = json.loads((out / "counts.json").read_text())
    except (OSError, ValueError):
        return False
    return review_export(out) and isinstance(earlier, dict) and "verified_by_person" in earlier
