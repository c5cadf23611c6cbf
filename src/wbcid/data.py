"""Data in: one reader over three layouts, all yielding cells in the fixed five-class label space.

Layouts (detected from the path by :func:`read_cells`):

* a manifest CSV (``path,label[,source,split,group]``; paths relative to the CSV), or a folder
  holding ``cells.csv``;
* an ImageFolder tree (class folders, names matched with :func:`parse_label`, or specimen folders
  of class folders);
* the original project's layout: images plus a JSON file ``{filename: "1".."5"}`` (``"-1"`` = skip).

Labels are always indices into :data:`CLASSES`; a test set that lacks classes is never re-indexed.
Problems are collected per reason and reported once, with counts, before any work starts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path, PureWindowsPath

import numpy as np

from .contract import CLASSES
from .errors import WbcidError
from .files import (
    COUNT_LOG,
    FIGURES,
    IMAGE_SUFFIXES,
    PREDICTION_COLUMNS,
    REVIEW_DATABASE,
    first_file,
    hidden,
    input_paths,
    model_labelled,
    prediction_review,
    read_table,
    refuse_count_folder,
    review_export,
)

log = logging.getLogger("wbcid")

DATA_ENV = "WBCID_DATA"
MANIFESTS = ("cells.csv", "manifest.csv")  # what a folder given as data is read by, first found
SPLIT_WORDS = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val"}
SPLIT_WORDS |= {"dev": "val", "test": "test", "testing": "test"}
# a split's folder: the word alone or with a word that names no specimen (Kaggle's BCCD: TRAIN/, TEST/,
# TEST_SIMPLE/; Raabin's Test-A/); "test1" and "test patient 3" stay specimens' names
SPLIT_FOLDER = re.compile(rf"^({'|'.join(SPLIT_WORDS)})(?:[ _-](?:simple|set|data|images|split|[a-z]|\d+))?$")
COLUMN_NAMES = {  # other names of a manifest's two columns, used where exactly one of them is there
    "path": ("file", "filename", "file_name", "image", "image_path", "img"),
    "label": ("class", "category", "cell_type", "celltype", "type"),
}

# Abbreviations and typos seen in public WBC datasets (PBC file prefixes, Kaggle folders, ...).
_ALIASES = {
    "ne": 0,
    "sne": 0,
    "bne": 0,
    "neu": 0,
    "seg": 0,
    "band": 0,
    "pmn": 0,
    "ly": 1,
    "lym": 1,
    "mo": 2,
    "mon": 2,
    "eo": 3,
    "eos": 3,
    "ba": 4,
    "bas": 4,
    "baoso": 4,
}
# The five names in Spanish, Portuguese, Italian, French and German (accents dropped): a stem, and the
# endings those languages add to it (neutrófilo, Lymphozyten, monociti, éosinophiles, basófilos).
# Only these endings: "monoblast", "basophilie" or "eosinophilic myelocyte" are not ours.
_STEMS = {
    "neutrofil": 0,
    "neutrophil": 0,
    "linfocit": 1,
    "lymphocyt": 1,
    "lymphozyt": 1,
    "monocit": 2,
    "monocyt": 2,
    "monozyt": 2,
    "eosinofil": 3,
    "eosinophil": 3,
    "basofil": 4,
    "basophil": 4,
}
_ENDINGS = ("", "s", "e", "es", "o", "os", "a", "as", "i", "er", "en")
# Labels of several words name a type with words that do not change it: the granulocyte in
# "neutrophile Granulozyten" and "polynucléaires éosinophiles", the nucleus of a CellaVision
# "Neutrophil, segmented" or "band". With one of these, the type word may be an adjective
# ("eosinophilic granulocyte"); any other word ("variant", "myelocyte", "reactive") is not ours.
_QUALIFIERS = {
    "granulocyte", "granulocytes", "granulozyt", "granulozyten", "granulocito", "granulocitos", "granulociti",
    "polynucleaire", "polynucleaires", "segmented", "segmentado", "segmentados", "segmentati", "segmentkernige",
    "segmentkernig", "band", "banda", "cayado", "stab", "stabkernige", "stabkernig",
    "cell", "cells", "celula", "celulas", "cellula", "cellule", "zelle", "zellen",  # "Neutrophil cells (n=120)"
}  # fmt: skip
_ADJECTIVE_ENDINGS = ("ic", "ico", "icos", "ique", "iques")


def _stem_match(word: str, endings: Sequence[str]) -> int | None:
    for stem, index in _STEMS.items():
        if word.startswith(stem) and word[len(stem) :] in endings:
            return index
    return None


def parse_label(name: object) -> int | None:
    """Map a label as written by some dataset to a class index, or ``None`` if it is not ours.

    Accepts class names in any case, plurals, unambiguous prefixes of at least three letters
    (``neut``, ``eosi``, ``linfo``), known abbreviations, the names in five more languages (``_STEMS``), with
    words that do not change the type (``_QUALIFIERS``) or a count (``n=120``), and the original JSON's 1-based
    integers.
    """
    text = str(name).strip().lower()
    if re.fullmatch(r"[1-5](\.0)?", text):
        return int(float(text)) - 1
    text = re.sub(r"\bn\s*=\s*\d+", " ", text)  # a count written into the name: "NEUTROPHIL (n=120)"
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    word = re.sub(r"[^a-z]", "", ascii_text)
    found = _stem_match(word, _ENDINGS)
    if found is not None:
        return found
    words = re.findall(r"[a-z]+", ascii_text)
    named = [w for w in words if w not in _QUALIFIERS]
    if len(named) == 1 < len(words):  # "Neutrophil, segmented", "neutrophile Granulozyten"
        return _stem_match(named[0], _ENDINGS + _ADJECTIVE_ENDINGS)
    if word in _ALIASES:
        return _ALIASES[word]
    for candidate in (word, word.removesuffix("s")):  # whole names matched their stem above
        if len(candidate) >= 3:  # a prefix of one type's stem, in any of the languages: "neut", "linfo"
            hits = {i for stem, i in _STEMS.items() if stem.startswith(candidate)}
            if len(hits) == 1:
                return hits.pop()
    return None


@dataclass(frozen=True)
class Cell:
    """One single-cell image. ``label`` is a class index, or -1 when not one of ours (``raw_label`` says what)."""

    path: Path
    label: int = -1
    source: str = ""
    split: str = ""
    group: str = ""
    raw_label: str = ""
    verified_at: str = ""  # when a person verified it (a review's export says; ISO 8601, UTC), else ""


@dataclass
class CellSet:
    """Cells plus what was skipped on the way in (reason -> count), so callers can report it."""

    cells: list[Cell]
    skipped: Counter = field(default_factory=Counter)
    origin: str = ""

    def __len__(self) -> int:
        return len(self.cells)

    @property
    def labels(self) -> np.ndarray:
        return np.array([c.label for c in self.cells], dtype=np.int64)

    @property
    def paths(self) -> list[Path]:
        return [c.path for c in self.cells]

    def class_counts(self) -> dict[str, int]:
        counts = Counter(c.label for c in self.cells)
        return {name: counts.get(i, 0) for i, name in enumerate(CLASSES)}

    def subset(self, keep: Iterable[bool] | Sequence[int]) -> CellSet:
        """Cells selected by a boolean mask or by indices; skip counts are kept."""
        keep = list(keep)
        if keep and isinstance(keep[0], (bool, np.bool_)):
            cells = [c for c, k in zip(self.cells, keep) if k]
        else:
            cells = [self.cells[i] for i in keep]
        return CellSet(cells, Counter(self.skipped), self.origin)

    @classmethod
    def merged(cls, sets: Sequence[CellSet]) -> CellSet:
        """One set of the cells of ``sets``, in order; an image listed twice keeps its latest label: the
        one verified last where both say when (a review's exports: a second round's correction of a
        cell the first verified, whichever export is named first), else the last listed; it is counted
        in ``skipped``, whose counts add up. An image is the same by its bytes, whatever its path: two
        exports of one review name each cell twice, and a twin would weigh double and sit on both
        sides of adapt's cross-fitting."""
        latest: dict[object, Cell] = {}
        for cell in (c for s in sets for c in s.cells):
            key = file_identity(cell.path)
            before = latest.get(key)
            if before is None or not (cell.verified_at and before.verified_at > cell.verified_at):
                latest[key] = cell
        skipped = sum((s.skipped for s in sets), Counter())
        if repeated := sum(len(s) for s in sets) - len(latest):
            skipped["listed again (its latest label kept)"] += repeated
        return cls(list(latest.values()), skipped, " + ".join(s.origin for s in sets))

    def select(self, sources: str | Sequence[str] | None = None, splits: str | Sequence[str] | None = None) -> CellSet:
        """Filter by source and split (one name or several), failing with the available values when
        nothing matches."""
        result = self
        for attr, wanted in (("source", sources), ("split", splits)):
            if not wanted:
                continue
            wanted = [wanted] if isinstance(wanted, str) else wanted  # "pbc" is one source, not 'p', 'b', 'c'
            have = sorted({getattr(c, attr) for c in result.cells} - {""})  # "": the layout has no such column
            unknown = sorted(set(wanted) - set(have))
            if unknown:
                raise WbcidError(
                    f"{self.origin or 'data'}: no cells with {attr} {', '.join(map(repr, unknown))}; "
                    f"available: {', '.join(map(repr, have)) or 'none (this layout has no ' + attr + ' column)'}"
                )
            result = CellSet([c for c in result.cells if getattr(c, attr) in wanted], result.skipped, result.origin)
        return result

    def known(self) -> CellSet:
        """Only the cells of our five classes; the others are counted in ``skipped`` by their label."""
        unknown = Counter(c.raw_label for c in self.cells if c.label < 0)
        kept = self.subset([c.label >= 0 for c in self.cells])
        if unknown:
            listed = ", ".join(f"{name!r} ({n})" for name, n in unknown.most_common(8))
            kept.skipped[f"label not one of {', '.join(CLASSES)}: {listed}"] += sum(unknown.values())
        return kept

    def report_skipped(self) -> None:
        for reason, count in sorted(self.skipped.items()):
            log.warning("%s: skipped %d image(s): %s", self.origin, count, reason)


