"""Readers, label mapping and bad inputs, on real images from ../shared/data."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from wbcid.data import CLASSES, parse_label, read_cells
from wbcid.decoding import load_images
from wbcid.errors import WbcidError
from wbcid.evaluation import compute_metrics
from wbcid.files import list_images
from wbcid.preprocess import Preprocess


@pytest.mark.parametrize(
    "name,expected",
    [
        ("NEUTROPHIL", "neutrophil"),
        ("Neutrophil", "neutrophil"),
        ("neut", "neutrophil"),
        ("SNE", "neutrophil"),
        ("neutrophils", "neutrophil"),
        ("Baso", "basophil"),
        ("Baoso", "basophil"),
        ("BA", "basophil"),
        ("eosi", "eosinophil"),
        ("EOSINOPHIL", "eosinophil"),
        ("lymp", "lymphocyte"),
        ("Lymphocytes", "lymphocyte"),
        ("mono", "monocyte"),
        ("1", "neutrophil"),
        ("5", "basophil"),
        (3, "monocyte"),
        ("neutrófilos", "neutrophil"),  # a lab's own language: es, pt, it, fr, de
        ("Linfócito", "lymphocyte"),
        ("linfociti", "lymphocyte"),
        ("Lymphozyten", "lymphocyte"),
        ("monocitos", "monocyte"),
        ("Monozyt", "monocyte"),
        ("éosinophiles", "eosinophil"),
        ("Eosinophile", "eosinophil"),
        ("basófilo", "basophil"),
        ("Neutrophile", "neutrophil"),
        ("Linfos", "lymphocyte"),  # an abbreviation in the lab's language
        ("Monoz", "monocyte"),
        ("Neutrophil, segmented", "neutrophil"),  # several words, the others not changing the type
        ("Neutrophil (band)", "neutrophil"),
        ("neutrophile Granulozyten", "neutrophil"),
        ("polynucléaires éosinophiles", "eosinophil"),
        ("basophilic granulocyte", "basophil"),
        ("neutrófilos segmentados", "neutrophil"),
        ("Stabkernige Neutrophile", "neutrophil"),
        ("NEUTROPHIL (n=120)", "neutrophil"),  # a count in the folder's name
        ("Eosinophil, n = 7", "eosinophil"),
        ("Monocyte cells", "monocyte"),
    ],
)
def test_parse_label_maps_synonyms(name, expected):
    assert CLASSES[parse_label(name)] == expected


@pytest.mark.parametrize(
    "name",
    ["platelet", "erythroblast", "ig", "-1", "0", "6", "m", "", "cell", "monoblast", "lymphoblast", "basophilie"]
    + ["eosinophilic myelocyte", "neutrophilia", "Granulozyten", "promonocito", "eosinophilic", "Lymphocyte, variant"]
    + ["large granular lymphocyte", "reactive lymphocyte", "segmented", "neutrophilic myelocyte granulocyte"]
    + ["plasma cell", "smudge cells", "n=12", "lymphocyte, plasma cell"],
)
def test_parse_label_rejects_what_is_not_ours(name):
    assert parse_label(name) is None


def test_manifest_filters_source_and_split(data_root):
    cells = read_cells(data_root / "cells.csv", sources=["lisc"])
    table = pd.read_csv(data_root / "cells.csv")
    lisc = table[table.source == "lisc"]
    assert len(cells) == len(lisc)
    assert cells.class_counts() == {c: int((lisc.label == c).sum()) for c in CLASSES}
    test = read_cells(data_root, sources=["pbc"], splits=["test"])  # a folder holding cells.csv works too
    assert {c.split for c in test.cells} == {"test"} and {c.source for c in test.cells} == {"pbc"}
    assert read_cells(data_root, sources="pbc", splits="test").paths == test.paths  # one name: not 'p', 'b', 'c'


def test_manifest_skips_labels_that_are_not_ours_with_a_count(data_root):
    cells = read_cells(data_root / "cells.csv", sources=["pbc", "pbc_other"], splits=["val"])
    assert {c.source for c in cells.cells} == {"pbc"}
    ((reason, count),) = cells.skipped.items()
    assert "platelet" in reason and count == 180  # 10 % of 600 per non-target class


def test_an_image_listed_twice_is_one_cell_and_one_listed_with_two_labels_is_left_out(data_root, tmp_path, caplog):
    """A manifest merged from two people's sheets listed cells twice: each weighed double (and could sit in
    train and val at once), and a cell given two labels trained on both."""
    lisc = read_cells(data_root / "cells.csv", sources=["lisc"])
    neutrophils = [c.path for c in lisc.cells if CLASSES[c.label] == "neutrophil"][:3]
    lymphocytes = [c.path for c in lisc.cells if CLASSES[c.label] == "lymphocyte"][:3]
    for path in neutrophils + lymphocytes:
        shutil.copy(path, tmp_path)
    n, ly = [p.name for p in neutrophils], [p.name for p in lymphocytes]
    rows = [(n[0], "neutrophil"), (n[1], "neutrophil"), (f"./{n[0]}", "Lymphocyte"), (n[2], "NEUTROPHIL")]
    rows += [(ly[0], "lymphocyte"), (ly[1], "lymphocyte"), (ly[2], "lymphocyte"), (ly[2], "Lymphocyte")]
    (tmp_path / "cells.csv").write_text("path,label\n" + "".join(f"{p},{label}\n" for p, label in rows))
    with caplog.at_level(logging.WARNING, logger="wbcid"):
        cells = read_cells(tmp_path / "cells.csv")
    assert [(c.path.name, CLASSES[c.label]) for c in cells.cells] == [
        (n[1], "neutrophil"),
        (n[2], "neutrophil"),
        (ly[0], "lymphocyte"),
        (ly[1], "lymphocyte"),
        (ly[2], "lymphocyte"),
    ]
    assert "skipped 1 image(s): listed again with the same label (kept once)" in caplog.text
    assert f"skipped 1 image(s): listed with different labels, e.g. {n[0]}: 'neutrophil' and 'Lymphocyte'" in (
        caplog.text
    )


def test_unknown_source_names_the_available_ones(data_root):
    with pytest.raises(WbcidError, match="available: .*'lisc'"):
        read_cells(data_root / "cells.csv", sources=["nosuchlab"])
    with pytest.raises(WbcidError, match="no cells with split 'test'; available: none [(]this layout has no split"):
        read_cells(data_root / "cells" / "tecom", splits=["test"])  # it said "available: ''"


def test_split_folders_are_the_split_not_specimens(data_root, tmp_path):
    """Kaggle's BCCD layout (images/TRAIN/NEUTROPHIL/..., TEST/, TEST_SIMPLE/) was read as three specimens:
    `wbcid train` trained on the test images. A folder named as a split is the split; "test1" and "Test
    patient 3" stay specimens, whose cells are a group."""
    from wbcid.splits import split_train_val

    tecom = read_cells(data_root / "cells" / "tecom")
    by_class = {
        name: [c.path for c in tecom.cells if CLASSES[c.label] == name][:8] for name in ("neutrophil", "lymphocyte")
    }
    places = {"TRAIN": slice(0, 5), "TEST": slice(5, 7), "TEST_SIMPLE": slice(7, 8)}
    for folder, part in places.items():
        for name, paths in by_class.items():
            (tmp_path / "images" / folder / name.upper()).mkdir(parents=True)
            for path in paths[part]:
                shutil.copy(path, tmp_path / "images" / folder / name.upper())
    cells = read_cells(tmp_path / "images")
    assert {(c.path.parent.parent.name, c.split, c.group) for c in cells.cells} == {
        ("TRAIN", "train", ""),
        ("TEST", "test", ""),
        ("TEST_SIMPLE", "test", ""),
    }
    assert len(read_cells(tmp_path / "images", splits="test")) == 6  # `wbcid evaluate --split test`
    train, val = split_train_val(cells)
    assert {c.split for c in train.cells + val.cells} == {"train"} and len(train) + len(val) == 10
    (tmp_path / "images" / "TRAIN").rename(tmp_path / "images" / "test1")  # specimens, not splits
    (tmp_path / "images" / "TEST_SIMPLE").rename(tmp_path / "images" / "Test patient 3")
    for name in ("test1", "Test patient 3"):
        specimen = [c for c in read_cells(tmp_path / "images").cells if c.path.parent.parent.name == name]
        assert {(c.split, c.group) for c in specimen} == {("", name)}


