"""Finding white blood cells in a whole smear field, by their stain.

In every Romanowsky-type stain (Giemsa, Wright, May-Grünwald, Leishman) a WBC nucleus is the
only large object that absorbs much more green than blue light: it looks purple or blue, red
cells look pink-grey and the background is pale. So the detector works on one feature, the
optical density of green minus that of blue, which is zero for grey and independent of the
illumination's brightness. A three-class Otsu splits it into background and red cells, pale
purple (cytoplasm, platelets' halo) and strongly purple (nuclei, platelets). Each WBC is the
connected region of pale-or-stronger purple (hysteresis at a third of the nucleus threshold)
that holds a nucleus at least a quarter of a WBC's diameter across; smaller purple objects are
platelets. Lobes of one nucleus lie in one cell region, so a neutrophil counts once. The field is
measured from its own background where that is tinted (:func:`stain`), so a purple lamp or camera
is not mistaken for stain.

Scale is the one thing the image cannot tell us, so it is an input: ``cell_diameter``, the
typical WBC diameter in pixels (about 200 in BCCD's 640x480 fields). The image is resized so
that a WBC spans ``WORK_DIAMETER`` pixels and every size below is a fraction of that.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage
from skimage.filters import threshold_multiotsu

from ..errors import WbcidError

WORK_DIAMETER = 100  # pixels a WBC spans in the resized copy the detector works on
MIN_NUCLEUS = 0.25  # smallest nucleus, as a fraction of a WBC's diameter (platelets are smaller)
CYTOPLASM = 1 / 3  # cell threshold as a fraction of the nucleus threshold (hysteresis)
MIN_PURPLE = 0.1  # optical-density difference below which nothing in the image is stained purple
BACKGROUND_WINDOW = 2 * WORK_DIAMETER  # wider than any cell, so every window holds background

Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class Detection:
    """One WBC: its box ``(x0, y0, x1, y1)`` in input pixels and the area of its nucleus."""

    box: Box
    nucleus_area: int


@dataclass(frozen=True)
class FieldObjects:
    """What a detector found in one field: its WBCs, and where it measures them, its red cells'
    typical diameter in pixels (the median longer side of their boxes clear of the border)."""

    wbcs: list[Detection]
    rbc_diameter: float | None = None


def check_cell_diameter(cell_diameter: float) -> None:
    """Both detectors resize by it: it must be a positive number of pixels (NaN is not)."""
    if not cell_diameter > 0:
        raise WbcidError(f"cell_diameter must be a positive number of pixels, not {cell_diameter}")


def purple(rgb: np.ndarray) -> np.ndarray:
    """Optical density of green minus blue: high for stained nuclei, ~0 for grey and pink."""
    od = -np.log((rgb[..., 1:3].astype(np.float32) + 1) / 256)
    return od[..., 0] - od[..., 1]


def stain(rgb: np.ndarray, window: int) -> np.ndarray:
    """:func:`purple`, measured from the field's own background where that background is purple.

    Glass and plasma take no stain, so a background more purple than grey is the light's colour
    (a lamp, a camera's white balance, uneven illumination): its purple, estimated locally as the
    colour of the brightest light within ``window`` pixels, is subtracted. Without this a pink or
    purple background looked like one field-sized cell. A background less purple than grey (a
    warm, yellow lamp) is left alone: the thresholds are relative to grey, as they were chosen.
    """
    # The background is smooth, so it is estimated on a copy reduced by block means (25 blocks per
    # window), which also keeps a dust speck from passing for the lamp.
    step = max(1, window // 25)
    small = np.asarray(Image.fromarray(rgb).reduce(step), dtype=np.float32)
    size = max(1, round(window / step))
    background = ndimage.gaussian_filter(ndimage.maximum_filter(small, (size, size, 1)), (size / 4, size / 4, 0))
    tint = Image.fromarray(np.maximum(purple(background), 0)).resize(rgb.shape[1::-1], Image.Resampling.BILINEAR)
    return purple(rgb) - np.asarray(tint)


def detect_cells(image: Image.Image | np.ndarray, cell_diameter: float = 200) -> list[Detection]:
    """WBCs in an RGB smear image, largest first; ``[]`` for a field without any (or without colour)."""
    check_cell_diameter(cell_diameter)
    image = Image.fromarray(image) if isinstance(image, np.ndarray) else image
    scale = WORK_DIAMETER / cell_diameter
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    work = np.asarray(image.convert("RGB").resize(size, Image.Resampling.BILINEAR))
    feature = ndimage.gaussian_filter(stain(work, BACKGROUND_WINDOW), 1)
    if feature.max() < MIN_PURPLE:
        return []
    try:
        nucleus_level = max(threshold_multiotsu(feature, classes=3)[1], MIN_PURPLE)
    except ValueError:  # too few distinct values to split into three classes: a blank or tiny image
        return []
    nucleus = ndimage.binary_opening(feature > nucleus_level)
    cell = ndimage.binary_fill_holes(ndimage.binary_closing(feature > CYTOPLASM * nucleus_level, iterations=2))
    regions, count = ndimage.label(ndimage.binary_opening(cell, iterations=2) | nucleus)
    areas = ndimage.sum_labels(nucleus, regions, np.arange(1, count + 1))
    min_area = np.pi / 4 * (MIN_NUCLEUS * WORK_DIAMETER) ** 2
    found = [
        Detection(
            rescale_box((region[1].start, region[0].start, region[1].stop, region[0].stop), scale, image.size),
            int(area / scale**2),
        )
        for region, area in zip(ndimage.find_objects(regions), areas)
        if area >= min_area
    ]
    return sorted(found, key=lambda d: -d.nucleus_area)


def rescale_box(box: tuple[float, float, float, float], scale: float, size: tuple[int, int]) -> Box:
    """A box found in a copy resized by ``scale``, in the original's pixels, clipped to its ``size``."""
    x0, y0, x1, y1 = (round(v / scale) for v in box)
    return max(0, x0), max(0, y0), min(size[0], x1), min(size[1], y1)


def read_voc_boxes(path: str | Path, name: str = "WBC") -> list[Box]:
    """The boxes of one object class in a Pascal VOC annotation file."""
    boxes = []
    for obj in ET.parse(path).findall("object"):
        if obj.findtext("name") == name:
            box = obj.find("bndbox")
            boxes.append(tuple(int(float(box.findtext(k))) for k in ("xmin", "ymin", "xmax", "ymax")))
    return boxes


def read_yolo_boxes(path: str | Path, size: tuple[int, int], cls: int) -> list[tuple[float, float, float, float]]:
    """The boxes of one class in a YOLO label file (``class cx cy w h``, fractions of the image), in pixels."""
    path = Path(path)
    rows = np.loadtxt(path, ndmin=2) if path.stat().st_size else np.empty((0, 5))
    width, height = size
    return [
        ((cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height)
        for c, cx, cy, w, h in rows
        if c == cls
    ]


def match_boxes(predicted: list[Box], truth: list[Box], min_iou: float = 0.5) -> tuple[int, int, int]:
    """``(true positives, false positives, false negatives)``: greedy one-to-one matching by IoU."""
    if not predicted or not truth:
        return 0, len(predicted), len(truth)
    import torch  # only the benchmark and tests match boxes; counting never imports PyTorch
    from torchvision.ops import box_iou

    iou = box_iou(torch.tensor(predicted, dtype=torch.float32), torch.tensor(truth, dtype=torch.float32)).numpy()
    matched = 0
    while iou.size and iou.max() >= min_iou:
        i, j = np.unravel_index(iou.argmax(), iou.shape)
        iou[i, :], iou[:, j] = -1, -1
        matched += 1
    return matched, len(predicted) - matched, len(truth) - matched
