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

Constants and where they were chosen (``benchmarks/scale.py`` measures the result on all sources):

* ``RBC_BOX_PER_DISC``: an annotated red-cell box is larger than the granulometric diameter (the
  annotator's box encloses the cell's soft edge); the median ratio on TXL-PBC's BCCD fields.
* ``WBC_PER_RBC``: the WBC diameter the detector expects, per red-cell box: 200 px (the default the
  detector was tuned with on BCCD) over BCCD's median red-cell box, 108 px.
"""

from __future__ import annotations

import numpy as np
from PIL import Image
from scipy import ndimage
from skimage.filters import threshold_multiotsu

from ..crop import unlit

WORK_SIDE = 128  # long side of the copy measured (16 ms per field here)
WORK_SHORT = 96  # ... and its short side at least: a stitched strip's red cells would shrink to specks
MIN_RADIUS = 2  # work pixels; smaller objects are noise and specks
DENSITY_SIGMA = 1  # work pixels of Gaussian smoothing of the optical density
MIN_RED_SHARE = 0.02  # a field whose mask covers less than this has too few red cells to measure
RBC_BOX_PER_DISC = 1.21  # chosen on TXL-PBC's BCCD fields (see the module docstring)
WBC_PER_RBC = 1.85  # 200 / 108, chosen on BCCD


def rbc_diameter(image: Image.Image) -> float | None:
    """Typical red-cell diameter in the image's pixels (as an annotator's box would be), or ``None``
    when the field shows too few red cells to measure."""
    scale = max(WORK_SIDE / max(image.size), WORK_SHORT / min(image.size))  # one rule up to 4:3 (all fields here)
    work = image.convert("RGB").resize(
        (max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.Resampling.BILINEAR
    )
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
    spectrum = _pattern_spectrum(mask)
    spectrum[:MIN_RADIUS] = 0
    if spectrum.sum() == 0:
        return None
    cumulative = np.cumsum(spectrum)
    radius = np.interp(cumulative[-1] / 2, cumulative, np.arange(1, len(spectrum) + 1))
    return float(2 * radius / scale * RBC_BOX_PER_DISC)


def _pattern_spectrum(mask: np.ndarray) -> np.ndarray:
    """Area removed from ``mask`` by opening with a disc of radius r, for r = 1, 2, ...

    Opening by a disc of radius r keeps the pixels within r of a point at least r from the
    background: two distance transforms instead of a slow morphological opening."""
    inside = ndimage.distance_transform_edt(mask)
    areas = [float(mask.sum())]
    for radius in range(1, int(inside.max()) + 1):  # beyond the largest inscribed disc nothing is left
        areas.append(float((ndimage.distance_transform_edt(inside < radius) <= radius).sum()))
    return -np.diff([*areas, 0.0])


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
