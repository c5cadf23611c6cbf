"""Differential counting: interval and percentage arithmetic, reference flags, and whole smears in,
counts.json, annotated fields and a report out, bad inputs included."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from urllib.parse import quote, unquote

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageDraw

from wbcid.data import CLASSES
from wbcid.errors import WbcidError
from wbcid.files import list_images
from wbcid.smear.differential import REFERENCE_RANGES, differential, proportion_interval, read_reference
from wbcid.smear.specimens import cells_short


def test_exact_binomial_intervals_match_closed_forms():
    low, high = proportion_interval(0, 100)
    assert low == 0 and high == pytest.approx(1 - 0.025 ** (1 / 100), rel=1e-9)  # the k = 0 closed form
    low, high = proportion_interval(100, 100)
    assert high == 1 and low == pytest.approx(0.025 ** (1 / 100), rel=1e-9)
    low, high = proportion_interval(50, 100)
    assert (round(low, 4), round(high, 4)) == (0.3983, 0.6017)  # Rümke's table: 40-60 for 50 of 100
    widths = []
    for n in (20, 100, 400):  # the same 25 %, counted on more cells, is known better
        low, high = proportion_interval(n // 4, n)
        widths.append(high - low)
    assert widths[0] > widths[1] > widths[2]
    from scipy.stats import binomtest  # the reference implementation, too slow to import for every count

    for k, n in [(0, 7), (1, 7), (3, 10), (17, 230), (229, 230), (230, 230)]:
        ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="exact")
        assert proportion_interval(k, n) == pytest.approx((ci.low, ci.high), rel=1e-12, abs=1e-15)


def test_differential_counts_percentages_and_reference_flags():
    labels = ["neutrophil"] * 30 + ["lymphocyte"] * 50 + ["monocyte"] * 12 + ["eosinophil"] * 6 + ["basophil"] * 2
    result = differential(labels)
    classes = result["classes"]
    assert result["counted"] == 100
    assert [classes[c]["count"] for c in CLASSES] == [30, 50, 12, 6, 2]
    assert sum(classes[c]["percent"] for c in CLASSES) == pytest.approx(100)
    assert classes["neutrophil"]["flag"] == "low" and classes["lymphocyte"]["flag"] == "high"
    assert classes["monocyte"]["flag"] == "high" and classes["basophil"]["flag"] == "high"
    assert classes["eosinophil"]["flag"] == "high"  # 6 % > 5.5 %
    # 30 % of 100 has upper bound 39.8 % < 40 %: conclusive; 2 of 100 basophils could be chance
    assert classes["neutrophil"]["conclusive"] and not classes["basophil"]["conclusive"]
    normal = differential(["neutrophil"] * 60 + ["lymphocyte"] * 30 + ["monocyte"] * 6 + ["eosinophil"] * 4)
    assert not any(c["flag"] for c in normal["classes"].values())
    assert REFERENCE_RANGES["neutrophil"] == (40, 75)


def test_nothing_counted_gives_no_percentages():
    result = differential([])
    assert result["counted"] == 0 and all(
        c["percent"] is None and c["flag"] is None for c in result["classes"].values()
    )
    json.dumps(result, allow_nan=False)  # valid JSON, no NaN


def test_too_few_cells_counted_says_how_to_get_more():
    """All three cells of a field flagged said only "count more fields": verifying them counts them too."""
    assert cells_short({"counted": 100, "flagged": 7}) is None
    assert cells_short({"counted": 40, "flagged": 0}).endswith("needs 60 more (count more fields of this slide)")
    assert cells_short({"counted": 0, "flagged": 3}).endswith(
        "needs 100 more (count more fields of this slide, or verify its 3 flagged cell(s) with `wbcid review`)"
    )


def test_many_cells_unlike_the_models_own_send_the_lab_to_review_and_adapt(data_root, tmp_path):
    """A count of a lab the model does not know flagged most of its cells and said only "flagged for
    review": now it says that they are clearly more than its threshold flags of its own cells, and
    what to do. Cells cut by the edge are flagged for that, so they do not count."""
    from markupsafe import escape

    from wbcid.smear.counting import count, unfamiliar_cells

    def fields(flags: int, whole: int, edge: int = 0, score: float = 2.0) -> list[dict]:
        cells = [(score if i < flags else 0.5, False) for i in range(whole)] + [(score, True)] * edge
        detections = [
            {
                "box": [0, 0, 9, 9],
                "label": "neutrophil",
                "confidence": 0.9,
                "ood_score": o,
                "flagged": o > 1 or e,
                "edge": e,
            }
            for o, e in cells
        ]
        return [{"detections": detections}]

    assert unfamiliar_cells(fields(20, 400, edge=200)) is None  # 5 %, as calibrated; the edge cells are left out
    assert unfamiliar_cells(fields(45, 400)) is None  # 11 %: its interval reaches below twice the 5 %
    assert unfamiliar_cells(fields(400, 400, score=math.nan)) is None  # no scorer: nothing to say
    said = unfamiliar_cells(fields(60, 400))  # 15 %: [11.7, 18.9] %
    assert said.startswith("60 of 400 whole cells (15 %) are flagged as unlike the model's training cells, against 5 %")
    assert "`wbcid review`" in said and "`wbcid adapt`" in said

    smears = sorted((data_root / "smears" / "bccd" / "images").glob("*.jpg"))[:40]
    result = count(None, smears, tmp_path / "out")
    whole = [d for e in result["images"] for d in e.get("detections", []) if not d["edge"]]
    assert sum(d["ood_score"] > 1 for d in whole) / len(whole) > 0.25  # BCCD's smear fields, for the bundled model
    said = unfamiliar_cells(result["images"])
    assert said in result["warnings"] and str(escape(said)) in (tmp_path / "out" / "report.html").read_text()


def test_bad_labels_and_reference_files_are_clear_errors(tmp_path):
    with pytest.raises(WbcidError, match="not one of the five"):
        differential(["neutrophil", "platelet"])
    path = tmp_path / "ranges.json"
    path.write_text(json.dumps({"neutrophil": [50, 70]}))
    with pytest.raises(WbcidError, match="lymphocyte"):
        read_reference(path)
    path.write_text(json.dumps({c: [1, 2] for c in CLASSES}))
    assert read_reference(path)["basophil"] == (1.0, 2.0)
    lab = {"Basophils": [0, 2], "Neutrophils": [40, 75], "Lymphozyten": [20, 45], "MONO": [2, 10]}
    lab["eosinófilos"] = [1, 6]
    path.write_text(json.dumps(lab))  # named as the lab names its class folders, in its own order
    assert list(read_reference(path).items()) == [
        ("neutrophil", (40, 75)),
        ("lymphocyte", (20, 45)),
        ("monocyte", (2, 10)),
        ("eosinophil", (1, 6)),
        ("basophil", (0, 2)),
    ]
    path.write_text(json.dumps(lab | {"neutrophil": [50, 70], "platelets": [1, 2]}))
    with pytest.raises(WbcidError, match="'Neutrophils' and 'neutrophil' both name neutrophil; unknown class 'plat"):
        read_reference(path)


def test_count_command_on_real_smears_with_bad_inputs(data_root, tmp_path):
    smears = data_root / "smears" / "bccd" / "images"
    fields = [smears / f"BloodImage_{i:05d}.jpg" for i in (0, 10, 34, 100)]  # 6 WBCs
    fields[0] = Path(shutil.copy(fields[0], tmp_path / "field #1 50%?.jpg"))  # a name a URL must escape
    fields[1] = Path(shutil.copy(fields[1], tmp_path / f"{'é' * 125}.jpg"))  # 254 bytes: over 255 with a prefix
    for i in (2, 3):  # all in one folder: one specimen (fields of several folders are a specimen each)
        (tmp_path / fields[i].name).symlink_to(fields[i])
        fields[i] = tmp_path / fields[i].name
    grey = tmp_path / "grey.png"
    Image.open(fields[0]).convert("L").save(grey)
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff not a jpeg")
    out = tmp_path / "count"
    result = subprocess.run(
        [sys.executable, "-m", "wbcid", "count", "--out", str(out), *map(str, fields), str(grey), str(corrupt)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    counts = json.loads((out / "counts.json").read_text())
    images = {entry["path"]: entry for entry in counts["images"]}
    assert [len(images[str(f)]["detections"]) for f in fields] == [1, 2, 2, 1]
    assert "error" in images[str(corrupt)] and images[str(grey)]["detections"] == []
    assert any("grey" in w for w in images[str(grey)]["warnings"])
    totals = counts["totals"]
    detections = [d for e in counts["images"] for d in e["detections"]]
    assert totals["detected"] == 6 == len(detections)
    assert totals["counted"] + totals["flagged"] == 6 == totals["counted"] + sum(d["flagged"] for d in detections)
    assert sum(c["count"] for c in totals["classes"].values()) == totals["counted"]
    assert sum(c["flagged_closest"] for c in totals["classes"].values()) == totals["flagged"]
    for d in detections:
        assert d["label"] in CLASSES and 0 < d["confidence"] <= 1 and d["flagged"] == (d["ood_score"] > 1)
    for f in fields:
        assert (out / images[str(f)]["annotated"]).is_file()
    assert list(counts["specimens"]) == ["all fields"]  # files of one folder given one by one: one specimen
    scale = counts["specimens"]["all fields"]["scale"]
    assert scale["how"] == "from the red cells, boxed by the detector" and 100 < scale["cell_diameter"] < 320
    assert scale["fields_without_red_cells"] == 1  # the corrupt file; the grey copy still shows cells
    for f in fields:  # each field's own red cells, as found by the detector: the same microscope
        assert images[str(f)]["rbc_diameter"] == pytest.approx(scale["rbc_diameter"], rel=0.15)
    html = (out / "report.html").read_text()
    assert "95 % interval" in html and "corrupt.jpg" in html and "Reference ranges" in html and "red cells" in html
    shown = re.findall(r'<img[^>]* src="([^"]+)"[^>]* loading="lazy"', html)  # lazy: 1,000 fields open at once
    assert len(shown) == totals["flagged"] + len(fields) and all((out / unquote(src)).is_file() for src in shown)
    assert all(src == quote(unquote(src)) for src in shown)  # '#', '?', '%', spaces escaped: the browser finds them
    assert "scale: WBCs about" in result.stdout
    assert len(list((out / "flagged").glob("*.jpg"))) == totals["flagged"]


def test_count_fails_clearly_when_nothing_is_readable(tmp_path):
    from wbcid.smear.counting import count

    bad = tmp_path / "bad.png"
    bad.write_bytes(b"nope")
    with pytest.raises(WbcidError, match="could be read"):
        count(None, [bad], tmp_path / "out")


def test_an_interrupted_count_resumes_without_redoing_finished_fields(data_root, tmp_path, monkeypatch):
    import wbcid.smear.counting as counting

    fields = [data_root / "smears" / "bccd" / "images" / f"BloodImage_{i:05d}.jpg" for i in (0, 10, 34, 100)]
    straight = counting.count(None, fields, tmp_path / "straight")
    count_field, calls = counting.count_field, []

    def interrupted(model, path, *args, **kwargs):
        calls.append(path)
        if path == fields[2] and calls.count(path) == 1:  # by field, not by call: two threads, either order
            raise KeyboardInterrupt
        return count_field(model, path, *args, **kwargs)

    monkeypatch.setattr(counting, "count_field", interrupted)
    with pytest.raises(KeyboardInterrupt):
        counting.count(None, fields, tmp_path / "out")
    assert len((tmp_path / "out" / "fields.jsonl").read_text().splitlines()) == 1 + 2  # settings + 2 fields
    with monkeypatch.context() as early:  # refused before the scale is measured or the model loaded
        early.setattr(counting, "estimate_scale", None)
        early.setattr(counting, "resolve_model", None)
        with pytest.raises(WbcidError, match="already holds a count; pass --resume"):
            counting.count(None, fields, tmp_path / "out")
    with pytest.raises(
        WbcidError, match=r"other settings \(scale all fields: WBCs \d+\.?\d* px .*, now all fields: WBCs 150 px"
    ):
        counting.count(None, fields, tmp_path / "out", cell_diameter=150, resume=True)
    with pytest.raises(WbcidError, match="other settings .*--detector learned, now stain"):
        counting.count(None, fields, tmp_path / "out", resume=True, detector="stain")
    before = len(calls)  # 3, or 4 when the last field was already under way in the other thread
    resumed = counting.count(None, fields, tmp_path / "out", resume=True)
    assert calls[before:] == fields[2:]  # only the two unfinished fields were counted again
    assert resumed["totals"] == straight["totals"]
    written = [json.loads((tmp_path / run / "counts.json").read_text())["images"] for run in ("out", "straight")]
    assert [e["detections"] for e in written[0]] == [e["detections"] for e in written[1]]


def test_blank_tiny_and_flat_fields_are_warnings_not_a_crash(data_root, tmp_path):
    """Issue 13.1: a blank, 1x1, 2x2 or single-colour image stopped the whole count (Otsu's ValueError);
    a dark one stopped it too (Otsu's IndexError, measuring the scale) or was counted as empty, unexplained;
    a TIFF of several pages was counted by its first without a word."""
    from wbcid.smear.counting import count

    odd = {
        "blank.png": Image.new("RGB", (640, 480), "white"),
        "one.png": Image.new("RGB", (1, 1), "purple"),
        "two.png": Image.new("RGB", (2, 2), (120, 40, 160)),
        "flat.png": Image.new("RGB", (300, 300), (200, 90, 180)),
    }
    real = data_root / "smears" / "bccd" / "images" / "BloodImage_00000.jpg"
    odd["dark.png"] = Image.fromarray(np.asarray(Image.open(real)) // 16)  # the lamp turned low; its scale failed
    for name, image in odd.items():
        image.save(tmp_path / name)
    fields = [Image.open(real)] + [Image.open(real).rotate(angle) for angle in (90, 180)]
    fields[0].save(tmp_path / "stack.tif", save_all=True, append_images=fields[1:])  # a z-stack, or three fields
    odd["stack.tif"] = fields[0]
    preview = fields[0].resize((160, 120))  # a camera's JPEG with its preview: Pillow reads 2 frames (MPO)
    fields[0].save(tmp_path / "camera.jpg", format="MPO", save_all=True, append_images=[preview])
    odd["camera.jpg"] = fields[0]
    result = count(None, [*(tmp_path / n for n in odd), real], tmp_path / "out")
    by_name = {Path(e["path"]).name: e for e in result["images"]}
    assert "too small" in " ".join(by_name["one.png"]["warnings"]) and "too small" in " ".join(
        by_name["two.png"]["warnings"]
    )
    assert "flat colour" in " ".join(by_name["blank.png"]["warnings"] + by_name["flat.png"]["warnings"])
    assert (
        "image is nearly black, no part of it lit (lamp, shutter or exposure?): nothing to count"
        in (by_name["dark.png"]["warnings"])
    )
    assert by_name["stack.tif"]["warnings"] == [
        "the file holds 3 images (pages or frames): only the first is counted; save each field as an image of its own"
    ]
    assert by_name["stack.tif"]["detections"] == by_name[real.name]["detections"]  # its first page: that field
    assert by_name["camera.jpg"]["warnings"] == [] and by_name["camera.jpg"]["detections"]  # one picture, counted
    assert by_name[real.name]["detections"] and (tmp_path / "out" / "counts.json").is_file()


def test_a_field_cut_short_mid_write_is_counted_again_on_resume(data_root, tmp_path):
    """Issue 13.8: a truncated last line in fields.jsonl made --resume raise JSONDecodeError."""
    from wbcid.smear.counting import count

    fields = [data_root / "smears" / "bccd" / "images" / f"BloodImage_{i:05d}.jpg" for i in (0, 10)]
    straight = count(None, fields, tmp_path / "straight")
    log = tmp_path / "straight" / "fields.jsonl"
    text = log.read_text()
    log.write_text(text[: len(text) - 40])  # the second field's line cut short, as by a crash
    resumed = count(None, fields, tmp_path / "straight", resume=True)
    assert resumed["totals"] == straight["totals"]
    assert len(log.read_text().splitlines()) == 3 and all(json.loads(line) for line in log.read_text().splitlines())


def test_a_count_stopped_before_its_first_field_resumes_again_and_again(data_root, tmp_path, monkeypatch):
    """Stopped after it logged its settings but before its first field, a resumed count logged them
    again, and every later --resume failed on that second settings line (a KeyError)."""
    import wbcid.smear.counting as counting

    fields = [data_root / "smears" / "bccd" / "images" / f"BloodImage_{i:05d}.jpg" for i in (0, 10)]
    real = counting.count_field

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(counting, "count_field", stopped)
    with pytest.raises(KeyboardInterrupt):
        counting.count(None, fields, tmp_path / "c")
    monkeypatch.setattr(counting, "count_field", real)
    first = counting.count(None, fields, tmp_path / "c", resume=True)
    again = counting.count(None, fields, tmp_path / "c", resume=True)
    assert again["totals"] == first["totals"]
    lines = [json.loads(line) for line in (tmp_path / "c" / "fields.jsonl").read_text().splitlines()]
    assert len(lines) == 3 and "path" not in lines[0] and all("path" in entry for entry in lines[1:])


def test_a_count_resumed_after_more_fields_arrived_keeps_its_scale(data_root, tmp_path, monkeypatch):
    """Fields the microscope saved while a count was stopped moved the scale, measured again from a
    sample spread over them (196.1 px, then 206.7 px here; in 30 BCCD fields and 40 more by hand, only
    the granulometry moved, and the refusal read 'WBCs 203.5 px, now WBCs 203.5 px'), and --resume was
    refused as 'made with other settings'; it keeps the scale it began with, and counts the new fields
    at it. Fields of another scale (another microscope's, here the same at half size) are still refused.
    A count begun at a given --cell-diameter and resumed without it was refused too; it goes on at it."""
    import wbcid.smear.counting as counting

    fields = [data_root / "smears" / "bccd" / "images" / f"BloodImage_{i:05d}.jpg" for i in (0, 10, 34, 100)]
    real = counting.count_field

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(counting, "count_field", stopped)
    with pytest.raises(KeyboardInterrupt):
        counting.count(None, fields[:2], tmp_path / "c")
    began = json.loads((tmp_path / "c" / "fields.jsonl").read_text().splitlines()[0])["scales"]
    monkeypatch.setattr(counting, "count_field", real)
    halves = []
    for field in fields:
        with Image.open(field) as image:
            image.resize((image.width // 2, image.height // 2)).save(tmp_path / field.name)
        halves.append(tmp_path / field.name)
    other = r"other settings \(scale all fields: WBCs 19\d\.\d px .*, now .*WBCs 1[01]\d\.\d px"  # not resumed
    with pytest.raises(WbcidError, match=other):
        counting.count(None, halves, tmp_path / "c", resume=True)
    resumed = counting.count(None, fields, tmp_path / "c", resume=True)
    assert resumed["specimens"]["all fields"]["scale"] == began["all fields"]
    assert len(resumed["images"]) == 4 and all(e["detections"] for e in resumed["images"])
    monkeypatch.setattr(counting, "count_field", stopped)
    with pytest.raises(KeyboardInterrupt):  # begun at a given diameter, resumed without the option
        counting.count(None, fields[:1], tmp_path / "given", cell_diameter=260)
    monkeypatch.setattr(counting, "count_field", real)
    given = counting.count(None, fields[:1], tmp_path / "given", resume=True)["specimens"]["all fields"]["scale"]
    assert (given["cell_diameter"], given["how"]) == (260, "given")  # 1.3x the measured: it was refused


def test_a_count_resumed_after_a_specimen_folder_arrived_counts_it_at_its_own_scale(data_root, tmp_path, monkeypatch):
    """A slide's folder saved into the count's input folder while the count was stopped: --resume was
    refused as 'made with other settings' (the new specimen's scale). The new slide is counted at its
    own scale, the fields done are not counted again, and a later resume goes on at both scales."""
    import wbcid.smear.counting as counting

    bccd = data_root / "smears" / "bccd" / "images"
    for slide, numbers in (("slides/slide1", (0, 10)), ("later/slide2", (34, 100))):
        (tmp_path / slide).mkdir(parents=True)
        for i in numbers:
            (tmp_path / slide / f"BloodImage_{i:05d}.jpg").symlink_to(bccd / f"BloodImage_{i:05d}.jpg")
    first = counting.count(None, tmp_path / "slides", tmp_path / "c")
    (tmp_path / "later" / "slide2").rename(tmp_path / "slides" / "slide2")
    real, counted = counting.count_field, []

    def recorded(model, path, *args, **kwargs):
        counted.append(path.name)
        return real(model, path, *args, **kwargs)

    monkeypatch.setattr(counting, "count_field", recorded)
    resumed = counting.count(None, tmp_path / "slides", tmp_path / "c", resume=True)
    assert sorted(counted) == ["BloodImage_00034.jpg", "BloodImage_00100.jpg"]  # slide 1 was not counted again
    assert resumed["specimens"]["slide1"]["scale"] == first["specimens"]["slide1"]["scale"]
    assert resumed["specimens"]["slide2"]["fields"] == 2 and resumed["specimens"]["slide2"]["totals"]["detected"]
    again = counting.count(None, tmp_path / "slides", tmp_path / "c", resume=True)
    assert again["totals"] == resumed["totals"] and len(counted) == 2
    began = json.loads((tmp_path / "c" / "fields.jsonl").read_text().splitlines()[0])["scales"]
    assert began == {name: s["scale"] for name, s in resumed["specimens"].items()}
    (tmp_path / "slides" / "slide1").rename(tmp_path / "slide1")  # moved out: said "other settings", all scales
    with pytest.raises(WbcidError, match=r"began with specimen\(s\) slide1, which these inputs do not hold"):
        counting.count(None, tmp_path / "slides", tmp_path / "c", resume=True)


def test_a_field_given_twice_is_counted_once(data_root, tmp_path, caplog):
    """A field named and also in a folder given (or named twice) was counted each time: its cells two or
    three times in the differential (6 'fields' for 4, by hand)."""
    from wbcid.smear.counting import count

    (tmp_path / "slide").mkdir()
    for i in (0, 10):
        name = f"BloodImage_{i:05d}.jpg"
        (tmp_path / "slide" / name).symlink_to(data_root / "smears" / "bccd" / "images" / name)
    field = tmp_path / "slide" / "BloodImage_00010.jpg"
    assert list_images([field, tmp_path / "slide", field]) == [field, tmp_path / "slide" / "BloodImage_00000.jpg"]
    assert "2 image(s) given more than once" in caplog.text
    once = count(None, tmp_path / "slide", tmp_path / "once")
    twice = count(None, [field, tmp_path / "slide"], tmp_path / "twice")
    assert len(twice["images"]) == 2 and twice["totals"]["detected"] == once["totals"]["detected"]


def test_a_count_written_inside_its_input_folder_does_not_count_itself(data_root, tmp_path, caplog):
    """Its annotated fields and cut cells were taken as new fields: --resume found other settings."""
    from wbcid.smear.counting import count

    (tmp_path / "slide").mkdir()
    for i in (0, 10):
        name = f"BloodImage_{i:05d}.jpg"
        (tmp_path / "slide" / name).symlink_to(data_root / "smears" / "bccd" / "images" / name)
    first = count(None, tmp_path / "slide", tmp_path / "slide" / "counts")
    again = count(None, tmp_path / "slide", tmp_path / "slide" / "counts", resume=True)
    assert again["totals"] == first["totals"] and len(again["images"]) == 2
    assert "left out wbcid's own output in the folders searched" in caplog.text and "counts (a count)" in caplog.text


@pytest.mark.parametrize(
    "ranges, message",
    [
        ({**REFERENCE_RANGES, "neutrophil": [75, 40]}, "not a range"),
        ({k: [v[0] / 100, v[1] / 100] for k, v in REFERENCE_RANGES.items()}, "not fractions"),
        ({**REFERENCE_RANGES, "monocyte": [4, float("nan")]}, "not a range"),
        ({**REFERENCE_RANGES, "monocyte": [4, 9, 12]}, r"must be \[low, high\]"),
        ({**REFERENCE_RANGES, "blast": [0, 1]}, "unknown class 'blast'"),
        ({k: v for k, v in REFERENCE_RANGES.items() if k != "basophil"}, "basophil is missing"),
    ],
)
def test_reference_ranges_are_validated_and_explained(tmp_path, ranges, message):
    """Issue 13.6: reversed ranges, fractions, NaN, extra values and unknown classes were accepted."""
    path = tmp_path / "ranges.json"
    path.write_text(json.dumps({k: list(v) for k, v in ranges.items()}))
    with pytest.raises(WbcidError, match=message):
        read_reference(path)


def test_count_summary_says_inconclusive_and_asks_for_more_cells(data_root, tmp_path):
    """Issue 13.14: the terminal summary lacked 'inconclusive' and the fewer-than-100-cells warning."""
    fields = [str(data_root / "smears" / "bccd" / "images" / f"BloodImage_{i:05d}.jpg") for i in (0, 10, 34, 100)]
    run = subprocess.run(
        [sys.executable, "-m", "wbcid", "count", *fields, "--out", str(tmp_path / "o")], capture_output=True, text=True
    )
    assert run.returncode == 0 and "a 100-cell differential needs" in run.stdout
    assert "inconclusive" in run.stdout  # a few cells: the flags they raise cannot be conclusive
    assert "issue 3" not in (tmp_path / "o" / "report.html").read_text()


def test_either_detector_counts_and_an_unknown_one_is_refused(data_root, tmp_path):
    from wbcid.smear.counting import DETECTORS, count

    fields = [data_root / "smears" / "bccd" / "images" / f"BloodImage_{i:05d}.jpg" for i in (0, 10, 34, 100)]
    for detector in DETECTORS:
        result = count(None, fields, tmp_path / detector, detector=detector)
        assert result["detector"] == detector
        assert [len(e["detections"]) for e in result["images"]] == [1, 2, 2, 1]  # as annotated
    with pytest.raises(WbcidError, match="--detector must be one of learned, stain"):
        count(None, fields, tmp_path / "other", detector="yolo")


def test_an_absurd_cell_diameter_gets_a_hint_and_nan_a_clear_error(data_root, tmp_path):
    """Issue 13.10: no hint when --cell-diameter cannot fit the images; nan was a traceback."""
    from wbcid.smear.counting import count

    field = data_root / "smears" / "bccd" / "images" / "BloodImage_00000.jpg"
    for diameter, words in ((2000, "does not fit"), (5, "tiny")):
        result = count(None, [field], tmp_path / f"d{diameter}", cell_diameter=diameter)
        assert words in " ".join(result["images"][0]["warnings"])
    with pytest.raises(WbcidError, match="positive number"):
        count(None, [field], tmp_path / "nan", cell_diameter=float("nan"))


def test_outputs_and_inputs_are_checked_before_any_work(tmp_path):
    """Issue 13.11: count --out FILE ended in a traceback after all the work; missing inputs were found late."""
    from wbcid.smear.counting import count

    (tmp_path / "file.txt").write_text("not a folder")
    with pytest.raises(WbcidError, match="is a file"):
        count(None, [tmp_path], tmp_path / "file.txt")
    with pytest.raises(WbcidError, match="no such file"):  # found before the (missing) model is looked for
        count(tmp_path / "no-model.pt", [tmp_path / "missing.jpg"], tmp_path / "out")


def test_a_labs_own_report_in_the_output_folder_is_not_replaced(data_root, tmp_path):
    """evaluate --out and count --out replaced a report.md or report.html of the lab's own (its data
    folder named as the output) without a word; an earlier evaluation or count is replaced, as before."""
    from wbcid.evaluation import evaluate
    from wbcid.smear.counting import count

    cells = sorted((data_root / "cells" / "lisc" / "monocyte").iterdir())[:2]
    manifest = tmp_path / "cells.csv"
    manifest.write_text("path,label\n" + "".join(f"{p},monocyte\n" for p in cells))
    field = data_root / "smears" / "bccd" / "images" / "BloodImage_00010.jpg"
    for name, report, run in (("evaluation", "report.md", evaluate), ("count", "report.html", count)):
        mine = tmp_path / f"notes-{name}"
        mine.mkdir()
        (mine / report).write_text("the lab's own notes")
        data = manifest if run is evaluate else [field]
        with pytest.raises(WbcidError, match=f"holds {report}, which the {name} would replace, and no "):
            run(None, data, mine)
        assert (mine / report).read_text() == "the lab's own notes"
        run(None, data, tmp_path / name)
        if run is evaluate:
            run(None, data, tmp_path / name)  # an earlier evaluation is replaced (a count takes --resume)


def test_a_folder_of_folders_is_counted_per_specimen(data_root, tmp_path):
    """Issue 12: one differential per subfolder (a slide), specimens.csv, the 100-cell warning each,
    and images beside the specimen folders counted as one more specimen with a warning."""
    smears = data_root / "smears" / "bccd" / "images"
    layout = {"slide A/day1": (0, 10), "slide B": (34,), ".": (100,), "slide C": ()}  # A's fields one level deeper
    for folder, numbers in layout.items():
        (tmp_path / "run" / folder).mkdir(parents=True, exist_ok=True)
        for i in numbers:
            (tmp_path / "run" / folder / f"BloodImage_{i:05d}.jpg").symlink_to(smears / f"BloodImage_{i:05d}.jpg")
    out = tmp_path / "out"
    cli = subprocess.run(
        [sys.executable, "-m", "wbcid", "count", "--out", str(out), str(tmp_path / "run")],
        capture_output=True,
        text=True,
    )
    assert cli.returncode == 0, cli.stderr[-2000:]
    counts = json.loads((out / "counts.json").read_text())
    specimens = counts["specimens"]
    assert sorted(specimens) == ["loose fields", "slide A", "slide B"]
    assert [specimens[k]["fields"] for k in ("slide A", "slide B", "loose fields")] == [2, 1, 1]
    assert "beside the specimen folders" in counts["warnings"][1] and "beside the specimen folders" in cli.stderr
    assert counts["warnings"][0] == "1 specimen folder(s) hold no images and are not counted: slide C"
    for key in ("detected", "counted", "flagged"):
        assert sum(s["totals"][key] for s in specimens.values()) == counts["totals"][key]
    for s in specimens.values():
        assert s["scale"]["how"].startswith("from the red cells")
        flagged = s["totals"]["flagged"]
        verify = f", or verify its {flagged} flagged cell(s) with `wbcid review`" if flagged else ""
        assert s["warnings"][0] == (
            f"only {s['totals']['counted']} cells counted; a 100-cell differential needs "
            f"{100 - s['totals']['counted']} more (count more fields of this slide{verify})"
        )
        assert all(" whole cells " in w for w in s["warnings"][1:])  # more flagged than the model's own labs give
    table = pd.read_csv(out / "specimens.csv")
    assert table.specimen.tolist() == list(specimens) and table.counted.sum() == counts["totals"]["counted"]
    busiest = max(specimens, key=lambda k: specimens[k]["totals"]["counted"])
    assert specimens[busiest]["totals"]["counted"] >= 1
    row = table.set_index("specimen").loc[busiest]
    for cls, c in specimens[busiest]["totals"]["classes"].items():
        assert row[f"{cls}_percent"] == pytest.approx(c["percent"], abs=0.05)
        assert row[f"{cls}_ci95_low"] == pytest.approx(c["ci95"][0], abs=0.05)
    html = (out / "report.html").read_text()
    assert html.count('<h2 id="specimen-') == 3 and "Specimen slide B" in html and "beside the specimen" in html
    assert "specimen slide A: scale" in cli.stdout


def test_several_folders_given_are_a_specimen_each(tmp_path):
    """`wbcid count slide_A slide_B`, each folder holding its fields: one specimen, "all fields", one
    differential of two patients' cells; so were their fields named one by one. Each folder is its own
    specimen now; named by its path where two share a name."""
    from wbcid.smear.specimens import RUN, group_fields

    def fields(*folders: str) -> list[Path]:
        made = []
        for folder in folders:
            (tmp_path / folder).mkdir(parents=True, exist_ok=True)
            made.append(tmp_path / folder / "field.jpg")
            made[-1].write_bytes(b"")
        return made

    a, b, c, d = fields("slide A", "slide B", "x/slide C", "y/slide C")
    assert group_fields([a.parent, b.parent], [a, b]) == ({"slide A": [a], "slide B": [b]}, [])
    assert group_fields([a.parent], [a]) == ({RUN: [a]}, [])  # one folder: one specimen, as before
    assert group_fields([a, b], [a, b]) == ({"slide A": [a], "slide B": [b]}, [])  # `slide*/*.jpg` in a shell
    assert group_fields([a], [a]) == ({RUN: [a]}, [])  # fields of one folder named one by one
    assert group_fields([c.parent, d.parent], [c, d])[0] == {str(c.parent): [c], str(d.parent): [d]}
    (nested,) = fields("lab/patient 1")
    (tmp_path / "slide A" / "verified").mkdir()  # not a specimen folder without images: a flat folder's
    groups, warnings = group_fields([tmp_path / "lab", a.parent], [nested, a])
    assert groups == {"patient 1": [nested], "slide A": [a]} and not warnings
    (twin,) = fields("lab 2/patient 1/day 1")  # two slide folders' specimens of one name: each by its path
    assert group_fields([tmp_path / "lab", tmp_path / "lab 2"], [nested, twin])[0] == {
        str(nested.parent): [nested],
        str(tmp_path / "lab 2" / "patient 1"): [twin],
    }
    (same,) = fields("elsewhere/patient 1")  # a folder given named as a specimen folder of another: both by path
    assert group_fields([tmp_path / "lab", same.parent], [nested, same])[0] == {
        str(nested.parent): [nested],
        str(same.parent): [same],
    }


def test_a_cell_cut_by_the_field_edge_is_flagged_not_counted(data_root, tmp_path):
    """Issue 12 (field edges): a WBC whose box touches the border is partly outside the image; so is
    one that the dark ring of a photo through the eyepiece cuts."""
    from wbcid.smear.counting import count, on_edge

    assert on_edge((0, 40, 90, 120), (640, 480)) and on_edge((500, 40, 640, 120), (640, 480))
    assert not on_edge((10, 40, 90, 120), (640, 480))
    field = data_root / "smears" / "bccd" / "images" / "BloodImage_00000.jpg"
    whole = count(None, [field], tmp_path / "whole")["images"][0]["detections"]
    assert len(whole) == 1 and not whole[0]["edge"]
    x0, y0, x1, y1 = whole[0]["box"]
    with Image.open(field) as image:  # cut the field through the middle of the cell
        image.crop((0, 0, (x0 + x1) // 2, image.height)).save(tmp_path / "cut.png")
    cut = count(None, [tmp_path / "cut.png"], tmp_path / "cut", cell_diameter=200)
    (cell,) = cut["images"][0]["detections"]
    assert cell["edge"] and cell["flagged"] and cut["totals"]["counted"] == 0 and cut["totals"]["flagged"] == 1
    assert "cut by the field" in (tmp_path / "cut" / "report.html").read_text()
    with Image.open(field) as image:  # a photo through the eyepiece: its dark ring cuts the cell's far side
        w, h = image.size
        reach = math.hypot((x0 + x1) / 2 - w / 2, (y0 + y1) / 2 - h / 2) + (x1 - x0) / 4
        disc = Image.new("L", (w, h), 0)
        ImageDraw.Draw(disc).ellipse((w / 2 - reach, h / 2 - reach, w / 2 + reach, h / 2 + reach), fill=255)
        Image.composite(image.convert("RGB"), Image.new("RGB", (w, h), (6, 6, 6)), disc).save(tmp_path / "ring.png")
    (cell,) = count(None, [tmp_path / "ring.png"], tmp_path / "ring", cell_diameter=200)["images"][0]["detections"]
    assert cell["edge"] and cell["flagged"]  # it was counted as a whole cell


def test_fields_over_pils_pixel_limits_are_said_in_a_labs_words(data_root, tmp_path, monkeypatch, capsys):
    """Over PIL's limit (89 Mpx) a field printed a 'decompression bomb DOS attack' warning, and over
    twice it (179 Mpx) it was 'could not read' with that text: a whole-slide scan, not an attack.
    The limit is lowered here so that a 640x480 field stands for such a scan."""
    from PIL import Image

    from wbcid.cli import main
    from wbcid.smear.counting import count

    field = data_root / "smears" / "bccd" / "images" / "BloodImage_00001.jpg"
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 640 * 480 // 3)  # over twice the limit: refused by PIL
    with pytest.raises(WbcidError, match="none of the 1 images could be read"):
        count(None, [field], tmp_path / "scan", cell_diameter=200)
    error = json.loads((tmp_path / "scan" / "fields.jsonl").read_text().splitlines()[1])["error"]
    assert error == "could not read the image (more than the 0.205 Mpx wbcid reads: a whole-slide scan? cut it into " \
        "fields and count those)"  # fmt: skip
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 640 * 480 * 2 // 3)  # over the limit, under twice it: counted
    monkeypatch.setattr(sys, "argv", ["wbcid", "count", "--out", str(tmp_path / "big"), str(field)])
    with warnings.catch_warnings(record=True) as seen, pytest.raises(SystemExit):
        warnings.simplefilter("always")
        main()
    assert not [w for w in seen if "pixels" in str(w.message)] and "bomb" not in capsys.readouterr().err
    assert json.loads((tmp_path / "big" / "counts.json").read_text())["totals"]["detected"] == 1
