"""Differential counting: interval and percentage arithmetic, reference flags, and whole smears in,
counts.json, annotated fields and a report out, bad inputs included."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from PIL import Image

from wbcid.count import REFERENCE_RANGES, differential, proportion_interval, read_reference
from wbcid.data import CLASSES
from wbcid.errors import WbcidError


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
    assert result["counted"] == 0 and all(c["percent"] is None and c["flag"] is None for c in result["classes"].values())
    json.dumps(result, allow_nan=False)  # valid JSON, no NaN


def test_bad_labels_and_reference_files_are_clear_errors(tmp_path):
    with pytest.raises(WbcidError, match="not one of the five"):
        differential(["neutrophil", "platelet"])
    path = tmp_path / "ranges.json"
    path.write_text(json.dumps({"neutrophil": [50, 70]}))
    with pytest.raises(WbcidError, match="lymphocyte"):
        read_reference(path)
    path.write_text(json.dumps({c: [1, 2] for c in CLASSES}))
    assert read_reference(path)["basophil"] == (1.0, 2.0)


def test_count_command_on_real_smears_with_bad_inputs(data_root, tmp_path):
    smears = data_root / "smears" / "bccd" / "images"
    fields = [smears / f"BloodImage_{i:05d}.jpg" for i in (0, 10, 34, 100)]  # 6 WBCs
    grey = tmp_path / "grey.png"
    Image.open(fields[0]).convert("L").save(grey)
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff not a jpeg")
    out = tmp_path / "count"
    result = subprocess.run([sys.executable, "-m", "wbcid", "count", "--out", str(out), *map(str, fields),
                             str(grey), str(corrupt)], capture_output=True, text=True)
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
    html = (out / "report.html").read_text()
    assert "95 % interval" in html and "corrupt.jpg" in html and "Reference ranges" in html
    assert len(list((out / "flagged").glob("*.jpg"))) == totals["flagged"]


def test_count_fails_clearly_when_nothing_is_readable(tmp_path):
    from wbcid.count import count

    bad = tmp_path / "bad.png"
    bad.write_bytes(b"nope")
    with pytest.raises(WbcidError, match="could be read"):
        count(None, [bad], tmp_path / "out")


def test_an_interrupted_count_resumes_without_redoing_finished_fields(data_root, tmp_path, monkeypatch):
    import wbcid.count as counting

    fields = [data_root / "smears" / "bccd" / "images" / f"BloodImage_{i:05d}.jpg" for i in (0, 10, 34, 100)]
    straight = counting.count(None, fields, tmp_path / "straight")
    classify, calls = counting.classify_field, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return classify(*args, **kwargs)

    monkeypatch.setattr(counting, "classify_field", interrupted)
    with pytest.raises(KeyboardInterrupt):
        counting.count(None, fields, tmp_path / "out")
    assert len((tmp_path / "out" / "fields.jsonl").read_text().splitlines()) == 1 + 2  # settings + 2 fields
    with pytest.raises(WbcidError, match="--resume"):
        counting.count(None, fields, tmp_path / "out")
    with pytest.raises(WbcidError, match="counted with"):
        counting.count(None, fields, tmp_path / "out", cell_diameter=150, resume=True)
    resumed = counting.count(None, fields, tmp_path / "out", resume=True)
    assert len(calls) == 3 + 2  # only the two unfinished fields were classified again
    assert resumed["totals"] == straight["totals"]
    written = [json.loads((tmp_path / run / "counts.json").read_text())["images"] for run in ("out", "straight")]
    assert [e["detections"] for e in written[0]] == [e["detections"] for e in written[1]]