def default_data_root() -> Path:
    """``$WBCID_DATA`` or ``../shared/data`` beside the project, where tests and benchmarks look."""
    env = os.environ.get(DATA_ENV)
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[3] / "shared" / "data"


def file_identity(path: Path) -> object:
    """What makes two listed images one: their bytes (their resolved path if unreadable)."""
    try:
        return hashlib.blake2b(path.read_bytes(), digest_size=16).digest()
    except OSError:
        return path.resolve()


def read_all(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> CellSet:
    """The cells of one layout or several (a repeated ``--data``) as one set (:meth:`CellSet.merged`)."""
    return CellSet.merged([read_cells(path) for path in input_paths(paths)])


def read_cells(
    path: str | os.PathLike,
    sources: str | Sequence[str] | None = None,
    splits: str | Sequence[str] | None = None,
    known_only: bool = True,
) -> CellSet:
    """Read any supported layout, keep only our five classes, and filter by source/split.

    ``known_only=False`` keeps cells of other types too (label -1, ``raw_label`` says which),
    e.g. to measure how they are flagged.

    Raises :class:`WbcidError` for a missing path, an unrecognised layout or an empty result.
    """
    path = Path(path)
    if not path.exists():
        raise WbcidError(f"data path does not exist: {path}")
    marked = any((path.parent / name).is_file() for name in (COUNT_LOG, REVIEW_DATABASE))
    if path.is_file() and (marked or review_export(path.parent)):
        path = path.parent  # a count's, review's or export's file (counts.json, review.sqlite, audit.csv): its folder
    refuse_count_folder(path, labelled=True)
    if (path / REVIEW_DATABASE).is_file():  # a prediction's review (a count's folder is refused above)
        exported = path / "verified"  # where the page's Export button writes
        then = (
            f"pass {exported}, its export"
            if review_export(exported)
            else "export them (`wbcid review RUN --export FOLDER`, or the page's Export button) and pass the export"
        )
        raise WbcidError(f"{path} is a review's folder: its verified cells are in its database; {then}")
    export = path if path.is_dir() and review_export(path) and (path / "cells").is_dir() else None
    manifests = [path / name for name in MANIFESTS if (path / name).is_file()] if path.is_dir() else []
    if manifests:  # a data folder's manifest, or the one `wbcid review --export` writes beside its cells
        path = manifests[0]
    if export is not None:  # read by its type folders
        cellset = _read_export(export)
    elif path.suffix.lower() in (".csv", ".tsv"):
        cellset = _read_manifest(path)
    elif path.suffix.lower() == ".json":
        cellset = _read_json_layout(path)
    elif path.is_dir():
        jsons = sorted(path.glob("*.json"))
        has_class_dirs = any(parse_label(d.name) is not None for d in path.iterdir() if d.is_dir())
        cellset = _read_json_layout(jsons[0]) if jsons and not has_class_dirs else _read_image_folder(path)
    elif path.suffix.lower() in (".xlsx", ".xls", ".ods"):
        raise WbcidError(f"{path} is a spreadsheet: save it as CSV (columns path,label) and pass the .csv")
    else:
        raise WbcidError(f"{path}: expected a manifest .csv, a labels .json, or a folder of class folders")
    cellset = cellset.select(sources, splits)
    if known_only:
        cellset = cellset.known()
    if not cellset.cells and path.name == "manifest.csv" and review_export(path.parent):
        raise WbcidError(
            f"{path.parent}: this export of a review holds no verified cell of the five types; verify some with "
            "`wbcid review` and export again"
        )
    if not cellset.cells:
        wanted = f"labelled images of the five classes ({', '.join(CLASSES)})" if known_only else "images"
        why = "; ".join(f"{count} {reason}" for reason, count in sorted(cellset.skipped.items()))
        files = path.iterdir() if path.is_dir() else ()
        loose = sum(f.suffix.lower() in IMAGE_SUFFIXES and not hidden(f.name) for f in files)
        hint = (
            f"; its {loose} image(s) lie in the folder itself, with no type: put them in class folders "
            "(neutrophil/, ...), list them in a manifest CSV (path,label), or classify them with `wbcid predict`"
        )
        if (named := parse_label(path.name)) is not None:  # one type's folder, named itself
            hint = f"; its name says their type ({CLASSES[named]}): pass the folder that holds it, {path.parent}"
        raise WbcidError(f"{path}: no {wanted} found" + (f" (skipped: {why})" if why else "") + hint * bool(loose))
    cellset.report_skipped()
    return cellset


def recorded_training_cells(recorded: dict | None) -> CellSet | None:
    """The labelled cells a model recorded as its training data (``ModelConfig.training_data``),
    if they still exist here: the train and validation rows of the recorded sources of its data (every
    split for the bundled model, which saw them all). Evaluation warns about them; adaptation replays them.
    """
    if not recorded:
        return None
    origin = Path(recorded.get("origin") or default_data_root() / "cells.csv")
    if not origin.exists():
        return None
    try:
        cells = read_cells(origin, known_only=False)  # known_only would warn about its other labels
    except WbcidError:
        return None
    sources = set(recorded.get("sources") or [])
    whole = recorded.get("all_splits", False)  # True: every source; a list: those sources
    return cells.subset(
        [
            c.label >= 0
            and (not sources or c.source in sources)
            and (whole is True or c.source in (whole or ()) or c.split != "test")
            for c in cells.cells
        ]
    )


def training_record(cells: Sequence[Cell], origin: str) -> dict:
    """What a model records of the ``cells`` it trained and validated on, read from ``origin``
    (``ModelConfig.training_data``): the origin, the sources, and the sources whose test-split rows
    it used (:func:`wbcid.splits.training_pool` trains on every row of a lab without a train/val split), checked
    against the data itself. So :func:`recorded_training_cells` finds every one of them: evaluation
    warns about all, and adaptation replays all, not PBC's alone."""
    record: dict = {"origin": origin, "sources": sorted({c.source for c in cells})}
    found = recorded_training_cells(record) if origin else None
    if found is not None:
        known = {c.path for c in found.cells}
        whole = sorted({c.source for c in cells if c.path not in known})
        if whole:
            record["all_splits"] = whole
    return record


def _read_manifest(csv_path: Path) -> CellSet:
    table = read_table(csv_path, dtype=str)
    if len(table.columns) == 1 and (sep := next((s for s in ";\t" if s in str(table.columns[0])), None)):
        table = read_table(csv_path, dtype=str, sep=sep)  # Excel saves "CSV" with semicolons in many locales
    table.columns = [re.sub(r"[\s-]+", "_", str(c).strip().lower()) for c in table.columns]  # "Path", "Cell type"
    if PREDICTION_COLUMNS <= set(table.columns):  # read as labelled cells, it scored the model against itself
        refusal = model_labelled(csv_path, "predict", prediction_review(csv_path))
        raise WbcidError(f"{refusal} (or, with labels you corrected in it yourself, a copy with only 'path,label')")
    for column, others in COLUMN_NAMES.items():  # a lab's own table: "filename,class", "image,cell type", ...
        named = [c for c in table.columns if c in others]
        if column not in table.columns and len(named) == 1:
            table = table.rename(columns={named[0]: column})
            log.info("%s: column '%s' read as the %s", csv_path, named[0], column)
    missing_cols = {"path", "label"} - set(table.columns)
    if missing_cols:
        raise WbcidError(
            f"{csv_path}: manifest needs columns 'path' and 'label' (missing {sorted(missing_cols)}; read as them "
            f"where only one is there: {'; '.join(f'{k}: ' + ', '.join(v) for k, v in COLUMN_NAMES.items())})"
        )
    table = table[(table.path.str.strip() != "") | (table.label.str.strip() != "")]  # a sheet's blank rows
    cells, skipped = [], Counter()
    for row in table.itertuples(index=False):
        file = csv_path.parent / row.path
        if not file.is_file() and "\\" in row.path:  # a manifest written on Windows: cells\neutrophil\a.jpg
            file = csv_path.parent / PureWindowsPath(row.path).as_posix()
        if not file.is_file():
            skipped["listed in the manifest but missing on disk"] += 1
            continue
        label = parse_label(row.label)
        cells.append(
            Cell(
                file,
                -1 if label is None else label,
                getattr(row, "source", ""),
                getattr(row, "split", ""),
                getattr(row, "group", ""),
                row.label,
            )
        )
    if table.size and not cells:
        first = table.path.iloc[0]
        if PureWindowsPath(first).drive and not Path(first).is_absolute():  # C:\cells\a.jpg, moved off Windows
            raise WbcidError(
                f"{csv_path}: its paths, e.g. {first}, are where the images were on a Windows machine; write them "
                f"relative to the CSV's folder ({csv_path.parent}), e.g. cells\\neutrophil\\a.jpg"
            )
        raise WbcidError(
            f"{csv_path}: {len(table)} of {len(table)} paths do not exist (paths are relative to the "
            f"CSV's folder, {csv_path.parent}), e.g. {csv_path.parent / first}"
        )
    return CellSet(_listed_once(cells, skipped), skipped, str(csv_path))


def _read_export(folder: Path) -> CellSet:
    """An export of a review (`wbcid review --export`): its ``cells/<type>/`` folders say each cell's type,
    its manifest the field each was cut from (``group``) and their order. A technologist who corrects a
    type by moving the picture into another type's folder (read by the manifest alone, the cell was
    dropped as missing on disk), deletes a picture or adds one is taken at the folders' word."""
    listed = read_table(folder / "manifest.csv", dtype=str)
    rows = {Path(row.path).name: row for row in listed.itertuples(index=False)}  # by the cell's id: unique here
    position = {name: i for i, name in enumerate(rows)}
    found = _read_image_folder(folder / "cells")
    cells = []
    for cell in sorted(found.cells, key=lambda c: position.get(c.path.name, len(position))):
        row = rows.get(cell.path.name)  # None: added by hand, of the review's lab, its field unknown
        known = row is not None and isinstance(getattr(row, "reviewed_at", None), str)
        cells.append(
            replace(
                cell,
                source=row.source if row else "review",
                group=row.group if row else "",
                verified_at=row.reviewed_at if known else "",
            )
        )
    if moved := sum(c.label != parse_label(row.label) for c in cells if (row := rows.get(c.path.name))):
        log.info("%s: %d cell(s) moved into another type's folder since the export, read as that type", folder, moved)
    return CellSet(cells, found.skipped, str(folder))


def _listed_once(cells: list[Cell], skipped: Counter) -> list[Cell]:
    """Each image of a manifest once. Listed again with the same label, it is one cell (twice, it weighed
    double and could sit on both sides of a split); listed with different labels, it is left out: which
    is right cannot be told (two people's calls?). Both are counted in ``skipped``, the second with an
    example; the first listing keeps its place."""
    labels: dict[str, list[str]] = {}
    for cell in cells:
        labels.setdefault(os.path.normpath(cell.path), []).append(cell.raw_label)
    disputed = {path: listed for path, listed in labels.items() if len({parse_label(x) for x in listed}) > 1}
    if again := len(cells) - len(labels):
        skipped["listed again with the same label (kept once)"] += again - sum(len(v) - 1 for v in disputed.values())
    if disputed:
        path, listed = next(iter(disputed.items()))
        example = f"{Path(path).name}: {' and '.join(map(repr, dict.fromkeys(listed)))}"
        skipped[f"listed with different labels, e.g. {example} (left out: which is right?)"] += len(disputed)
    kept, seen = [], set()
    for cell in cells:
        key = os.path.normpath(cell.path)
        if key not in disputed and key not in seen:
            seen.add(key)
            kept.append(cell)
    return kept


def _read_image_folder(root: Path) -> CellSet:
    """Class folders, or folders of class folders (``patient1/neutrophil/...``, as laboratories file
    cells by specimen): each such folder is a group, so a split keeps its cells on one side. A folder
    named as a split (``train/``, ``TEST/``, ``validation/``, ``TEST_SIMPLE/``: :data:`SPLIT_FOLDER`) is
    the cells' ``split`` instead, as a manifest's column is: test cells never train."""
    cells, skipped = [], Counter()
    for folder in sorted(d for d in root.iterdir() if d.is_dir() and not hidden(d.name)):
        label = parse_label(folder.name)
        split = _split_of(folder.name) if label is None else None
        holds = [d for d in folder.iterdir() if d.is_dir()] if label is None else []  # a class folder: not listed twice
        if label is None and (split and holds or any(parse_label(d.name) is not None for d in holds)):
            inner = _read_image_folder(folder)
            if split:
                cells += [replace(c, source=root.name, split=split) for c in inner.cells]
            else:
                cells += [
                    replace(c, source=root.name, group="/".join(filter(None, (folder.name, c.group))))
                    for c in inner.cells
                ]
            skipped += inner.skipped
            continue
        visible = (f for f in folder.rglob("*") if not any(map(hidden, f.relative_to(folder).parts)))
        files = sorted(f for f in visible if f.is_file())
        images = [f for f in files if f.suffix.lower() in IMAGE_SUFFIXES]
        if len(images) < len(files):
            skipped["not an image file (by extension)"] += len(files) - len(images)
        kept = [f for f in images if not FIGURES.search(f.name)]  # explain's Grad-CAM images written there
        if figures := len(images) - len(kept):
            skipped["a figure wbcid drew (Grad-CAM, confusion matrix, history)"] += figures
        images = kept
        if not images and label is not None:
            log.warning("%s: class folder %r holds no images", root, folder.name)
        cells += [Cell(f, -1 if label is None else label, source=root.name, raw_label=folder.name) for f in images]
    return CellSet(cells, skipped, str(root))


def _split_of(name: str) -> str | None:
    """The split a folder's name says (``TRAIN``, ``Testing``, ``val_set``, ...), or None."""
    match = SPLIT_FOLDER.match(name.strip().lower())
    return None if match is None else SPLIT_WORDS[match.group(1)]


def _read_json_layout(json_path: Path) -> CellSet:
    """The original project's labels: ``{filename: "1".."5"}``; images beside the JSON or one level below."""
    try:
        mapping = json.loads(json_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise WbcidError(f"{json_path}: not valid JSON ({exc})") from exc
    if not isinstance(mapping, dict):
        raise WbcidError(f"{json_path}: expected an object {{filename: label}}, got {type(mapping).__name__}")
    folders = [json_path.parent] + sorted(d for d in json_path.parent.iterdir() if d.is_dir())
    cells, skipped = [], Counter()
    for name, raw in mapping.items():
        if str(raw).strip() == "-1":
            skipped["marked -1 (skip) in the JSON"] += 1
            continue
        file = first_file(d / name for d in folders)
        if file is None:
            skipped["listed in the JSON but missing on disk"] += 1
            continue
        label = parse_label(raw)
        cells.append(Cell(file, -1 if label is None else label, source=json_path.stem, raw_label=str(raw)))
    return CellSet(cells, skipped, str(json_path))
