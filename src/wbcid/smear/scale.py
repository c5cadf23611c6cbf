"""The scale of a smear field, read from its red cells.

A WBC's size in pixels depends on the objective, the camera and any resizing, and users rarely
know it. Red cells tell it: every field holds many, and they are about 7.5 micrometres across in
every lab. Their size is measured by granulometry (Matheron): openings of the red-cell mask with
discs of growing radius remove each cell once the disc no longer fits in it, so the area removed
per radius (the pattern spectrum) is the size distribution of the discs the mask is made of.
Touching and overlapping cells still open at their own size, specks vanish at the smallest radii,
and the one WBC in a field is a small share of the area. The median of that distribution is the
red-cell diameter.

The red-cell mask: optical density of green (red cells, WBCs and platelets absorb it; the pale
background does not), split by a three-class Otsu into background, red cells and nuclei, holes
(the central pallor) filled; pixels no light reached (the dark ring of a photo through the eyepiece,
:func:`wbcid.crop.unlit`) are neither. The field is first resized to ``WORK_SIDE`` pixels on its long side,
or more where its short side would be under ``WORK_SHORT`` (wider than 4:3: a 16:9 camera, a stitched
strip, whose red cells the long-side rule shrank to specks: in a strip of six BCCD fields they measured
3.9x too large, and the count's scale came out 3.3x too large). Up to 4:3, every field of the
sources here, both rules give the same copy.

That copy resolves the red cells of the fields here (they span 17-32 of its pixels), but not those
of a camera with many more pixels per field (a 5-megapixel camera at 40x, a stitched mosaic): there
they blur into clumps that measure too large (BCCD fields pasted 2x2: +26 %, 6x6: +275 %,
docs/scale.md). Finer copies tell: ``level`` k measures a copy ``2**k`` times finer (from level 2
on, of the field's centre, :func:`region`, as long as that is :func:`measurable`), and
``wbcid count`` takes the coarsest level that the next finer one confirms
(:func:`wbcid.smear.counting.estimate_scale`), as a measurement is trusted once refining the grid no
longer changes it.

Constants and where they were chosen (``benchmarks/scale.py`` measures the result on all sources):

* ``RBC_BOX_PER_DISC``: an annotated red-cell box is larger than the granulometric diameter (the
  annotator's box encloses the cell's soft edge); the median ratio on TXL-PBC's BCCD fields.
* ``WBC_PER_RBC``: the WBC diameter the detector expects, per red-cell box: 200 px (the default the
  detector was tuned with on BCCD) over BCCD's median red-cell box, 108 px.
"""

from __future__ import annotations

from functools import cache

import numpy as np
from PIL import Image
from scipy import ndimage
from skimage.filters import threshold_multiotsu

from ..crop import unlit

WORK_SIDE = 128  # long side of the coarsest copy measured (8-13 ms per field here, docs/scale.md)
WORK_SHORT = 96  # ... and its short side at least: a stitched strip's red cells would shrink to specks
SETTLED = 0.15  # a finer copy confirms the red cells' size within this: the bar docs/scale.md's fields meet
MIN_ACROSS = 4  # red cells a measured region must be high: as many as the smallest fields here (BCCD, PBC: 4.4)
# A copy whose red cells its region would hold fewer than 1.5 times across has merged them into blobs:
# the fewest annotated red cells across a field here are 2.16 (TXL-PBC's raabin; BCCD 3.92, bcd 3.78, pbc 3.40)
MERGED_ACROSS = 1.5
MIN_RADIUS = 2  # work pixels; smaller objects are noise and specks
DENSITY_SIGMA = 1  # work pixels of Gaussian smoothing of the optical density
MIN_RED_SHARE = 0.02  # a field whose mask covers less than this has too few red cells to measure
RBC_BOX_PER_DISC = 1.21  # chosen on TXL-PBC's BCCD fields (see the module docstring)
WBC_PER_RBC = 1.85  # 200 / 108, chosen on BCCD


def rbc_diameter(image: Image.Image, level: int = 0) -> float | None:
    """Typical red-cell diameter in the image's pixels (as an annotator's box would be), measured on
    the copy of ``level`` (module docstring), or ``None`` when the field shows too few red cells."""
    work, scale = work_copy(image, level)
    rgb = np.asarray(work)
    density = ndimage.gaussian_filter(-np.log((rgb[..., 1].astype(np.float32) + 1) / 256), DENSITY_SIGMA)
    # an eyepiece photo's dark ring read as one huge red cell (3.5x the field's red cells, measured on
    # BCCD fields given a ring), and its edge, dense too, closed a hole that filled the field: the
    # unlit pixels are left out, with the 2 sigma of smoothing around them where their darkness leaks in
    lit = ~ndimage.binary_dilation(unlit(rgb), iterations=2 * DENSITY_SIGMA)
    if lit.mean() < MIN_RED_SHARE:  # nearly all dark: too few red cells can show (and Otsu fails on nothing)
        return None
    try:
        background = threshold_multiotsu(density[lit], classes=3)[0]
    except ValueError:  # too few distinct values: blank, tiny or unlit
        return None
    mask = ndimage.binary_fill_holes((density > background) & lit)
    if mask.mean() < MIN_RED_SHARE or mask.all():
        return None
    radius = _median_radius(mask)
    if radius is None:
        return None
    return float(2 * radius / scale * RBC_BOX_PER_DISC)


