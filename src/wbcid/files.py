"""Files in and out: the images a command is given, the CSV tables users name, and the folders and
files a command writes, checked before any work so that a mistake fails at once and never
overwrites finished work (a training's run, a count being reviewed).
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO, TypeVar

import pandas as pd

from .errors import WbcidError

try:
    import fcntl
except ImportError:  # Windows: logs are not locked
    fcntl = None

log = logging.getLogger("wbcid")
T = TypeVar("T")

# what Pillow reads without plug-ins (its wheels bring JPEG 2000 and AVIF); .jfif is JPEG as Windows names it
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".jfif", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".jp2", ".j2k", ".avif"}
# images it cannot read (phones' HEIC, camera raw, DICOM, whole-slide scans): left out of a folder with a warning
UNREAD_SUFFIXES = {".heic", ".heif", ".dng", ".cr2", ".nef", ".arw", ".dcm", ".svs", ".ndpi", ".mrxs", ".czi", ".vsi"}
UNREAD_ADVICE = "save them as JPEG, PNG or TIFF (a whole-slide scan: cut it into fields)"
COUNT_LOG = "fields.jsonl"  # a count's log of finished fields (for --resume): it marks a `wbcid count` folder
REVIEW_DATABASE = "review.sqlite"  # a review's corrections: marks its folder (and a count folder under review)
OUTPUT_MARKERS = {COUNT_LOG: "a count", REVIEW_DATABASE: "a review", "model.pt": "a model's run"}
EXPORT_FILES = {"manifest.csv", "counts.json"}  # only a review's export holds both (review_export)
FIGURES = re.compile(r"(^confusion_matrix|^history|_gradcam_[a-z]+)\.png$")  # what evaluate, train, explain draw
PREDICTION_COLUMNS = {"path", "label", "probability", "ood_score", "flagged"}  # of every `wbcid predict` CSV


def output_folder(path: str | os.PathLike, what: str, run: bool = False, replaces: Sequence[str] = ()) -> Path:
    """``path`` as the folder a command writes ``what`` into, checked before any work: a file in
    the way would otherwise fail only at the end, losing the work. A run (``run=True``: training,
    adaptation) goes only into a new or empty folder; anything else never into a model's run
    directory (an evaluation there replaced the training's own report.md). ``replaces``: the files
    ``what`` writes there, the first marking an earlier one, which is replaced; the others there
    without it are someone else's (a lab's own report.md was replaced by an evaluation's), refused."""
    path = makeable(path)
    if path.exists() and not path.is_dir():
        raise WbcidError(f"{path} is a file; --out takes the folder to write {what} into")
    if run and path.is_dir() and any(path.iterdir()):  # an adapted run, an evaluation, the data itself...
        raise WbcidError(
            f"{path} already exists and is not empty; choose another --out (a run is written into a new or "
            "empty folder, never over one)"
        )
    if not run and (path / "model.pt").is_file():
        raise WbcidError(
            f"{path} is a model's run directory; write {what} into another folder (a subfolder of it will do)"
        )
    if replaces and not (path / replaces[0]).exists() and (found := [n for n in replaces if (path / n).exists()]):
        raise WbcidError(
            f"{path} holds {', '.join(found)}, which {what} would replace, and no {replaces[0]} of an earlier "
            f"one: choose another --out"
        )
    return path


def output_file(path: str | os.PathLike, example: str) -> Path:
    """``path`` as the file a command writes, checked before any work (see :func:`output_folder`)."""
    path = makeable(path)
    if path.is_dir():
        raise WbcidError(f"{path} is a folder; --out takes the file to write, e.g. {path / example}")
    return path


def prediction_output(path: str | os.PathLike) -> Path:
    """``path`` as the CSV ``predict`` writes: an earlier prediction there (or an empty file, as
    ``mktemp`` makes) is replaced, any other file refused (``--out cells.csv`` in a data folder
    replaced the lab's manifest with predictions)."""
    path = output_file(path, "predictions.csv")
    if path.is_file() and path.stat().st_size:
        try:
            with path.open(newline="", errors="replace") as handle:
                header = set(next(csv.reader(handle), []))
        except (OSError, csv.Error):
            header = set()
        if not PREDICTION_COLUMNS <= header:
            raise WbcidError(
                f"{path} exists and is not an earlier `wbcid predict` CSV, which is all predict replaces; "
                "choose another --out"
            )
    return path


def relocated(path: str, then: str, now: str) -> str:
    """Where ``path``, recorded when a run's folder was ``then``, lies now that the folder is ``now``,
    if the run was moved together with what it records (another disk, a workstation that mounts the
    lab's share elsewhere): a path to check, not one known to exist."""
    try:
        return os.path.normpath(os.path.join(now, os.path.relpath(path, then)))
    except ValueError:  # Windows: another drive than the one the run was on
        return path


def moved_with(path: str, then: str | None, now: str | None) -> str:
    """``path`` as recorded or, where it is gone and was recorded by a run made in ``then`` and now in
    ``now`` (a lab's folder moved to another disk or workstation with what the run records), where it
    lay relative to the run: a path to check, not one known to exist."""
    return relocated(path, then, now) if then and now and not os.path.exists(path) else path


def first_file(candidates: Iterable[T], default: T | None = None) -> T | None:
    """The first of ``candidates`` that is a file, else ``default``: where a recorded path is looked for
    (as recorded, then where it lies now that its run, or the images alone, moved)."""
    return next((path for path in candidates if os.path.isfile(path)), default)


def makeable(path: str | os.PathLike) -> Path:
    """``path``, if its folders can be made: a file where one of them should be (a typing slip in
    --out) failed only when the results were written, after all the work, and with a traceback."""
    path = Path(path)
    existing = next((parent for parent in path.parents if parent.exists()), None)
    if existing is not None and not existing.is_dir():
        raise WbcidError(f"{existing} is a file, so {path} cannot be made inside it: name another output")
    if (why := unwritable(path)) is not None:  # a read-only share: adapt failed after training, at the end
        raise WbcidError(f"cannot write {path} ({why}): name an output in a folder of yours")
    return path


def unwritable(path: str | os.PathLike) -> str | None:
    """Why nothing can be written at ``path`` (made there if missing), tried in its nearest existing
    folder: a read-only disk or share, another user's folder; ``None`` where it can be."""
    folder = next(p for p in [Path(path).absolute(), *Path(path).absolute().parents] if p.is_dir())
    try:
        with tempfile.TemporaryFile(dir=folder):
            return None
    except OSError as exc:
        return exc.strerror or str(exc)


def short_name(name: str, limit: int = 150) -> str:
    """``name`` cut to at most ``limit`` UTF-8 bytes: output files named after an input (with a prefix
    or suffix added) then stay within the 255 bytes most file systems allow a name."""
    return name.encode()[:limit].decode(errors="ignore")


def prediction_review(predictions: str | os.PathLike) -> Path:
    """The folder beside a `wbcid predict` CSV that holds its review (database, thumbnails, export)."""
    return Path(predictions).with_suffix(".review")


def refuse_reviewed(run: Path, review: Path) -> None:
    """Keep a run under review: its review (in ``review``) imported the run's cells once, so a new run
    written over it would be shown and exported as the old (checked before any work)."""
    if run.exists() and (review / REVIEW_DATABASE).is_file():
        kind = "folder" if run.is_dir() else "file"
        where = "" if review == run else f" in {review}"
        raise WbcidError(
            f"{run} is under review{where}, and the review imported its cells once: write the new run to another "
            f"{kind}, or move {review / REVIEW_DATABASE} (the corrections) aside first"
        )


Settings = dict[str, tuple[str, Callable[[Any], str]]]  # a setting's key: its name for people, how to show a value


def finished_work(
    log_path: Path, settings: dict, words: Settings, elsewhere: str, unrecorded: dict | None = None
) -> dict:
    """What a resumable command (count, predict) finished before it was stopped, by ``path``: its log
    holds one JSON object per line, the first the command's settings, so results of two settings are
    never mixed (``words`` names and shows each; ``elsewhere`` says where to write instead;
    ``unrecorded``: the settings of logs written before they were recorded). A last line cut short
    by a crash mid-write is removed from the file, and its work done again."""
    if not log_path.exists():
        return {}
    text = log_path.read_text()
    rows = text.splitlines(keepends=True)
    lines = []
    for number, line in enumerate(rows):
        try:
            lines.append(json.loads(line))
        except json.JSONDecodeError:
            if number < len(rows) - 1 or line.endswith("\n"):
                raise WbcidError(f"{log_path}: line {number + 1} is damaged; {elsewhere}") from None
            log.warning("%s: the last entry was cut short by an interruption; doing it again", log_path)
            log_path.write_text(text[: len(text) - len(line)])
    before = (unrecorded or {}) | (lines[0] if lines else settings)
    if changed := [
        f"{label} {show(before[key]) if key in before else 'not recorded'}, now {show(settings[key])}"
        for key, (label, show) in words.items()
        if before.get(key) != settings[key]
    ]:
        raise WbcidError(
            f"{log_path} was made with other settings ({'; '.join(changed)}); --resume continues the same "
            f"command on the same inputs: {elsewhere}"
        )
    return {entry["path"]: entry for entry in lines[1:]}


def logged_settings(log_path: Path) -> dict:
    """The settings a resumable command's log (:func:`finished_work`) begins with; ``{}`` before there are any."""
    try:
        with log_path.open() as handle:
            return json.loads(handle.readline())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


@contextmanager
def appending(log_path: Path, settings: dict) -> Iterator[TextIO]:
    """``log_path`` (see :func:`finished_work`) opened to append to, by this command alone (a second
    command resumed into the same output at once redid the first one's work and wrote it twice),
    beginning with ``settings`` where it is still empty (only there: a count stopped before its
    first field logged them again when resumed, and every later --resume failed on them)."""
    with log_path.open("a") as handle:
        _alone(handle, log_path)
        if not log_path.stat().st_size:
            handle.write(json.dumps(settings) + "\n")
            handle.flush()
        yield handle


def restate(log_path: Path, settings: dict) -> None:
    """Replace the settings ``log_path`` (see :func:`finished_work`) begins with by ``settings``: a
    resumed count whose inputs gained specimens records their scales, so a later resume goes on at
    them. Atomic (a crash leaves the old log whole), and only while no other command writes into it."""
    with log_path.open("a") as handle:
        _alone(handle, log_path)
        partial = log_path.with_name(log_path.name + ".partial")
        partial.write_text(json.dumps(settings) + "\n" + log_path.read_text().split("\n", 1)[1])
        os.replace(partial, log_path)


@contextmanager
def one_at_a_time(folder: Path) -> Iterator[None]:
    """Hold ``folder``'s lock, waiting for it: two writers replacing one output in it at once (two
    exports of a review) deleted each other's half-written files. Made where it does not exist yet."""
    folder.mkdir(parents=True, exist_ok=True)
    if fcntl is None:  # Windows: not locked
        yield
        return
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)  # releases the lock


