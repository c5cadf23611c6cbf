"""Specimens: a laboratory reports a differential per slide (one patient), not per run.

``wbcid count`` on a folder of folders treats every subfolder as one specimen: its fields, at any
depth below it, are counted together, its scale is measured from its own red cells, and it gets
its own differential and a line in ``specimens.csv``; so does each of several folders given that
holds its fields itself, and each folder of fields named one by one from several. One folder
without subfolders (or fields of one folder) is one specimen. Images lying beside specimen folders
are counted as one more specimen, with a warning.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from ..data import CLASSES

RUN = "all fields"  # the one specimen of a run without specimen folders
LOOSE = "loose fields"  # images beside specimen folders
DIFFERENTIAL_CELLS = 100  # the usual manual differential


def group_fields(paths: Sequence[str | os.PathLike], fields: Sequence[Path]) -> tuple[dict[str, list[Path]], list[str]]:
    """``{specimen: fields}`` in input order, and warnings about how the inputs were grouped. Several
    folders given, each holding its fields itself, are a specimen each, as are the folders of fields
    named one by one from several (two slides' fields were counted as one specimen, "all fields": one
    differential of two patients' cells)."""
    folders = [Path(p) for p in paths if Path(p).is_dir()]
    if not folders:  # fields named one by one (a shell's `slide_A/*.jpg slide_B/*.jpg`): their folders
        folders = list(dict.fromkeys(field.parent for field in fields))
    home = {field: next((f for f in folders if field.is_relative_to(f)), None) for field in fields}
    parts = {field: field.relative_to(folder).parts if folder is not None else () for field, folder in home.items()}
    nested = {home[field] for field in fields if len(parts[field]) > 1}  # folders of specimen folders
    flat = [folder for folder in folders if folder not in nested] if len(folders) > 1 else []
    specimen = {  # each field's specimen folder; None: the run's only folder, or beside specimen folders
        field: home[field] / parts[field][0] if len(parts[field]) > 1 else home[field] if home[field] in flat else None
        for field in fields
    }
    found = [folder for folder in dict.fromkeys(specimen.values()) if folder is not None]
    named = {f: f.name if [g.name for g in found].count(f.name) == 1 else str(f) for f in found}  # else: its path
    groups: dict[str | None, list[Path]] = {}
    for field in fields:
        groups.setdefault(named.get(specimen[field]), []).append(field)
    loose = groups.pop(None, [])
    if not groups:
        return {RUN: loose}, []
    warnings = []
    empty = sorted(
        sub.name
        for folder in nested
        for sub in folder.iterdir()
        if sub.is_dir() and not sub.name.startswith(".") and sub not in named
    )
    if empty:  # a slide whose images were not copied in yet, or not in a format read here
        warnings.append(f"{len(empty)} specimen folder(s) hold no images and are not counted: {', '.join(empty)}")
    if loose:
        groups[LOOSE] = loose
        warnings.append(
            f"{len(loose)} image(s) lie beside the specimen folders rather than in one; "
            f"they are counted together as one more specimen, '{LOOSE}'"
        )
    return groups, warnings


def cells_short(totals: dict) -> str | None:
    """The warning for a specimen whose ``totals`` (:func:`wbcid.smear.counting.summarise`'s) hold
    fewer counted cells than a usual differential, else ``None``. Flagged cells are not counted until a
    person verifies them, so where there are some, verifying them (``wbcid review``) is the other way."""
    counted, flagged = totals["counted"], totals["flagged"]
    if counted >= DIFFERENTIAL_CELLS:
        return None
    advice = "count more fields of this slide"
    if flagged:
        advice += f", or verify its {flagged} flagged cell(s) with `wbcid review`"
    missing = DIFFERENTIAL_CELLS - counted
    return f"only {counted} cells counted; a {DIFFERENTIAL_CELLS}-cell differential needs {missing} more ({advice})"


def specimen_table(specimens: dict[str, dict]) -> pd.DataFrame:
    """One row per specimen: cells, and per type its percentage, 95 % interval and reference flag."""
    rows = []
    for name, s in specimens.items():
        totals = s["totals"]
        row = {
            "specimen": name,
            "fields": s["fields"],
            "cell_diameter_px": s["scale"]["cell_diameter"],
            "detected": totals["detected"],
            "counted": totals["counted"],
            "flagged": totals["flagged"],
        }
        for cls in CLASSES:
            c = totals["classes"][cls]
            low, high = c["ci95"] or (None, None)
            flag = f"{c['flag']} ({'conclusive' if c['conclusive'] else 'inconclusive'})" if c["flag"] else ""
            row |= {
                f"{cls}_percent": c["percent"],
                f"{cls}_ci95_low": low,
                f"{cls}_ci95_high": high,
                f"{cls}_flag": flag,
            }
        row["warnings"] = "; ".join(s["warnings"])
        rows.append(row)
    return pd.DataFrame(rows)