def test_image_folder_reader_on_real_tree(data_root):
    cells = read_cells(data_root / "cells" / "tecom")
    table = pd.read_csv(data_root / "cells.csv")
    tecom = table[table.source == "tecom"]
    assert cells.class_counts() == {c: int((tecom.label == c).sum()) for c in CLASSES}
    assert all(CLASSES[c.label] == c.path.parent.name for c in cells.cells)


def test_image_folder_synonyms_unknown_folders_and_stray_files(data_root, tmp_path):
    src = data_root / "cells" / "cellavision"
    for folder, label in (("NEUTROPHIL", "neutrophil"), ("Baoso", "basophil"), ("eosi", "eosinophil")):
        (tmp_path / folder).mkdir()
        for f in sorted((src / label).iterdir())[:3]:
            (tmp_path / folder / f.name).symlink_to(f)
    (tmp_path / "platelets").mkdir()
    (tmp_path / "platelets" / "x.jpg").write_bytes(b"")
    (tmp_path / "NEUTROPHIL" / "notes.txt").write_text("not an image")
    for name in ("NEUTROPHIL/._a.jpg", "eosi/.DS_Store", ".ipynb_checkpoints/b.jpg", "eosi/.cache/c.jpg"):  # not data
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"\x00\x05\x16\x07 macOS's AppleDouble, not an image")
    cells = read_cells(tmp_path)
    assert cells.class_counts() == {"neutrophil": 3, "lymphocyte": 0, "monocyte": 0, "eosinophil": 3, "basophil": 3}
    reasons = " ".join(cells.skipped)
    assert "'platelets'" in reasons and "not an image" in reasons and "ipynb" not in reasons
    assert cells.skipped["not an image file (by extension)"] == 1  # notes.txt, not .DS_Store
    found = list_images([tmp_path])  # predict, count, explain
    assert len(found) == 10 and not [f for f in found if f.name.startswith(".") or ".cache" in f.parts]


