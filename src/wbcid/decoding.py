"""Images in: decoding into the model's input, in threads ahead of the network.

Cells are read here: :func:`image_batches` streams them (prediction, evaluation), :func:`load_images`
holds a whole set in memory (training, adaptation); :func:`map_ahead` also runs a count's fields in
threads. A file that is not a readable image is never an exception: it becomes ``None``, or a row
marked unreadable, counted and reported by the caller.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple, TypeVar

import numpy as np
from PIL import Image

from .crop import BLACK
from .data import CellSet
from .errors import WbcidError
from .preprocess import Preprocess, upright_rgb

if TYPE_CHECKING:
    import torch

log = logging.getLogger("wbcid")

UNREADABLE = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)  # what PIL raises for a bad file
GREY_MODES = ("1", "L", "LA", "I", "I;16", "F")  # stored without colour: see GREY_REASON
GREY_REASON = "WBC types are told apart by their stain colours"
PROBLEMS = {  # what can be wrong with a readable picture (its key in Batch.problem): flagged, and said
    "grey": f"grey-scale image: {GREY_REASON}",
    "pages": "the file holds several images (pages or frames): only the first is read; save each as a file of its own",
    "blank": "image is a single flat colour (blank)",
    "dark": "image is nearly black, no part of it lit (lamp, shutter or exposure?)",
}
AHEAD = 2  # batches decoded ahead of the network in image_batches
T, R = TypeVar("T"), TypeVar("R")


class Batch(NamedTuple):
    """Cells as the network takes them (uint8 NCHW), which files could be read, and what is wrong
    with each readable picture (a key of ``PROBLEMS``, or ""); an unreadable file is zeros."""

    images: np.ndarray
    readable: np.ndarray
    problem: np.ndarray


def decode_image(path: str | os.PathLike, prep: Preprocess) -> np.ndarray:
    """Decode any PIL-readable image into the model's input (see :class:`wbcid.preprocess.Preprocess`).

    Grey, palette, 16-bit and RGBA images become RGB.
    """
    return _decode(path, prep)[0]


def pictures(image: Image.Image) -> int:
    """How many pictures a file holds: its frames (pages) of the first one's size. A camera's JPEG with
    a preview (MPO: Pillow reads 2 frames) or a TIFF with a reduced-resolution page holds one (both were
    said to hold several); a z-stack, or a TIFF of several cells or fields, several. Left at frame 0."""
    if getattr(image, "n_frames", 1) == 1:
        return 1
    first, same = image.size, 0
    for frame in range(image.n_frames):
        image.seek(frame)
        same += image.size == first
    image.seek(0)
    return same


def blank_or_dark(image: Image.Image) -> str:
    """Whether an RGB picture shows nothing: "blank" (one flat colour), "dark" (no part of it lit) or "".
    Block means first: a camera's hot pixels are bright in a dark frame too, and the copy is 64 blocks
    across, so this costs 2 % of a cell's decoding."""
    means = image.reduce(max(1, min(image.size) // 64)).getextrema()
    if all(low == high for low, high in means) and all(low == high for low, high in image.getextrema()):
        return "blank"
    return "dark" if max(high for _, high in means) < BLACK else ""


def _decode(path: str | os.PathLike, prep: Preprocess) -> tuple[np.ndarray, str]:
    """:func:`decode_image` and what is wrong with the picture (a key of ``PROBLEMS``, or ""), from one
    opening of the file."""
    with Image.open(path) as img:
        problem = "grey" if img.mode in GREY_MODES else "pages" if pictures(img) > 1 else ""
        if not prep.crop:
            img.draft("RGB", (prep.size, prep.size))  # JPEG: decode at a reduced scale, several times faster
        image = upright_rgb(img)
        return prep.frame(image), problem or blank_or_dark(image)


def map_ahead(
    function: Callable[[T], R], items: Iterable[T], workers: int | None = None, ahead: int = 8
) -> Iterator[R]:
    """``map(function, items)`` in ``workers`` threads (default: one per core), results in order.

    At most ``ahead`` items are in flight, so memory stays bounded however many there are, and an
    interruption cancels what has not started. Threads suffice: Pillow, NumPy, SciPy and ONNX
    Runtime release the GIL in the work that dominates.
    """
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        pending: deque[Future[R]] = deque()
        try:
            for item in items:
                pending.append(pool.submit(function, item))
                if len(pending) > ahead:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()


def image_batches(
    paths: Sequence[Path], prep: Preprocess, batch_size: int = 64, workers: int | None = None
) -> Iterator[Batch]:
    """Yield the cells as :class:`Batch` objects of ``batch_size`` images, in order.

    Decoding runs in threads up to ``AHEAD`` batches in front of the consumer, so it overlaps
    the network.
    """
    blank = np.zeros((prep.size, prep.size, 3), np.uint8), ""
    decoded = map_ahead(lambda path: _try_decode(path, prep), paths, workers, AHEAD * batch_size)
    while items := list(itertools.islice(decoded, batch_size)):
        images, problem = zip(*(blank if item is None else item for item in items))
        readable = np.array([item is not None for item in items])
        yield Batch(np.stack(images).transpose(0, 3, 1, 2), readable, np.array(problem, dtype=object))


def load_images(cellset: CellSet, prep: Preprocess, desc: str = "decoding") -> tuple[torch.Tensor, CellSet]:
    """Decode a whole cell set into memory once (training reads every image every epoch).

    Unreadable images are dropped from the returned set and counted in its ``skipped``.
    """
    import torch
    from tqdm.auto import tqdm

    batch_size = 64
    batches = list(
        tqdm(
            image_batches(cellset.paths, prep, batch_size),
            total=-(-len(cellset) // batch_size),
            desc=desc,
            leave=False,
            disable=None,
        )
    )
    ok = [bool(k) for batch in batches for k in batch.readable]
    kept = cellset.subset(ok)
    problems = np.concatenate([batch.problem for batch in batches])
    for problem, message in PROBLEMS.items():
        if found := [p for p, k in zip(cellset.paths, problems) if k == problem]:
            log.warning("%s: %d image(s) with a problem, e.g. %s: %s", cellset.origin, len(found), found[0], message)
    bad = ok.count(False)
    if bad:
        kept.skipped["unreadable or not an image"] += bad
        log.warning(
            "%s: skipped %d unreadable image(s), e.g. %s",
            cellset.origin,
            bad,
            next(p for p, k in zip(cellset.paths, ok) if not k),
        )
    if not kept.cells:
        raise WbcidError(f"{cellset.origin}: none of the {len(cellset)} images could be read")
    images = np.concatenate([batch.images[batch.readable] for batch in batches])
    return torch.from_numpy(np.ascontiguousarray(images)), kept


def unreadable_reason(exc: BaseException) -> str:
    """Why a file could not be read (one of ``UNREADABLE``), in a laboratory's words: PIL's limit on
    pixels, a guard against decompression bombs, is met by whole-slide scans, not by fields."""
    if isinstance(exc, Image.DecompressionBombError):
        limit = 2 * (Image.MAX_IMAGE_PIXELS or 0) / 1e6
        return f"more than the {limit:.3g} Mpx wbcid reads: a whole-slide scan? cut it into fields and count those"
    return f"{exc.__class__.__name__}: {exc}"


def why_unreadable(path: str | os.PathLike) -> str:
    """Why the file at ``path`` is not a readable image (:func:`unreadable_reason`), asked again for the
    few that failed: a batch keeps only whether each file could be read. Empty if it reads now."""
    try:
        with Image.open(path) as image:
            image.load()
    except UNREADABLE as exc:
        return unreadable_reason(exc)
    return ""


def try_decode(path: Path, prep: Preprocess) -> np.ndarray | None:
    """:func:`decode_image`, or ``None`` for a file that is not a readable image."""
    decoded = _try_decode(path, prep)
    return None if decoded is None else decoded[0]


def _try_decode(path: Path, prep: Preprocess) -> tuple[np.ndarray, str] | None:
    try:
        return _decode(path, prep)
    except UNREADABLE:
        return None