def rbc_diameters(image: Image.Image) -> list[float | None]:
    """:func:`rbc_diameter` at each level, coarsest first, as far as they are :func:`measurable` (one
    decoded field serves them all). Red cells that a level's region would hold fewer than
    ``MERGED_ACROSS`` times across are blobs merged in a copy too coarse: that level is ``None``, and
    the next, finer one is measured whatever the estimate said (12x12 BCCD fields pasted into one
    image measured 6,710 and 5,480 px on the two whole copies and went no finer: its 'WBCs' 10,136 px
    across found none of its 144)."""
    found: list[float | None] = []
    while True:
        level = len(found)
        rbc = rbc_diameter(image, level)
        merged = rbc is not None and across(image.size, level, rbc) < MERGED_ACROSS
        found.append(None if merged else rbc)
        if rbc is None or not (finer(image.size, level + 1) if merged else measurable(image.size, level + 1, rbc)):
            return found


def confirmed(ladders: list[list[float | None]]) -> float | None:
    """The median red-cell diameter of several fields (their :func:`rbc_diameters`) at the coarsest
    level that the next finer one confirms within ``SETTLED``, or at the finest one measured;
    ``None`` where none was."""
    rbc = None
    for level in range(max(map(len, ladders), default=0)):
        found = [ladder[level] for ladder in ladders if len(ladder) > level and ladder[level] is not None]
        if rbc is None and not found:  # merged at this level in every field: a finer one measures
            continue
        if not found or (rbc is not None and abs(np.median(found) / rbc - 1) < SETTLED):
            break
        rbc = float(np.median(found))
    return rbc


def work_copy(image: Image.Image, level: int = 0) -> tuple[Image.Image, float]:
    """The RGB copy measured at ``level`` and its scale: the whole field at ``WORK_SIDE`` pixels
    (level 0) or twice that (1); from level 2 on, the centre :func:`region` at twice the previous
    level's scale, never finer than the image itself."""
    # a field under WORK_SIDE pixels is enlarged at level 0, as it always was, and no further
    scale = min(max(1.0, _coarsest(image.size)), _coarsest(image.size) * 2**level)
    box = region(image.size, level)
    field = image if box == (0, 0, *image.size) else image.crop(box)
    size = (max(1, round(field.width * scale)), max(1, round(field.height * scale)))
    return field.convert("RGB").resize(size, Image.Resampling.BILINEAR), scale


def region(size: tuple[int, int], level: int) -> tuple[int, int, int, int]:
    """The part of a field measured at ``level``: all of it up to level 1, then a centre crop of half
    the previous one's sides, so that each finer copy costs what level 1 does."""
    side = min(1.0, 2 / 2**level)
    width, height = max(1, round(size[0] * side)), max(1, round(size[1] * side))
    left, top = (size[0] - width) // 2, (size[1] - height) // 2
    return left, top, left + width, top + height


def measurable(size: tuple[int, int], level: int, rbc: float) -> bool:
    """Whether ``level`` shows a field of this size :func:`finer` than the level before, and from level
    2 on (a crop) in a region at least ``MIN_ACROSS`` red cells of ``rbc`` pixels high: fewer measure too
    noisily to confirm anything."""
    return finer(size, level) and (level <= 1 or across(size, level, rbc) >= MIN_ACROSS)


def across(size: tuple[int, int], level: int, rbc: float) -> float:
    """How many red cells of ``rbc`` pixels the region measured at ``level`` holds across its short side."""
    left, top, right, bottom = region(size, level)
    return min(right - left, bottom - top) / rbc


def finer(size: tuple[int, int], level: int) -> bool:
    """Whether ``level`` shows a field of this size finer than the level before (not past its own pixels)."""
    return _coarsest(size) * 2 ** (level - 1) < 1


def _coarsest(size: tuple[int, int]) -> float:
    """Level 0's scale: ``WORK_SIDE`` on the long side, at least ``WORK_SHORT`` on the short one."""
    return max(WORK_SIDE / max(size), WORK_SHORT / min(size))


def _median_radius(mask: np.ndarray) -> float | None:
    """The median of the mask's pattern spectrum beyond ``MIN_RADIUS`` (work pixels; ``None`` for none):
    the radius at which openings have removed half the area left after opening by ``MIN_RADIUS``,
    linear between whole radii.

    Opening by a disc of radius r keeps the pixels within r of a point at least r from the
    background: two distance transforms instead of a slow morphological opening. What an opening
    keeps falls as the radius grows, so the radius is found by bisection: a few openings instead of
    one per radius (the same result for 451 fields at levels 0 to 2, 3.8x faster)."""
    inside = ndimage.distance_transform_edt(mask)
    largest = int(inside.max())  # beyond the largest inscribed disc nothing is left

    @cache
    def kept(radius: int) -> float:
        return float((ndimage.distance_transform_edt(inside < radius) <= radius).sum()) if radius <= largest else 0.0

    half = kept(MIN_RADIUS) / 2
    if half == 0:
        return None
    above, below = MIN_RADIUS, largest + 1  # kept(above) > half >= kept(below)
    while below - above > 1:
        middle = (above + below) // 2
        above, below = (above, middle) if kept(middle) <= half else (middle, below)
    return above + (kept(above) - half) / (kept(above) - kept(below))


def wbc_diameter(rbc: float) -> float:
    """The WBC diameter the detector expects in a field whose red cells are ``rbc`` pixels across."""
    return WBC_PER_RBC * rbc


def annotated_rbc_diameter(boxes: list[tuple[float, float, float, float]], size: tuple[int, int]) -> float:
    """The truth :func:`rbc_diameter` is measured against: the median longer side of a field's annotated
    red-cell boxes that are clear of its border (cut cells would look small); NaN without any."""
    width, height = size
    sides = [
        max(x1 - x0, y1 - y0) for x0, y0, x1, y1 in boxes if x0 > 2 and y0 > 2 and x1 < width - 2 and y1 < height - 2
    ]
    return float(np.median(sides)) if sides else float("nan")