def test_original_json_layout(data_root, tmp_path):
    """{filename: "1".."5"} beside an image folder; "-1" entries and foreign labels are skipped."""
    images = tmp_path / "images"
    images.mkdir()
    mapping = {}
    for label_index, label in enumerate(CLASSES, start=1):
        for f in sorted((data_root / "cells" / "lisc" / label).iterdir())[:2]:
            (images / f.name).symlink_to(f)
            mapping[f.name] = str(label_index)
    skipped_name = next(iter(mapping))
    mapping[skipped_name] = "-1"
    mapping["absent.jpg"] = "2"
    mapping[sorted(mapping)[1]] = "7"
    (tmp_path / "labels.json").write_text(json.dumps(mapping))
    for path in (tmp_path / "labels.json", tmp_path):  # the JSON itself, or the folder holding it
        cells = read_cells(path)
        assert len(cells) == 8
        assert all(CLASSES[c.label] == _lisc_label(data_root, c.path.name) for c in cells.cells)
        assert cells.skipped["marked -1 (skip) in the JSON"] == 1
        assert cells.skipped["listed in the JSON but missing on disk"] == 1
        assert any("'7'" in reason for reason in cells.skipped)


def _lisc_label(data_root: Path, name: str) -> str:
    return next(p.parent.name for p in (data_root / "cells" / "lisc").glob(f"*/{name}"))


