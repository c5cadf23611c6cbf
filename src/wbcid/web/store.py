"""The review database: every cell of a run, the model's call, and each person's correction.

A run's cells (a count's or a prediction CSV's, :mod:`wbcid.web.runs`) are imported once into
SQLite (``review.sqlite``, WAL mode) in the run's review folder; each correction is one committed
transaction with an audit row, so stopping or killing the server loses nothing and two browser tabs
never lose each other's changes (a correction made without seeing the cell's latest change is
refused: see ``version``). Thumbnails are cut once and cached beside the database. Files are only
ever reached through a cell's row, never through a path from a request.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import shutil
import sqlite3
import tempfile
import threading
from collections.abc import Iterable, Iterator
from contextlib import closing, contextmanager
from datetime import UTC, datetime
from pathlib import Path

from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from ..data import CLASSES
from ..decoding import map_ahead
from ..errors import WbcidError
from ..files import REVIEW_DATABASE, first_file, relocated, unwritable
from ..loading import describe_model
from ..smear.counting import CONTEXT, open_field
from ..smear.differential import REFERENCE_RANGES, differential
from .earlier import earlier_verdicts, matches
from .runs import SEVERAL, common_folder, located, read_run

log = logging.getLogger("wbcid")
OTHER = "other"  # not a WBC (or not one of the five types): left out of the differential
LABELS = (*CLASSES, OTHER)
THUMB = 128
AUDIT_COLUMNS = (  # ReviewStore.audit's keys, in the order an export's audit.csv lists them
    "change",
    "at",
    "reviewer",
    "cell_id",
    "image",
    "old_label",
    "old_reviewed",
    "new_label",
    "new_reviewed",
)

SCHEMA = """
CREATE TABLE IF NOT EXISTS cells (
    id INTEGER PRIMARY KEY,
    image TEXT NOT NULL,          -- the field (count) or cell image (predict) it comes from
    specimen TEXT NOT NULL,
    box TEXT,                     -- JSON [x0, y0, x1, y1] in the field; NULL for a cell image
    model_label TEXT NOT NULL,
    confidence REAL,
    ood_score REAL,
    flagged INTEGER NOT NULL,
    why TEXT,                     -- why it is flagged, in words (NULL: not flagged, or imported before wbcid said)
    label TEXT NOT NULL,          -- current label: the person's if reviewed, else the model's
    reviewed INTEGER NOT NULL DEFAULT 0,
    reviewer TEXT,
    reviewed_at TEXT
);
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY,
    cell_id INTEGER NOT NULL REFERENCES cells(id),
    old_label TEXT, old_reviewed INTEGER,
    new_label TEXT, new_reviewed INTEGER,
    reviewer TEXT, at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_cell ON audit(cell_id);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
# A cell's version is the number of changes made to it: a page sends the one it showed with a
# correction, so a correction made on a page that had not seen another person's is refused, not applied.
SELECT_CELLS = "SELECT cells.*, (SELECT COUNT(*) FROM audit WHERE audit.cell_id = cells.id) AS version FROM cells"


class ChangedMeanwhile(WbcidError):
    """A correction made on a page that had not seen the cell's latest change."""


