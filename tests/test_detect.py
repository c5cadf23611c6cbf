"""WBC detection on real BCCD smear fields: found where the annotators boxed them, nothing else."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from wbcid.errors import WbcidError
from wbcid.smear.detect import detect_cells, match_boxes, read_voc_boxes

FIELDS = ["BloodImage_00000", "BloodImage_00010", "BloodImage_00034", "BloodImage_00100", "BloodImage_00300"]


@pytest.fixture(scope="module")
def smears(data_root):
    return data_root / "smears" / "bccd"


def field(smears, name: str) -> Image.Image:
    return Image.open(smears / "images" / f"{name}.jpg").convert("RGB")


def test_finds_the_annotated_wbcs_and_only_them(smears):
    tp = fp = fn = 0
    for name in FIELDS:  # two of them hold two WBCs each
        found = [d.box for d in detect_cells(field(smears, name))]
        counts = match_boxes(found, read_voc_boxes(smears / "annotations" / f"{name}.xml"))
        tp, fp, fn = tp + counts[0], fp + counts[1], fn + counts[2]
    assert (tp, fp, fn) == (7, 0, 0)


def test_a_field_without_wbc_gives_nothing(smears):
    image = field(smears, "BloodImage_00000")
    ((x0, y0, x1, y1),) = read_voc_boxes(smears / "annotations" / "BloodImage_00000.xml")
    red_cells_only = image.crop((0, 0, x0 - 10, image.height))  # left of the only WBC: red cells, platelets
    assert detect_cells(red_cells_only) == []
    assert detect_cells(image.convert("L").convert("RGB")) == []  # no colour, no stain to go by
    assert detect_cells(Image.new("RGB", (640, 480), "white")) == []


def test_boxes_follow_the_scale_of_huge_images(smears):
    image = field(smears, "BloodImage_00010")
    base = sorted(d.box for d in detect_cells(image))
    huge = image.resize((image.width * 6, image.height * 6))  # 3840 x 2880
    scaled = sorted(d.box for d in detect_cells(huge, cell_diameter=6 * 200))  # speed: benchmarks/detection.py
    assert len(scaled) == len(base) == 2
    assert np.abs(np.array(scaled) / 6 - np.array(base)).max() < 8


def test_matching_counts_each_box_once():
    truth = [(0, 0, 100, 100), (200, 200, 300, 300)]
    assert match_boxes([(0, 0, 100, 100), (5, 5, 100, 100)], truth) == (1, 1, 1)  # a duplicate is a false positive
    assert match_boxes([(0, 0, 100, 40)], truth) == (0, 1, 2)  # IoU 0.4 is not a match
    assert match_boxes([], truth) == (0, 0, 2)


def test_bad_scale_is_a_clear_error(smears):
    with pytest.raises(WbcidError, match="cell_diameter"):
        detect_cells(field(smears, "BloodImage_00000"), cell_diameter=0)


@pytest.mark.parametrize("gain", [(1.0, 0.72, 0.85), (0.85, 0.65, 1.0)], ids=["pink", "purple"])
def test_a_tinted_background_is_not_mistaken_for_a_cell(smears, gain):
    """Issue 12: fields from a camera whose background is pink or purple came out as one field-sized WBC."""
    tp = fp = fn = 0
    for name in FIELDS:
        rgb = np.asarray(field(smears, name), dtype=np.float32)
        for tinted in (rgb * np.array(gain), rgb * np.linspace((1.0, 0.72, 0.85), gain, rgb.shape[1])[None]):
            found = [d.box for d in detect_cells(np.clip(tinted, 0, 255).astype(np.uint8))]
            counts = match_boxes(found, read_voc_boxes(smears / "annotations" / f"{name}.xml"))
            tp, fp, fn = tp + counts[0], fp + counts[1], fn + counts[2]
    assert tp >= 13 and fp <= 1  # 14 = the 7 WBCs twice: evenly tinted and tinted pink to this colour across