def test_missing_and_empty_inputs_fail_with_a_message(tmp_path):
    with pytest.raises(WbcidError, match="does not exist"):
        read_cells(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(WbcidError, match="no labelled images"):
        read_cells(tmp_path / "empty")
    bad = tmp_path / "bad.csv"
    bad.write_text("name,kind\na.jpg,neutrophil\n")
    with pytest.raises(WbcidError, match="columns 'path' and 'label'"):
        read_cells(bad)
    with pytest.raises(WbcidError, match="no images"):
        list_images([tmp_path / "empty"])
    with pytest.raises(WbcidError, match="no images or folders given"):  # was "no images (...) in " and nothing
        list_images([])
    (tmp_path / "cell.jpg").write_bytes(b"a cell")
    (tmp_path / "numbers.csv").write_text("path,label\ncell.jpg,7\n")  # labels 1..5 are ours: 7 is not
    with pytest.raises(WbcidError, match="no labelled images .* found [(]skipped: 1 label not one of .*'7'"):
        read_cells(tmp_path / "numbers.csv")


def test_corrupt_and_odd_images_are_counted_not_fatal(data_root, tmp_path, caplog):
    from PIL import Image

    real = sorted((data_root / "cells" / "bccd" / "neutrophil").iterdir())[:3]
    (tmp_path / "neutrophil").mkdir()
    for f in real:
        (tmp_path / "neutrophil" / f.name).symlink_to(f)
    (tmp_path / "neutrophil" / "corrupt.jpg").write_bytes(b"\xff\xd8 definitely not a jpeg")
    (tmp_path / "neutrophil" / "truncated.jpg").write_bytes(real[0].read_bytes()[:200])
    Image.open(real[1]).convert("L").save(tmp_path / "neutrophil" / "grey.png")
    Image.open(real[2]).convert("RGBA").resize((301, 177)).save(tmp_path / "neutrophil" / "rgba.png")
    cells = read_cells(tmp_path)
    images, kept = load_images(cells, Preprocess(64))
    assert images.shape == (5, 3, 64, 64) and len(kept) == 5
    assert kept.skipped["unreadable or not an image"] == 2
    assert {p.name for p in kept.paths} >= {"grey.png", "rgba.png"}
    assert "1 image(s) with a problem, e.g. " in caplog.text and "grey.png: grey-scale image: WBC types" in caplog.text


def test_missing_classes_are_scored_in_the_five_class_space():
    """A test set without monocytes and basophils keeps indices fixed; averages use present classes."""
    y_true = np.array([0, 0, 1, 1, 3, 3])
    y_pred = np.array([0, 1, 1, 1, 3, 2])
    m = compute_metrics(y_true, y_pred)
    assert m["labels"] == list(CLASSES)
    assert m["classes_present"] == ["neutrophil", "lymphocyte", "eosinophil"]
    assert np.array(m["confusion_matrix"]).shape == (5, 5)
    assert m["confusion_matrix"][3][2] == 1  # an eosinophil called monocyte stays in row/column 3/2
    assert m["per_class"]["basophil"]["recall"] is None and m["per_class"]["basophil"]["support"] == 0
    assert m["balanced_accuracy"] == pytest.approx((0.5 + 1 + 0.5) / 3)
    f1 = {"neutrophil": 2 / 3, "lymphocyte": 0.8, "eosinophil": 2 / 3}
    assert m["macro_f1"] == pytest.approx(np.mean(list(f1.values())))
    assert m["accuracy"] == pytest.approx(4 / 6)


def test_list_images_recurses_and_sorts(data_root):
    files = list_images([data_root / "cells" / "cellavision" / "basophil"])
    assert len(files) == 3 and files == sorted(files)
    assert all(os.path.isfile(f) for f in files)


def test_a_linked_folder_is_searched_once(data_root, tmp_path):
    """A slide's folder linked into the lab's tree was skipped without a word (os.walk does not follow
    links); followed now, a link back up the tree and a second link to one folder are searched once."""
    (tmp_path / "lab").mkdir()
    (tmp_path / "lab" / "slide1").symlink_to(data_root / "cells" / "cellavision" / "basophil", target_is_directory=True)
    (tmp_path / "lab" / "again").symlink_to(data_root / "cells" / "cellavision" / "basophil", target_is_directory=True)
    (tmp_path / "lab" / "loop").symlink_to(tmp_path / "lab", target_is_directory=True)
    found = list_images([tmp_path / "lab"])
    assert len(found) == 3 and {f.name for f in found} == {f.name for f in (tmp_path / "lab" / "slide1").iterdir()}


def test_list_images_leaves_out_what_wbcid_wrote_inside_the_folder(data_root, tmp_path, caplog):
    """A count's annotated fields, a review's thumbnails and a run's plots are not new cells."""
    cells = sorted((data_root / "cells" / "cellavision" / "basophil").iterdir())
    for folder, marker in (("lab", None), ("lab/counts/slide1", "fields.jsonl"), ("lab/p.review", "review.sqlite"),
                           ("lab/runs/mylab", "model.pt")):  # fmt: skip
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "cell.jpg").symlink_to(cells[0])
        if marker:
            (tmp_path / folder / marker).write_text("")
    (tmp_path / "lab/counts/slide1/annotated").mkdir()
    (tmp_path / "lab/counts/slide1/annotated/field.jpg").symlink_to(cells[1])
    assert list_images(tmp_path / "lab") == [tmp_path / "lab" / "cell.jpg"]
    assert "lab/counts/slide1 (a count); " in caplog.text and "p.review (a review)" in caplog.text
    assert "runs/mylab (a model's run)" in caplog.text