class ReviewStore:
    """One run's cells and corrections. Open with :meth:`open`; every method is one transaction."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.path = folder / REVIEW_DATABASE  # a snapshot's elsewhere where the folder cannot be written
        self.here = str(folder.resolve())
        self.began_in: str | None = None  # ``here`` when the cells were imported
        self.images_from: tuple[str, str] | None = None  # (the recorded images' common folder, where they are now)

    @classmethod
    def open(cls, run: str | os.PathLike, images: str | os.PathLike | None = None, writing: bool = True) -> ReviewStore:
        """The store of a count folder or prediction CSV, importing its cells on first use. ``images``:
        the folder the run's images were moved to (kept for the review: later starts need not repeat it).
        ``writing=False`` (an export) reads a review kept where this user cannot write (a read-only
        share, a colleague's run) from a snapshot of its database."""
        run, folder, rows, meta, made_in = read_run(Path(run))
        if not rows:
            raise WbcidError(f"{run}: no cells to review (no WBC was found or read)")
        if images is not None and not os.path.isdir(images):
            raise WbcidError(f"--images {images}: no such folder (the one the run's images were moved to)")
        store = cls(folder)
        fresh = not store.path.is_file()
        if fresh:  # checked before the review's folder and database are made
            rows = located(rows, run, made_in, images)
        if (why := unwritable(folder)) is not None:
            if fresh or writing:
                raise WbcidError(
                    f"{folder}: cannot write there ({why}), and the review keeps its corrections there: copy the "
                    f"run to a folder you can write and review the copy"
                    f"{'' if fresh else '; `wbcid review --export` reads the corrections made so far'}"
                )
            store.path = store._snapshot()
            log.warning("%s cannot be written (%s): the review is read as it is now", folder, why)
        folder.mkdir(parents=True, exist_ok=True)
        try:
            with store._connect() as db:
                db.executescript(SCHEMA)
                db.execute("BEGIN IMMEDIATE")  # two reviews started at once on a new run imported its cells twice
                if "why" not in {column[1] for column in db.execute("PRAGMA table_info(cells)")}:  # begun before it
                    db.execute("ALTER TABLE cells ADD COLUMN why TEXT")
                if db.execute("SELECT COUNT(*) FROM cells").fetchone()[0] == 0:
                    db.executemany(
                        "INSERT INTO cells (image, specimen, box, model_label, confidence, ood_score, flagged, "
                        "why, label) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        rows if fresh else located(rows, run, made_in, images),
                    )
                    if carried := _carry_earlier(db, meta.get("model"), made_in):
                        meta["carried"] = carried
                    db.executemany(
                        "INSERT OR REPLACE INTO meta VALUES (?, ?)",
                        [(k, json.dumps(v)) for k, v in {**meta, "run": str(run), "folder": store.here}.items()],
                    )
        except sqlite3.DatabaseError as exc:  # damaged, or another program's file: never overwritten here
            raise WbcidError(
                f"{folder / REVIEW_DATABASE} is not a readable review database ({exc}); it may hold corrections, "
                "so it is left as it is: move it aside to start the review afresh"
            ) from exc
        store.began_in = store.meta("folder")  # None for a review begun before wbcid recorded it
        if images is not None:
            store._images_moved_to(images)
        if (moved_to := store.meta("images_from")) is not None:
            root = store._recorded_root()
            store.images_from = (root, moved_to)
            if images is not None:
                log.info("the run's images are also looked for in %s, laid out as below %s", images, root)
        if store.began_in not in (None, store.here):
            log.info("the review began in %s: images are also looked for where they lay relative to it", store.began_in)
        return store

    def _snapshot(self) -> Path:
        """A copy of the database and its write-ahead log (corrections not yet moved into the database)
        in a temporary folder, removed at exit: SQLite cannot open a WAL database where it cannot write."""
        copy = Path(tempfile.mkdtemp(prefix="wbcid-review-"))
        atexit.register(shutil.rmtree, copy, ignore_errors=True)
        for name in (REVIEW_DATABASE, f"{REVIEW_DATABASE}-wal"):
            if (self.folder / name).is_file():
                shutil.copyfile(self.folder / name, copy / name)
        return copy / REVIEW_DATABASE

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        with closing(sqlite3.connect(self.path, timeout=30)) as db:
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")  # WAL: durable against a killed process, fast commits
            with db:  # one transaction: committed on success, rolled back on error
                yield db

    def meta(self, key: str, default: object = None) -> object:
        with self._connect() as db:
            row = db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return default if row is None else json.loads(row["value"])

    def made_by(self) -> str | None:
        """The model that made the run, as recorded (a path, relative to where it ran), or None: the
        bundled model, several models (a merged CSV), or a CSV reviewed before wbcid recorded it."""
        model = self.meta("model") if self.meta("kind") else None
        return None if model in (None, describe_model(None)) or SEVERAL in model else model

    def cells(self) -> list[dict]:
        """All cells, flagged and least confident first (the review queue's order)."""
        with self._connect() as db:
            rows = db.execute(f"{SELECT_CELLS} ORDER BY flagged DESC, confidence ASC, id").fetchall()
        return [self._cell(row) for row in rows]

    def cell(self, cell_id: int) -> dict:
        with self._connect() as db:
            row = db.execute(f"{SELECT_CELLS} WHERE id = ?", (cell_id,)).fetchone()
        if row is None:
            raise KeyError(cell_id)
        return self._cell(row)

    def set_label(self, cell_id: int, label: str | None, reviewer: str = "", version: int | None = None) -> dict:
        """Record a person's label (``None``: undo the review, back to the model's call). ``version``:
        the cell's version the person saw; if it changed since (another reviewer, another tab), nothing
        is written and the error says what the cell is now."""
        if label is not None and label not in LABELS:
            raise WbcidError(f"label must be one of {', '.join(LABELS)}, not {label!r}")
        now = datetime.now(UTC).isoformat(timespec="seconds")
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")  # read and write as one: no change can slip in between
            row = db.execute(f"{SELECT_CELLS} WHERE id = ?", (cell_id,)).fetchone()
            if row is None:
                raise KeyError(cell_id)
            if version is not None and version != row["version"]:
                now_is = f"verified as {row['label']} by {row['reviewer']}" if row["reviewed"] else "not verified"
                raise ChangedMeanwhile(
                    f"cell {cell_id} was changed since this page showed it (now {now_is}): nothing was saved; "
                    "look at it again"
                )
            new_label, reviewed = (row["model_label"], 0) if label is None else (label, 1)
            _change(db, cell_id, (row["label"], row["reviewed"]), new_label, reviewed, reviewer, now)
            return self._cell(db.execute(f"{SELECT_CELLS} WHERE id = ?", (cell_id,)).fetchone())

    def audit(self) -> list[dict]:
        """Every change in the order made, undone ones too, each with the image its cell comes from
        (the trail a laboratory keeps of who changed which result, and when)."""
        with self._connect() as db:
            rows = db.execute(
                "SELECT audit.id AS change, audit.at, audit.reviewer, cell_id, cells.image, old_label, old_reviewed, "
                "new_label, new_reviewed FROM audit JOIN cells ON cells.id = audit.cell_id ORDER BY audit.id"
            )
            return [dict(row) for row in rows]

    def _cell(self, row: sqlite3.Row) -> dict:
        cell = dict(row)
        cell["box"] = json.loads(cell["box"]) if cell["box"] else None
        cell["flagged"], cell["reviewed"] = bool(cell["flagged"]), bool(cell["reviewed"])
        cell["image"] = cell["field"] = self._now_at(cell["image"])
        return cell

    def _now_at(self, image: str) -> str:
        """Where an image is now: where the run recorded it or, for a run moved together with its images
        (to another disk, or a workstation that mounts them elsewhere), at the same place relative to the
        review's folder as when the review began, or below the folder ``--images`` named (the database
        keeps the recorded path)."""
        candidates = []
        if self.began_in not in (None, self.here):
            candidates.append(relocated(image, self.began_in, self.here))
        if self.images_from is not None:
            candidates.append(relocated(image, *self.images_from))
        return first_file(candidates, image)

    def _images_moved_to(self, folder: str | os.PathLike) -> None:
        """Look for the run's images under ``folder`` (``wbcid review --images``), laid out below it as
        they were below their common folder; recorded for the review's later starts."""
        with self._connect() as db:
            db.execute("INSERT OR REPLACE INTO meta VALUES ('images_from', ?)", (json.dumps(os.path.abspath(folder)),))

    def _recorded_root(self) -> str:
        """The folder the run's images were recorded under."""
        with self._connect() as db:
            return common_folder([row[0] for row in db.execute("SELECT DISTINCT image FROM cells")])

    def differential(self) -> dict:
        """The live differential: reviewed labels, and the model's for unflagged cells nobody reviewed.

        Shaped like ``counts.json``'s totals, plus ``verified`` / ``to_review`` counts, and one
        entry per specimen in ``specimens`` when the run has several.
        """
        cells = self.cells()
        reference = {k: tuple(v) for k, v in self.meta("reference", REFERENCE_RANGES).items()}
        totals = _totals(cells, reference)
        specimens = sorted({c["specimen"] for c in cells})
        if len(specimens) > 1:
            totals["specimens"] = {s: _totals([c for c in cells if c["specimen"] == s], reference) for s in specimens}
        return totals

    def thumbnail(self, cell_id: int) -> Path:
        """The cell's picture (cut from its field with some context), made once and cached."""
        path = self.folder / "thumbs" / f"{cell_id}.jpg"
        if not path.is_file():
            _cut_thumbnail(self.cell(cell_id), path)
        return path

    def field_view(self, cell_id: int) -> Path:
        """The cell's whole field with its box drawn (a cell image as it is), made once and cached."""
        cell = self.cell(cell_id)
        path = self.folder / "fields" / f"{cell_id}.jpg"
        if not path.is_file():
            image = _field(cell)
            if cell["box"]:
                ImageDraw.Draw(image).rectangle(cell["box"], outline="#00e5ff", width=max(2, max(image.size) // 200))
            image.thumbnail((960, 960))
            _save_atomic(image, path)
        return path

    def missing(self, images: Iterable[str] | None = None) -> set[str]:
        """The run's images (or those of ``images``) that are not on disk (moved or deleted since the
        review started): their cells stay in the differential and can be labelled, but have no
        picture to show or export."""
        images = {cell["image"] for cell in self.cells()} if images is None else set(images)
        return {image for image in images if not os.path.isfile(image)}

    def make_thumbnails(self) -> int:
        """Cut every thumbnail not yet cut (the server does this once at start) whose image is there;
        returns how many. In threads: 381 BCCD cells took 0.83 s, 1.58 s one at a time."""
        cells = self.cells()
        gone = self.missing(c["image"] for c in cells)
        cut = self.folder / "thumbs"
        todo = [c for c in cells if c["image"] not in gone and not (cut / f"{c['id']}.jpg").is_file()]
        work = map_ahead(lambda cell: _cut_thumbnail(cell, cut / f"{cell['id']}.jpg"), todo)
        for _ in tqdm(work, total=len(todo), desc="cutting thumbnails", disable=None, leave=False):
            pass
        return len(todo)


def _cut_thumbnail(cell: dict, path: Path) -> None:
    patch = cell_image(cell)
    patch.thumbnail((THUMB, THUMB))
    _save_atomic(patch, path)


def cell_image(cell: dict) -> Image.Image:
    """The cell as a picture: its box with context from the field, or the cell image itself."""
    image = _field(cell)
    if not cell["box"]:
        return image
    x0, y0, x1, y1 = cell["box"]
    half = CONTEXT * max(x1 - x0, y1 - y0) / 2
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    return image.crop(
        (
            max(0, round(cx - half)),
            max(0, round(cy - half)),
            min(image.width, round(cx + half)),
            min(image.height, round(cy + half)),
        )
    )


def _totals(cells: list[dict], reference: dict) -> dict:
    counted = [c["label"] for c in cells if c["label"] != OTHER and (c["reviewed"] or not c["flagged"])]
    flagged = [c for c in cells if c["flagged"] and not c["reviewed"]]
    totals = differential(counted, reference) | {
        "detected": len(cells),
        "flagged": len(flagged),
        "verified": sum(c["reviewed"] for c in cells),
        "to_review": sum(not c["reviewed"] for c in cells),
        "other": sum(c["label"] == OTHER for c in cells),
    }
    for name, row in totals["classes"].items():
        row["flagged_closest"] = sum(c["model_label"] == name for c in flagged)
    return totals


def _field(cell: dict) -> Image.Image:
    """The image a cell was found in; one that has gone since the review started is a clear error."""
    try:
        return open_field(cell["image"])[0]
    except OSError as exc:
        raise WbcidError(f"cannot read {cell['image']} ({exc}): moved or deleted? put it back to see the cell") from exc


def _change(
    db: sqlite3.Connection,
    cell_id: int,
    before: tuple[str, int],
    label: str,
    reviewed: int,
    reviewer: str | None,
    at: str,
) -> None:
    """Set a cell's label (``reviewed``: a person's, else back to the model's) and add its audit row
    (``before``: the label and reviewed flag it had), in the caller's transaction."""
    db.execute(
        "UPDATE cells SET label = ?, reviewed = ?, reviewer = ?, reviewed_at = ? WHERE id = ?",
        (label, reviewed, reviewer if reviewed else None, at if reviewed else None, cell_id),
    )
    db.execute(
        "INSERT INTO audit (cell_id, old_label, old_reviewed, new_label, new_reviewed, reviewer, at) "
        "VALUES (?, ?, ?, ?, ?, ?, ?)",
        (cell_id, *before, label, reviewed, reviewer, at),
    )


def _carry_earlier(db: sqlite3.Connection, model: str | None, made_in: dict | None) -> str | None:
    """Import as verified the cells of a new run that were verified in the reviews whose exports taught
    its model (:mod:`wbcid.web.earlier`), each with its reviewer and time in the audit trail; returns
    what the page says of them, or None."""
    if not model or SEVERAL in model:
        return None
    verdicts, exports = earlier_verdicts(model, (made_in or {}).get("cwd"))
    rows = {row["id"]: row for row in db.execute("SELECT id, image, box, model_label FROM cells")}
    found = matches(
        ((i, row["image"], row["box"] and tuple(json.loads(row["box"]))) for i, row in rows.items()), verdicts
    )
    now = datetime.now(UTC).isoformat(timespec="seconds")
    for cell_id, verdict in found.items():
        before = (rows[cell_id]["model_label"], 0)
        _change(db, cell_id, before, verdict.label, 1, verdict.reviewer, verdict.reviewed_at or now)
    if not found:
        return None
    note = (
        f"{len(found)} cell(s) verified in an earlier round ({', '.join(map(str, exports))}) are shown verified "
        "as they were then; undo one to verify it again"
    )
    log.info(note)
    return note


def _save_atomic(image: Image.Image, path: Path) -> None:
    """Write ``path`` whole or not at all. The half-written file is this thread's own: two reviews of a
    run started at once cut the same thumbnails, and one's rename took the other's file (FileNotFoundError)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.stem}.{os.getpid()}-{threading.get_ident()}.partial.jpg")
    try:
        image.convert("RGB").save(partial, quality=90)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