def _alone(handle: TextIO, log_path: Path) -> None:
    """Lock ``log_path``'s open ``handle`` for this command alone (released when it closes)."""
    if fcntl is None:
        return
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise WbcidError(
            f"another wbcid command is writing into {log_path} now: let it finish, or stop it, first"
        ) from None


def refuse_count_folder(path: Path, labelled: bool = False) -> None:
    """Stop where a `wbcid count` folder is named as input: read as data it looked like the original
    JSON layout (its counts.json) and found no labels, and searched for images it gave its own
    annotated fields and cut cells. ``labelled``: it was named as verified cells, so say where those are."""
    if not (path.is_dir() and (path / COUNT_LOG).is_file()):
        return
    if not labelled:
        raise WbcidError(
            f"{path} is the output of `wbcid count` (annotated fields and cut cells): pass the smear fields "
            "or cell images themselves"
        )
    raise model_labelled(path, "count", path)


def review_export(folder: Path) -> bool:
    """Whether ``folder`` is an export of a review (`wbcid review --export`, the page's Export button):
    only an export holds a manifest.csv beside a counts.json."""
    return all((folder / name).is_file() for name in EXPORT_FILES)


def model_labelled(output: Path, command: str, review: Path) -> WbcidError:
    """The refusal of a command's output named as verified cells, saying where its verified cells are
    (``review``: the folder the review page exports into) or how to make them."""
    export = review / "verified"  # where the review page's Export button writes
    then = (
        f"pass {export}, its exported review"
        if review_export(export)
        else f"verify them with `wbcid review {output}`, export them and pass the export"
    )
    return WbcidError(
        f"{output} is the output of `wbcid {command}`: its cells carry the model's labels, not verified ones; {then}"
    )