def test_other_image_formats_are_read_or_left_out_with_a_warning(data_root, tmp_path, caplog):
    """GIF, JPEG 2000, AVIF and Windows' .jfif JPEGs were left out unsaid, though Pillow reads them;
    a phone's HEIC photos (and raw, DICOM, whole-slide files), which it cannot, are named and counted."""
    from PIL import Image

    from wbcid.inference import predict

    cell = Image.open(next((data_root / "cells" / "lisc" / "monocyte").glob("*.jpg"))).convert("RGB")
    for name in ("a.jfif", "b.gif", "c.jp2", "d.avif"):
        cell.save(tmp_path / name, format="JPEG" if name.endswith("jfif") else None)
    (tmp_path / "e.heic").write_bytes(b"\x00\x00\x00\x18ftypheic")
    (tmp_path / "notes.txt").write_text("not an image")
    table = predict(None, tmp_path)
    assert [Path(p).name for p in table.path] == ["a.jfif", "b.gif", "c.jp2", "d.avif"]
    assert (table.label == "monocyte").all() and (table.error == "").all()
    assert "left out images in formats wbcid does not read (1 .heic): save them as JPEG" in caplog.text
    assert "notes.txt" not in caplog.text and ".txt" not in caplog.text
    for name in ("a.jfif", "b.gif", "c.jp2", "d.avif"):
        (tmp_path / name).unlink()
    with pytest.raises(WbcidError, match=r"no images .* 1 \.heic file\(s\) in formats wbcid does not read"):
        list_images(tmp_path)


def test_a_folder_of_unsorted_images_is_not_labelled_data_and_the_message_says_what_is(data_root, tmp_path):
    """A folder of cell images without class folders said only "no labelled images found"."""
    for cell in sorted((data_root / "cells" / "lisc" / "monocyte").glob("*.jpg"))[:3]:
        (tmp_path / cell.name).symlink_to(cell)
    (tmp_path / "._a.jpg").write_bytes(b"macOS metadata")
    with pytest.raises(WbcidError, match=r"its 3 image\(s\) lie in the folder itself.*class folders.*wbcid predict"):
        read_cells(tmp_path)
    (tmp_path / "monocyte").mkdir()  # one type's folder named instead of the folder of type folders
    for cell in sorted((data_root / "cells" / "lisc" / "monocyte").glob("*.jpg"))[:2]:
        (tmp_path / "monocyte" / cell.name).symlink_to(cell)
    with pytest.raises(
        WbcidError, match=f"its name says their type \\(monocyte\\): pass the folder that holds it, {tmp_path}$"
    ):
        read_cells(tmp_path / "monocyte")


def test_a_reviews_files_named_as_data_lead_to_its_export(data_root, tmp_path):
    """A prediction's review folder or database named as verified cells said "no labelled images found"
    or "expected a manifest .csv, ..."; an export's audit.csv was read as a manifest without labels."""
    from wbcid.inference import predict
    from wbcid.web import ReviewStore, export_review

    cells = sorted((data_root / "cells" / "lisc" / "monocyte").glob("*.jpg"))[:2]
    predict(None, cells, tmp_path / "p.csv")
    store = ReviewStore.open(tmp_path / "p.csv")
    store.set_label(store.cells()[0]["id"], "monocyte")
    for named in (store.folder, store.path):
        with pytest.raises(WbcidError, match=f"{store.folder} is a review's folder: .*export them"):
            read_cells(named)
    out = export_review(store, store.folder / "verified")
    with pytest.raises(WbcidError, match=f"is a review's folder: .*pass {out}, its export"):
        read_cells(store.path)
    assert read_cells(out / "audit.csv").paths == read_cells(out).paths  # an export's file: the export


