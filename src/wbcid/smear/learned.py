"""Finding white blood cells with a small network trained on annotated fields (ONNX, no PyTorch).

The stain detector (:mod:`wbcid.smear.detect`) thresholds one colour feature, and on fields where
the red cells are bluish or the cytoplasm pale its boxes run into neighbours or stop at the
nucleus (docs/detection_stain.md). This detector learned what a WBC box is from TXL-PBC's annotated
fields of four labs (:mod:`wbcid.smear.train_detector`). It is a CenterNet (Zhou et al., 2019,
"Objects as points"): for every location of a quarter-resolution grid, the probability that a
WBC's centre lies there and that a red cell's does, the box's width and height and the centre's
sub-cell offset. Peaks above :data:`MIN_SCORE` that are the largest in their 3x3 neighbourhood
are candidates; a WBC candidate whose centre lies inside the box of a more certain one is
dropped, because in a smear's monolayer one WBC does not lie over another's centre (a lobed
nucleus can raise two peaks in one cell). Red cells do overlap, so theirs are all kept.

Like the stain detector it takes the scale as an input (``cell_diameter``, measured from the red
cells by ``wbcid count``): the field is resized so that a WBC spans :data:`WORK_DIAMETER` pixels,
which is what the network was trained on (with +-40 % jitter, so an estimate that is off by a
fifth still works). The red cells it finds measure the field's scale again
(``FieldObjects.rbc_diameter``), as an annotator's boxes would.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from ..errors import WbcidError
from .detect import Detection, FieldObjects, check_cell_diameter, rescale_box
from .scale import annotated_rbc_diameter

WORK_DIAMETER = 48  # pixels a WBC spans in the copy the network sees
STRIDE = 4  # input pixels per output cell
MULTIPLE = 32  # the network's input sides are padded to a multiple of its largest stride
MAX_JITTER = 1.4  # it was trained on WBCs up to this much larger or smaller than the size it is given
MIN_SCORE = 0.3  # CenterNet's usual peak threshold (Zhou et al. 2019); not tuned here
WEIGHTS = Path(__file__).resolve().parent.parent / "weights" / "wbc-detector.onnx"
WBC, RBC = 0, 1  # score channels; then width, height (in WBC diameters), x and y offset (in cells)


@cache
def _session(path: Path):
    from ..serving import session

    if not path.is_file():
        raise WbcidError(f"no detector weights at {path}: reinstall wbcid, or count with --detector stain")
    return session(path)


def network_input(image: Image.Image, cell_diameter: float) -> tuple[np.ndarray, float]:
    """The field as the network sees it (1x3xHxW float32 in [0, 1], zero-padded) and the scale used."""
    check_cell_diameter(cell_diameter)
    scale = WORK_DIAMETER / cell_diameter
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    work = np.asarray(image.convert("RGB").resize(size, Image.Resampling.BILINEAR), dtype=np.float32) / 255
    padded = np.zeros((-(-size[1] // MULTIPLE) * MULTIPLE, -(-size[0] // MULTIPLE) * MULTIPLE, 3), np.float32)
    padded[: size[1], : size[0]] = work
    return padded.transpose(2, 0, 1)[None], scale


def decode(output: np.ndarray, channel: int = WBC, min_score: float = MIN_SCORE) -> list[tuple[float, tuple]]:
    """``(score, box in work pixels)`` for each object of one class in one output map (6xHxW), most
    certain first; WBCs that lie over a more certain WBC's centre are dropped (module docstring)."""
    heat = output[channel]
    peaks = np.argwhere((heat >= ndimage.maximum_filter(heat, size=3)) & (heat > min_score))
    found: list[tuple[float, tuple]] = []
    for y, x in sorted(peaks.tolist(), key=lambda p: -heat[p[0], p[1]]):
        w, h, dx, dy = output[2:, y, x]
        cx, cy = (x + dx) * STRIDE, (y + dy) * STRIDE
        if channel == WBC and any(x0 <= cx <= x1 and y0 <= cy <= y1 for _, (x0, y0, x1, y1) in found):
            continue
        w, h = w * WORK_DIAMETER, h * WORK_DIAMETER
        found.append((float(heat[y, x]), (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)))
    return found


def find_objects(image: Image.Image, cell_diameter: float, weights: Path = WEIGHTS) -> FieldObjects:
    """WBCs (most certain first; ``Detection.nucleus_area`` is 0: the network does not segment) and
    the red cells' diameter of an RGB field, in its pixels."""
    x, scale = network_input(image, cell_diameter)
    session = _session(weights)
    output = session.run(None, {session.get_inputs()[0].name: x})[0][0]
    boxes = [rescale_box(box, scale, image.size) for _, box in decode(output, WBC)]
    wbcs = [Detection(box, 0) for box in boxes if box[2] > box[0] and box[3] > box[1]]
    rbc = annotated_rbc_diameter([rescale_box(box, scale, image.size) for _, box in decode(output, RBC)], image.size)
    return FieldObjects(wbcs, rbc if np.isfinite(rbc) else None)


def detect_cells_learned(image: Image.Image, cell_diameter: float, weights: Path = WEIGHTS) -> list[Detection]:
    """The WBCs of :func:`find_objects`."""
    return find_objects(image, cell_diameter, weights).wbcs