Inputs = str | os.PathLike | Sequence[str | os.PathLike]  # what predict, count and explain are given


def input_paths(paths: Inputs) -> list[Path]:
    """``paths`` as a list: one folder or file may be given as it is (iterated, a string gave its letters)."""
    return [Path(paths)] if isinstance(paths, (str, os.PathLike)) else [Path(p) for p in paths]


def list_images(paths: Inputs) -> list[Path]:
    """Expand files and folders (recursively) into image files, sorted; for prediction."""
    paths = input_paths(paths)
    if not paths:
        raise WbcidError("no images or folders given")
    found: list[Path] = []
    outputs: dict[Path, str] = {}
    unread: Counter[str] = Counter()
    for p in paths:
        refuse_count_folder(p)
        if p.is_dir():
            found += _images_in(p, outputs, unread)
        elif p.is_file():
            found.append(p)
        else:
            raise WbcidError(f"no such file or folder: {p}")
    if outputs:
        log.warning(
            "left out wbcid's own output in the folders searched (its images are not new cells): %s",
            "; ".join(f"{folder} ({what})" for folder, what in sorted(outputs.items())),
        )
    formats = ", ".join(f"{n} {suffix}" for suffix, n in sorted(unread.items()))
    if not found:
        also = f"; {formats} file(s) in formats wbcid does not read: {UNREAD_ADVICE}" if unread else ""
        raise WbcidError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {', '.join(map(str, paths))}{also}")
    if unread:
        log.warning("left out images in formats wbcid does not read (%s): %s", formats, UNREAD_ADVICE)
    first: dict[str, Path] = {}
    for path in found:
        first.setdefault(os.path.realpath(path), path)
    once = list(first.values())
    if again := len(found) - len(once):  # a field named and in its folder too was counted twice in a differential
        log.warning("%d image(s) given more than once (named, and in a folder given too?): each is read once", again)
    return once