def test_capitalised_headers_and_all_missing_paths(data_root, tmp_path):
    """Issue 13.13: 'Path,Label' was refused; all-missing paths said only 'no labelled images found'."""
    image = next((data_root / "cells" / "lisc" / "basophil").glob("*.jpg"))
    (tmp_path / "caps.csv").write_text(f"Path,Label\n{image},Basophil\n")
    assert read_cells(tmp_path / "caps.csv").class_counts()["basophil"] == 1
    (tmp_path / "excel.csv").write_text(f"\ufeffpath;label\r\n{image};basophil\r\n")  # Excel, many locales
    assert read_cells(tmp_path / "excel.csv").class_counts()["basophil"] == 1  # was: "missing ['label', 'path']"
    (tmp_path / "lims.csv").write_text(f"Image,Cell Type\n{image},basophil\n")  # a lab's own names
    assert read_cells(tmp_path / "lims.csv").class_counts()["basophil"] == 1
    (tmp_path / "two.csv").write_text(f"file,filename,class\n{image},{image},basophil\n")  # which? not guessed
    with pytest.raises(WbcidError, match=r"missing \['path'\]; read as them where only one is there: path: file"):
        read_cells(tmp_path / "two.csv")
    (tmp_path / "cells" / "neutrophil").mkdir(parents=True)
    (tmp_path / "cells" / "neutrophil" / "a.jpg").symlink_to(image)
    (tmp_path / "windows.csv").write_text("path,label\ncells\\neutrophil\\a.jpg,neutrophil\n")  # made on Windows
    assert read_cells(tmp_path / "windows.csv").paths == [tmp_path / "cells" / "neutrophil" / "a.jpg"]
    (tmp_path / "drive.csv").write_text("path,label\nC:\\study\\cells\\neutrophil\\a.jpg,neutrophil\n")
    with pytest.raises(WbcidError, match=r"C:\\study.* are where the images were on a Windows machine; write them rel"):
        read_cells(tmp_path / "drive.csv")  # was: "1 of 1 paths do not exist", and the path shown was wrong
    (tmp_path / "células").mkdir()
    (tmp_path / "células" / "b.jpg").symlink_to(image)
    excel = "path;label\r\ncells/neutrophil/a.jpg;neutrófilos\r\n;\r\ncélulas/b.jpg;Basófilo\r\n;\r\n"
    (tmp_path / "ansi.csv").write_bytes(excel.encode("cp1252"))  # Excel's plain "CSV" in Western locales
    ansi = read_cells(tmp_path / "ansi.csv")
    assert [CLASSES[i] for i in ansi.labels] == ["neutrophil", "basophil"] and not ansi.skipped  # blank rows: no rows
    (tmp_path / "tabs.tsv").write_text("path\tlabel\ncells/neutrophil/a.jpg\tneutrophil\n")
    assert read_cells(tmp_path / "tabs.tsv").paths == [tmp_path / "cells" / "neutrophil" / "a.jpg"]
    (tmp_path / "cells.xlsx").write_bytes(b"PK\x03\x04")
    with pytest.raises(WbcidError, match="cells.xlsx is a spreadsheet: save it as CSV"):
        read_cells(tmp_path / "cells.xlsx")
    (tmp_path / "gone.csv").write_text("path,label\n" + "".join(f"img{i}.jpg,neutrophil\n" for i in range(20)))
    with pytest.raises(WbcidError, match=r"20 of 20 paths do not exist \(paths are relative to the CSV's folder"):
        read_cells(tmp_path / "gone.csv")