def _images_in(folder: Path, outputs: dict[Path, str], unread: Counter[str]) -> list[Path]:
    """Image files under ``folder``, sorted, without the folders wbcid wrote (added to ``outputs``): a
    count's annotated fields and cut cells, a review's thumbnails or a run's plots, searched as input,
    were classified as cells (a count resumed into a folder inside its input counted its own output);
    so were a review's export found below ``folder`` (its cells counted as a specimen of 40 fields; named
    itself, its cells are meant), an evaluation's confusion matrix and explain's Grad-CAM images
    (``FIGURES``), which no marker file stands beside. Images in formats it cannot read are counted
    in ``unread`` by suffix (they were left out unsaid). Linked folders are searched (a slide's folder
    linked into a lab's tree was skipped without a word), each real folder once (a link back up the
    tree, or two links)."""
    found, seen = [], set()
    for root, folders, files in os.walk(folder, followlinks=True):
        if (real := os.path.realpath(root)) in seen:
            folders.clear()
            continue
        seen.add(real)
        what = next((what for marker, what in OUTPUT_MARKERS.items() if marker in files), None)
        if what is None and Path(root) != folder and EXPORT_FILES <= set(files):  # named itself, its cells are meant
            what = "a review's export"
        if what:
            outputs[Path(root)] = what
            folders.clear()
            continue
        folders[:] = [f for f in folders if not hidden(f)]
        suffixes = [(f, Path(f).suffix.lower()) for f in files if not hidden(f)]
        images = [f for f, suffix in suffixes if suffix in IMAGE_SUFFIXES]
        kept = [f for f in images if not FIGURES.search(f)]
        if figures := len(images) - len(kept):
            outputs[Path(root)] = f"{figures} figure(s) drawn by evaluate, train or explain"
        found += [Path(root) / f for f in kept]
        unread.update(suffix for _, suffix in suffixes if suffix in UNREAD_SUFFIXES)
    return sorted(f for f in found if f.is_file())


def hidden(name: str) -> bool:
    """A file or folder no one put there as data: macOS's "._field.jpg" beside every image copied to
    a USB stick (not an image, though named one), ".DS_Store", ".ipynb_checkpoints"."""
    return name.startswith(".")


def read_table(csv_path: Path, **options) -> pd.DataFrame:
    """A CSV a user named (empty cells stay empty strings), or a clear message if it is not one. Not
    UTF-8, it is read as Windows-1252: what Excel's plain "CSV" saves in Western European locales
    (``neutrófilos`` as one byte per letter)."""
    try:
        try:
            return pd.read_csv(csv_path, keep_default_na=False, **options)
        except UnicodeDecodeError:
            log.info("%s: not UTF-8, read as Windows-1252 (Excel's CSV)", csv_path)
            return pd.read_csv(csv_path, keep_default_na=False, encoding="cp1252", **options)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
        raise WbcidError(f"{csv_path}: not a readable CSV ({str(exc).strip()})") from exc