def test_sixteen_bit_grey_images_are_scaled_not_clipped_white(data_root, tmp_path):
    """Issue 13.7: 16-bit grey PNGs were read as all white by predict and explain."""
    from PIL import Image

    from wbcid.decoding import decode_image
    from wbcid.preprocess import Preprocess

    grey = Image.open(next((data_root / "cells" / "lisc" / "lymphocyte").glob("*.jpg"))).convert("L")
    Image.fromarray(np.asarray(grey, dtype=np.uint16) * 257).save(tmp_path / "deep.png")  # 16-bit PNG
    grey.save(tmp_path / "flat.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    prep = Preprocess(128, crop=False)
    deep, flat = decode_image(tmp_path / "deep.png", prep), decode_image(tmp_path / "flat.png", prep)
    assert deep.mean() < 250 and np.abs(deep.astype(int) - flat.astype(int)).max() <= 1


def test_a_cameras_twelve_bit_colour_tiff_reads_as_its_jpeg(data_root, tmp_path):
    """A scientific camera's 12-bit data saved in a 16-bit colour TIFF (or PNG) was read by its high
    bytes: nearly black, so predict flagged every cell and count stopped with a traceback."""
    import imagecodecs
    import tifffile
    from PIL import Image

    from wbcid.decoding import decode_image
    from wbcid.preprocess import Preprocess
    from wbcid.smear.counting import count

    cell = next((data_root / "cells" / "lisc" / "eosinophil").glob("*.jpg"))
    field = data_root / "smears/bccd/images/BloodImage_00000.jpg"
    for name, source in (("cell", cell), ("field", field)):
        twelve = np.asarray(Image.open(source).convert("RGB"), dtype=np.uint16) * 16  # 0..4080 of 4095
        tifffile.imwrite(tmp_path / f"{name}.tif", twelve, photometric="rgb", compression="lzw")
        planes = np.moveaxis(twelve * 16, -1, 0)  # full 16-bit range, stored plane by plane
        tifffile.imwrite(tmp_path / f"{name}16.tif", planes, photometric="rgb", planarconfig="separate")
        (tmp_path / f"{name}.png").write_bytes(imagecodecs.png_encode(twelve))  # a 16-bit PNG, just the same
    assert Image.open(tmp_path / "cell.tif").mode == "RGB"  # what PIL makes of it: its high bytes
    prep = Preprocess(128)
    jpeg = decode_image(cell, prep).astype(int)
    for wide in ("cell.tif", "cell16.tif", "cell.png"):
        assert np.abs(decode_image(tmp_path / wide, prep).astype(int) - jpeg).max() <= 2, wide

    (tmp_path / "broken.tif").write_bytes((tmp_path / "field.tif").read_bytes()[:5000])
    jpeg_run, tiff_run = (
        count(None, paths, tmp_path / out, cell_diameter=200)["images"]
        for paths, out in (([field], "jpeg"), ([tmp_path / "field.tif", tmp_path / "broken.tif"], "tiff"))
    )
    assert jpeg_run[0]["detections"]
    assert [(d["label"], d["box"]) for d in tiff_run[0]["detections"]] == [
        (d["label"], d["box"]) for d in jpeg_run[0]["detections"]
    ]
    assert "cannot decode this TIFF's 16-bit samples" in tiff_run[1]["error"]  # damaged: skipped, said why


def test_map_ahead_keeps_order_bounds_work_in_flight_and_stops_when_dropped():
    """Decoding and counting run through it: results in input order, never more than ``ahead``
    items started beyond what was consumed, and nothing new started once the consumer stops."""
    import threading
    import time

    from wbcid.decoding import map_ahead

    started, lock = [], threading.Lock()

    def slow_square(x: int) -> int:
        with lock:
            started.append(x)
        time.sleep(0.01 * (x % 3))  # finishing out of order
        return x * x

    assert list(map_ahead(slow_square, range(20), workers=3, ahead=4)) == [x * x for x in range(20)]
    started.clear()
    results = map_ahead(slow_square, range(1000), workers=2, ahead=4)
    assert [next(results) for _ in range(3)] == [0, 1, 4]
    assert len(started) <= 3 + 4 + 1
    results.close()  # what an interruption or an early break does
    assert len(started) <= 3 + 4 + 1


def test_merged_cell_sets_keep_one_entry_per_image_with_its_latest_label(tmp_path):
    """Two rounds of verification (or one export passed twice) must not count a cell twice; a cell
    verified again keeps its later label."""
    from collections import Counter

    from wbcid.data import Cell, CellSet

    first = CellSet([Cell(tmp_path / "a.png", 0), Cell(tmp_path / "b.png", 1)], Counter({"unreadable": 1}), "one")
    again = CellSet([Cell(tmp_path / "x" / ".." / "b.png", 3), Cell(tmp_path / "c.png", 4)], Counter(), "two")
    merged = CellSet.merged([first, again])
    assert [(c.path.name, c.label) for c in merged.cells] == [("a.png", 0), ("b.png", 3), ("c.png", 4)]
    assert merged.skipped == Counter({"unreadable": 1, "listed again (its latest label kept)": 1})
    assert merged.origin == "one + two"
    twin = tmp_path / "export2" / "12.png"  # the same cell in a second export of the review
    twin.parent.mkdir()
    for path in (tmp_path / "b.png", twin):
        path.write_bytes(b"the same cell's bytes")
    twice = CellSet.merged([first, CellSet([Cell(twin, 2)], Counter(), "three")])
    assert [(c.path, c.label) for c in twice.cells] == [(tmp_path / "a.png", 0), (twin, 2)]
