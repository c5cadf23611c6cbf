"""The review app at the HTTP level (FastAPI's TestClient) over a real count of BCCD fields."""

from __future__ import annotations

import json
import shutil
import socket
import sqlite3
import sys
import threading
from contextlib import closing
from pathlib import Path

import pandas as pd
import pytest
from fastapi.testclient import TestClient
from PIL import Image

import wbcid
from wbcid.data import CLASSES, read_cells
from wbcid.errors import WbcidError
from wbcid.files import list_images
from wbcid.inference import predict
from wbcid.smear.counting import count
from wbcid.web import ReviewStore, create_app, export_review, serve
from wbcid.web import store as store_module

FIELDS = [
    "BloodImage_00000.jpg",
    "BloodImage_00001.jpg",
    "BloodImage_00002.jpg",
    "BloodImage_00005.jpg",
    "BloodImage_00006.jpg",
    "BloodImage_00010.jpg",
    "BloodImage_00034.jpg",
    "BloodImage_00100.jpg",
]


@pytest.fixture(scope="module")
def counted(data_root: Path, tmp_path_factory) -> Path:
    """A count made once with the bundled model; each test reviews a fresh copy of it."""
    out = tmp_path_factory.mktemp("count") / "run"
    count(None, [data_root / "smears/bccd/images" / name for name in FIELDS], out)
    return out


@pytest.fixture
def run(counted: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(counted, tmp_path / "run"))


def test_list_correct_and_live_differential(run: Path):
    client = TestClient(create_app(run, reviewer="tester"))
    cells = client.get("/api/cells").json()["cells"]
    assert len(cells) >= len(FIELDS)
    assert {"id", "label", "model_label", "confidence", "flagged", "reviewed", "field", "image"} <= set(cells[0])
    assert [c["flagged"] for c in cells] == sorted((c["flagged"] for c in cells), reverse=True)  # flagged first
    before = client.get("/api/differential").json()
    target = next(c for c in cells if c["label"] != "basophil")
    response = client.put(f"/api/cells/{target['id']}", json={"label": "basophil"})
    assert response.status_code == 200
    cell = response.json()
    assert (cell["label"], cell["model_label"], cell["reviewed"], cell["reviewer"]) == (
        "basophil",
        target["model_label"],
        True,
        "tester",
    )
    after = client.get("/api/differential").json()
    assert after["classes"]["basophil"]["count"] == before["classes"]["basophil"]["count"] + 1
    assert after["verified"] == 1 and set(after["classes"]) == set(CLASSES)
    assert client.get(f"/api/cells/{target['id']}/image").headers["content-type"] == "image/jpeg"
    assert client.get(f"/api/cells/{target['id']}/field").status_code == 200


def test_each_flagged_cell_says_why(run: Path, data_root: Path, tmp_path: Path):
    """The page showed 'flagged' without a reason: cut by the field's edge, unlike the model's cells,
    or (a prediction's) grey, dark, blank or of several pages, which the technologist decides differently."""
    from wbcid.decoding import PROBLEMS
    from wbcid.web.runs import CUT, UNLIKE

    detections = [d for e in json.loads((run / "counts.json").read_text())["images"] for d in e["detections"]]
    cells = TestClient(create_app(run)).get("/api/cells").json()["cells"]
    edge = sum(d["edge"] for d in detections)
    assert edge and sum(CUT in (c["why"] or "") for c in cells) == edge
    assert sum(UNLIKE in (c["why"] or "") for c in cells) == sum(d["ood_score"] > 1 for d in detections)
    assert all(bool(c["why"]) == c["flagged"] for c in cells)
    colour = sorted((data_root / "cells/lisc/monocyte").glob("*.jpg"))[0]
    Image.open(colour).convert("L").save(tmp_path / "grey.png")
    predict(None, [colour, tmp_path / "grey.png"], tmp_path / "p.csv")
    cells = TestClient(create_app(tmp_path / "p.csv")).get("/api/cells").json()["cells"]
    why = {Path(c["image"]).name: c["why"] for c in cells}
    assert why["grey.png"].startswith(PROBLEMS["grey"]) and why[colour.name] in (None, UNLIKE)
    with closing(sqlite3.connect(run / "review.sqlite")) as db, db:  # a review begun before the reasons
        db.execute("ALTER TABLE cells DROP COLUMN why")
    assert len(ReviewStore.open(run).cells()) == len(detections)  # carries on, the reasons left unsaid


def test_other_leaves_the_differential_and_undo_restores(run: Path):
    client = TestClient(create_app(run))
    cell = next(c for c in client.get("/api/cells").json()["cells"] if not c["flagged"])
    counted = client.get("/api/differential").json()["counted"]
    assert client.put(f"/api/cells/{cell['id']}", json={"label": "other"}).status_code == 200
    assert client.get("/api/differential").json()["counted"] == counted - 1
    restored = client.delete(f"/api/cells/{cell['id']}/review").json()
    assert (restored["label"], restored["reviewed"]) == (cell["model_label"], False)
    assert client.get("/api/differential").json()["counted"] == counted
    changes = client.get("/api/audit").json()["changes"]
    assert [(a["cell_id"], a["new_label"], a["new_reviewed"]) for a in changes] == [
        (cell["id"], "other", 1),
        (cell["id"], cell["model_label"], 0),
    ]


def test_bad_label_is_422_and_unknown_cell_404(run: Path):
    client = TestClient(create_app(run))
    cell = client.get("/api/cells").json()["cells"][0]
    for body in ({"label": "platelet"}, {"label": 3}, {}, {"label": "<script>"}):
        assert client.put(f"/api/cells/{cell['id']}", json=body).status_code == 422
    assert client.put("/api/cells/99999", json={"label": "monocyte"}).status_code == 404
    assert client.get("/api/cells/99999/image").status_code == 404
    assert client.get("/api/cells/1").json()["reviewed"] is False  # nothing was written


def test_the_api_docs_need_nothing_from_outside(run: Path):
    client = TestClient(create_app(run))
    page = client.get("/api/docs").text
    assert "SwaggerUIBundle" in page and "https://" not in page  # a CDN is out of reach on an offline workstation
    schema = client.get("/openapi.json").json()
    assert schema["paths"]["/api/cells/{cell_id}"] and schema["info"]["version"] == wbcid.__version__


def test_no_file_outside_the_run_can_be_read(run: Path):
    client = TestClient(create_app(run))
    secret = "root:x:0:0"
    for url in [
        "/api/cells/..%2F..%2F..%2Fetc%2Fpasswd/image",
        "/api/cells/%2e%2e/%2e%2e/etc/passwd",
        "/api/cells//etc/passwd/image",
        "/static/../../../../etc/passwd",
        "/static/%2e%2e/%2e%2e/store.py",
        "/static/..%2F..%2F..%2F..%2Fetc%2Fpasswd",
        "/api/cells/1/../../../../etc/passwd",
    ]:
        response = client.get(url)
        assert response.status_code in (404, 405, 422), url
        assert secret not in response.text and "ReviewStore" not in response.text, url


def test_another_sites_page_can_neither_change_nor_read_the_review(run: Path):
    """A page of another site open in the technologist's browser could send corrections to the review's
    address (cross-site request forgery), or, with its name pointed at 127.0.0.1 (DNS rebinding), read
    and change it as if it were the review's own page."""
    from wbcid.web.app import local_names_only

    client = TestClient(create_app(run))
    cell = client.get("/api/cells").json()["cells"][0]
    evil = {"Origin": "http://evil.example"}
    for response in (
        client.put(f"/api/cells/{cell['id']}", json={"label": "basophil"}, headers=evil),
        client.delete(f"/api/cells/{cell['id']}/review", headers=evil),
        client.post("/api/export", headers=evil),
    ):
        assert response.status_code == 403 and "another site's page (http://evil.example)" in response.json()["detail"]
    assert client.get(f"/api/cells/{cell['id']}").json()["reviewed"] is False and not (run / "verified").exists()
    own = {"Origin": "http://testserver"}  # the page itself: its origin is the address it was served from
    assert client.put(f"/api/cells/{cell['id']}", json={"label": "basophil"}, headers=own).status_code == 200

    app = create_app(run)
    local_names_only(app, "127.0.0.1")  # as `wbcid review` serves on the loopback address
    for name, status in (("127.0.0.1:8765", 200), ("localhost:8765", 200), ("evil.example", 400)):
        assert TestClient(app, base_url=f"http://{name}").get("/api/cells").status_code == status, name


def test_corrections_survive_a_restart(run: Path):
    first = TestClient(create_app(run))
    cell = first.get("/api/cells").json()["cells"][-1]
    first.put(f"/api/cells/{cell['id']}", json={"label": "monocyte"})
    del first  # the server is gone; the database holds the correction
    again = TestClient(create_app(run)).get(f"/api/cells/{cell['id']}").json()
    assert (again["label"], again["reviewed"]) == ("monocyte", True)


def test_two_clients_correcting_at_once_lose_nothing(run: Path):
    tabs = [TestClient(create_app(run)), TestClient(create_app(run))]
    ids = [c["id"] for c in tabs[0].get("/api/cells").json()["cells"]]
    labels = {cell_id: CLASSES[i % len(CLASSES)] for i, cell_id in enumerate(ids)}

    def correct(tab: TestClient, mine: list[int]) -> None:
        for cell_id in mine:
            assert tab.put(f"/api/cells/{cell_id}", json={"label": labels[cell_id]}).status_code == 200

    threads = [threading.Thread(target=correct, args=(tab, ids[i::2])) for i, tab in enumerate(tabs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    final = {c["id"]: c["label"] for c in tabs[1].get("/api/cells").json()["cells"]}
    assert final == labels
    assert len(ReviewStore.open(run).audit()) == len(ids)


def test_two_reviews_started_at_once_import_the_cells_once(run: Path, monkeypatch):
    """Two technologists starting `wbcid review` on a new count at the same moment: both found no cells
    yet and both imported them, so the page showed every cell twice (156 of 78 BCCD cells, by hand).
    Here the first import is held open until the second review has looked (2 s at most)."""
    imported, real = threading.Event(), store_module._carry_earlier

    def held(*args):
        if not imported.is_set():
            imported.set()
            threading.Event().wait(2)
        return real(*args)

    monkeypatch.setattr(store_module, "_carry_earlier", held)
    first = threading.Thread(target=ReviewStore.open, args=(run,))
    first.start()
    assert imported.wait(30)
    second = ReviewStore.open(run)
    first.join()
    detections = sum(len(e["detections"]) for e in json.loads((run / "counts.json").read_text())["images"])
    assert len(second.cells()) == detections


def test_two_reviews_started_at_once_cut_the_thumbnails_without_failing(counted: Path, tmp_path: Path):
    """Both cut the same thumbnails through one half-written file name: one's rename took the other's
    file, and its start failed with FileNotFoundError (2 of 3 tries by hand)."""
    failed = []
    for attempt in range(5):
        run = Path(shutil.copytree(counted, tmp_path / str(attempt), ignore=shutil.ignore_patterns("thumbs")))
        ReviewStore.open(run)

        def start(run: Path = run) -> None:
            try:
                ReviewStore.open(run).make_thumbnails()
            except Exception as exc:  # any failure of either start is the defect
                failed.append(exc)

        threads = [threading.Thread(target=start) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(list((run / "thumbs").iterdir())) == len(ReviewStore.open(run).cells())  # no half-written file
    assert not failed


def test_a_correction_made_without_seeing_another_is_refused(run: Path):
    ana, ben = TestClient(create_app(run, reviewer="ana")), TestClient(create_app(run, reviewer="ben"))
    cell = ana.get("/api/cells").json()["cells"][0]
    url = f"/api/cells/{cell['id']}"
    assert cell["version"] == ben.get(url).json()["version"] == 0  # both pages show the model's call
    assert ana.put(url, json={"label": "monocyte", "version": 0}).json()["version"] == 1
    for refused in (  # ben's page still shows version 0: his label and his undo would overwrite ana's
        ben.put(url, json={"label": "basophil", "version": 0}),
        ben.delete(f"{url}/review", params={"version": 0}),
    ):
        assert refused.status_code == 409
        assert "changed since this page showed it (now verified as monocyte by ana)" in refused.json()["detail"]
    assert (ben.get(url).json()["label"], len(ReviewStore.open(run).audit())) == ("monocyte", 1)
    assert ben.put(url, json={"label": "basophil", "version": 1}).status_code == 200  # seen, then changed
    assert ana.delete(f"{url}/review", params={"version": 1}).status_code == 409  # ana's undo came too late
    assert ana.put(url, json={"label": "eosinophil"}).json()["label"] == "eosinophil"  # no version: set anyway

    other = ana.get("/api/cells").json()["cells"][1]  # many pages at once on one version: one wins
    answers = []
    threads = [
        threading.Thread(
            target=lambda label: answers.append(
                TestClient(create_app(run)).put(f"/api/cells/{other['id']}", json={"label": label, "version": 0})
            ),
            args=(label,),
        )
        for label in CLASSES
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(a.status_code for a in answers) == [200] + [409] * (len(CLASSES) - 1)
    won = next(a.json()["label"] for a in answers if a.status_code == 200)
    assert ana.get(f"/api/cells/{other['id']}").json()["label"] == won
    assert [c["new_label"] for c in ReviewStore.open(run).audit() if c["cell_id"] == other["id"]] == [won]


def test_export_is_readable_training_data(run: Path, tmp_path: Path):
    with pytest.raises(
        WbcidError, match=f"output of `wbcid count`: .*not verified ones; verify them with `wbcid review {run}"
    ):
        read_cells(run)  # read as the original JSON layout (its counts.json), it said "9 ... missing on disk"
    with pytest.raises(WbcidError, match="output of `wbcid count` .*: pass the smear fields or cell images"):
        list_images([run])  # its annotated fields and cut cells would have been classified or adapted to
    client = TestClient(create_app(run))
    cells = client.get("/api/cells").json()["cells"]
    chosen = {cells[0]["id"]: "eosinophil", cells[1]["id"]: "lymphocyte", cells[2]["id"]: "other"}
    for cell_id, label in chosen.items():
        client.put(f"/api/cells/{cell_id}", json={"label": label})
    out = Path(client.post("/api/export").json()["path"])
    manifest = read_cells(out / "manifest.csv")
    assert sorted(CLASSES[i] for i in manifest.labels) == ["eosinophil", "lymphocyte"]  # 'other' is not training data
    assert sorted(CLASSES[i] for i in read_cells(out / "cells").labels) == ["eosinophil", "lymphocyte"]
    assert read_cells(out).paths == manifest.paths  # the export's folder reads as its manifest (adapt --data DIR)
    assert read_cells(out / "counts.json").paths == manifest.paths  # as its folder ("... missing on disk")
    for named in (run, run / "counts.json"):
        with pytest.raises(WbcidError, match=f"{run} is the output .* pass {out}, its exported review"):
            read_cells(named)
    report = (out / "report.html").read_text()
    assert "3 cell(s) verified by a person" in report
    # a label corrected by hand, moving the picture into another type's folder: it was dropped as missing
    moved = out / "cells" / "eosinophil" / manifest.paths[0].name
    (out / "cells" / "basophil").mkdir()
    moved.rename(out / "cells" / "basophil" / moved.name)
    again = read_cells(out)
    assert [CLASSES[i] for i in again.labels] == ["basophil", "lymphocyte"] and not again.skipped
    assert read_cells(out / "manifest.csv").paths == again.paths  # its manifest named: the export is meant
    assert [c.group for c in again.cells] == pd.read_csv(out / "manifest.csv").group.tolist()  # each cell's field
    refused = client.post("/api/export")  # exporting again put it back where the review has it, unsaid
    assert refused.status_code == 409 and "1 picture(s) moved, added or deleted" in refused.json()["detail"]
    assert (out / "cells" / "basophil" / moved.name).is_file()


def test_a_second_count_of_the_same_fields_keeps_the_cells_verified_for_its_model(run: Path, tmp_path: Path, caplog):
    """The loop's second round (count the same fields with the adapted model, review) asked again for
    every cell verified in the first. The cells of the exports the model learned from (its labelled.csv)
    are imported verified as they were: one verified and exported again after the adaptation too, a
    picture moved to another type's folder as that type, one verified as not a WBC, one deleted from
    the export asked again; an export or list damaged by hand, nothing carried and the review opens."""
    fresh = Path(shutil.copytree(run, tmp_path / "fresh"))
    store = ReviewStore.open(run)
    first = store.cells()[:5]
    for cell, label in zip(first[:4], ["lymphocyte", "other", "eosinophil", "neutrophil"]):
        store.set_label(cell["id"], label, reviewer="first round")
    out = export_review(store, tmp_path / "verified")
    lab = tmp_path / "lab"  # what `wbcid adapt --data verified --out lab` records of its cells
    lab.mkdir()
    learned = read_cells(out)
    pd.DataFrame(
        {"path": [str(p.resolve()) for p in learned.paths], "label": [CLASSES[i] for i in learned.labels]}
    ).to_csv(lab / "labelled.csv", index=False)
    store.set_label(first[4]["id"], "monocyte", reviewer="later")
    export_review(store, out)
    (out / "cells" / "basophil").mkdir()
    (out / "cells" / "eosinophil" / f"{first[2]['id']}.png").rename(
        out / "cells" / "basophil" / f"{first[2]['id']}.png"
    )
    (out / "cells" / "neutrophil" / f"{first[3]['id']}.png").unlink()
    counts = json.loads((fresh / "counts.json").read_text())
    counts["model"] = str(lab)
    entry = next(e for e in counts["images"] if e["path"].endswith(Path(first[0]["image"]).name))
    moved = next(d for d in entry["detections"] if d["box"] == first[0]["box"])
    moved["box"] = [v + 4 for v in moved["box"]]  # found a few pixels off: the same cell
    (fresh / "counts.json").write_text(json.dumps(counts))
    client = TestClient(create_app(fresh))
    cells = client.get("/api/cells").json()["cells"]
    expected = [
        (first[0], "lymphocyte", "first round"),
        (first[1], "other", "first round"),
        (first[2], "basophil", "first round"),
        (first[4], "monocyte", "later"),
    ]
    verified = {(c["id"], c["label"], c["reviewer"]) for c in cells if c["reviewed"]}
    assert verified == {(c["id"], label, by) for c, label, by in expected}
    changes = client.get("/api/audit").json()["changes"]
    assert sorted((c["cell_id"], c["new_label"], c["reviewer"]) for c in changes) == sorted(verified)
    assert "4 cell(s) verified in an earlier round" in client.get("/").text
    assert client.get("/api/differential").json()["verified"] == 4
    for damaged, text in ((out / "counts.json", "{"), (lab / "labelled.csv", "file,type\n")):  # edited by hand
        damaged.write_text(text)
        again = tmp_path / f"again-{damaged.name}"
        again.mkdir()
        (again / "counts.json").write_text(json.dumps(counts))
        with caplog.at_level("WARNING", logger="wbcid"):
            assert not any(c["reviewed"] for c in ReviewStore.open(again).cells())  # the review still opens
        assert f"{damaged.parent}" in caplog.text and "asked again" in caplog.text


def test_two_exports_at_once_both_finish(run: Path):
    """The page's Export button and `wbcid review --export` (or two technologists' buttons) at the same
    moment deleted each other's half-written folder: FileNotFoundError, in each of 5 tries by hand."""
    store = ReviewStore.open(run)
    for cell in store.cells()[:3]:
        store.set_label(cell["id"], "monocyte")
    failed = []

    def export() -> None:
        try:
            export_review(store, run / "verified", chosen=False)
        except Exception as exc:  # any failure of either export is the defect
            failed.append(exc)

    for _ in range(3):
        threads = [threading.Thread(target=export) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not failed and len(read_cells(run / "verified")) == 3
    assert not (run / "verified.partial").exists()


def test_a_count_or_its_export_named_as_the_model_names_the_model_that_made_it(run: Path, tmp_path: Path):
    """`--model counts/slide1` said only "no model at counts/slide1/model.pt"."""
    from wbcid.loading import resolve_model

    store = ReviewStore.open(run)
    store.set_label(store.cells()[0]["id"], "monocyte")
    out = export_review(store, tmp_path / "verified")
    for named, what in ((run, "a count's results"), (out, "a review's export")):
        with pytest.raises(WbcidError, match=f"{named} holds {what}, not a model; .*made them, leave --model out"):
            resolve_model(named)


def test_an_export_kept_beside_a_slides_fields_is_not_read_as_fields(
    run: Path, data_root: Path, tmp_path: Path, caplog
):
    """A lab keeping its export in the slide's folder: the next count of that folder counted its verified
    cells as a specimen of fields (40 of them, by hand), and predict classified them with the fields."""
    slide = tmp_path / "slide"
    slide.mkdir()
    for name in FIELDS[:2]:
        (slide / name).symlink_to(data_root / "smears/bccd/images" / name)
    store = ReviewStore.open(run)
    for cell in store.cells()[:3]:
        store.set_label(cell["id"], "neutrophil")
    export_review(store, slide / "verified")
    assert list_images(slide) == sorted(slide / name for name in FIELDS[:2])
    assert "slide/verified (a review's export)" in caplog.text
    assert len(list_images(slide / "verified")) == 3  # named itself: its cells are meant


def test_two_exports_of_a_cell_relabelled_in_the_second_round_keep_its_new_label_in_either_order(
    run: Path, tmp_path: Path
):
    """A second round's review shows the first round's cells verified (their pictures the same bytes in
    both exports); a cell relabelled there kept its first-round label when the exports were named with
    the second first (`adapt --data round2 round1`): the merge kept the last listed."""
    from wbcid.data import read_all

    store = ReviewStore.open(run)
    cells = store.cells()[:2]
    store.set_label(cells[0]["id"], "neutrophil")
    store.set_label(cells[1]["id"], "eosinophil")
    first = export_review(store, tmp_path / "round1")
    manifest = pd.read_csv(first / "manifest.csv")
    manifest.assign(reviewed_at="2026-01-05T09:00:00+00:00").to_csv(first / "manifest.csv", index=False)  # a day before
    store.set_label(cells[0]["id"], "monocyte")  # the second round's correction
    second = export_review(store, tmp_path / "round2")
    for order in ([first, second], [second, first]):
        merged = read_all(order)
        assert sorted(CLASSES[c.label] for c in merged.cells) == ["eosinophil", "monocyte"], order


def test_an_export_replaces_only_an_earlier_export(run: Path, tmp_path: Path):
    """Exporting over the count itself (or any other folder) once deleted it, corrections and all."""
    store = ReviewStore.open(run)
    store.set_label(store.cells()[0]["id"], "monocyte")
    before = sorted(p.name for p in run.iterdir())
    for named in (run, run / "counts.json", run.parent):  # "move it aside": the count itself, or its file
        with pytest.raises(WbcidError, match=f"is (a file|the run under review.*): export into .*{run / 'verified'}"):
            export_review(store, named)
    assert sorted(p.name for p in run.iterdir()) == before and store.cells()  # nothing lost
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "mine.txt").write_text("keep")
    with pytest.raises(WbcidError, match="not an earlier export.*move it aside or choose another folder"):
        export_review(store, tmp_path / "notes")
    assert (tmp_path / "notes" / "mine.txt").read_text() == "keep"
    first = export_review(store, tmp_path / "verified")
    store.set_label(store.cells()[1]["id"], "basophil")
    again = export_review(store, first)  # an earlier export is replaced by the newer one
    assert sorted(CLASSES[i] for i in read_cells(again).labels) == ["basophil", "monocyte"]
    (again / "adapted").mkdir()  # `wbcid adapt --data verified --out verified/adapted`: deleted by the next export
    (again / "adapted" / "model.onnx").write_bytes(b"a lab's adapted model")
    with pytest.raises(WbcidError, match=r"earlier export, but also holds .*\(adapted\).*move that out"):
        export_review(store, again)
    assert (again / "adapted" / "model.onnx").read_bytes() == b"a lab's adapted model"


def test_page_escapes_what_it_shows(counted: Path, tmp_path: Path):
    run = Path(shutil.copytree(counted, tmp_path / "<script>alert(1)</script>"))
    page = TestClient(create_app(run, reviewer="<b>x</b>")).get("/").text
    assert "<script>alert(1)" not in page and "&lt;script&gt;alert(1)" in page
    assert "<b>x</b>" not in page


def test_review_of_a_prediction_csv(data_root: Path, tmp_path: Path):
    images = [sorted((data_root / "cells/lisc" / label).glob("*.jpg"))[0] for label in CLASSES]
    predict(None, images, tmp_path / "predictions.csv")
    client = TestClient(create_app(tmp_path / "predictions.csv"))
    cells = client.get("/api/cells").json()["cells"]
    assert len(cells) == 5 and all(c["box"] is None for c in cells)
    assert "specimens" not in client.get("/api/differential").json()  # class folders are not specimens
    assert client.get(f"/api/cells/{cells[0]['id']}/image").status_code == 200
    assert (tmp_path / "predictions.review" / "review.sqlite").is_file()
    before = (tmp_path / "predictions.csv").read_bytes()
    with pytest.raises(
        WbcidError,
        match="under review in .*predictions.review, and the review imported its cells once: .* another file",
    ):
        predict(None, images[:2], tmp_path / "predictions.csv")  # the review would show and export the old ones
    assert (tmp_path / "predictions.csv").read_bytes() == before
    # named as verified cells (adapt --data, evaluate --data) it scored the model against its own labels: 1.0
    with pytest.raises(WbcidError, match="output of `wbcid predict`: .*`wbcid review .*only 'path,label'"):
        read_cells(tmp_path / "predictions.csv")
    client.put(f"/api/cells/{cells[0]['id']}", json={"label": "basophil"})
    client.post("/api/export")
    with pytest.raises(WbcidError, match="pass .*predictions.review/verified, its exported review"):
        read_cells(tmp_path / "predictions.csv")
    assert read_cells(tmp_path / "predictions.review" / "verified").labels.tolist() == [CLASSES.index("basophil")]
    predict(None, images[:2], tmp_path / "unsuffixed")  # `--out` takes any name
    assert len(ReviewStore.open(tmp_path / "unsuffixed").cells()) == 2
    with pytest.raises(WbcidError, match="to review cell images, classify them first: `wbcid predict"):
        ReviewStore.open(images[0])  # an image named by mistake
    (tmp_path / "notes.txt").write_text("a,b\n1,2\n3,4,5,6\n")
    with pytest.raises(WbcidError, match=r"not a readable CSV \(.*\)$"):  # pandas' reason, without its newline
        ReviewStore.open(tmp_path / "notes.txt")


def test_the_counts_file_stands_for_its_folder(run: Path):
    assert ReviewStore.open(run / "counts.json").folder == run


def test_the_counts_warnings_are_on_the_page(run: Path):
    """What the count warned about (e.g. types its model was adapted without) is in front of the
    person who verifies the cells, not only in the count's report."""
    result = json.loads((run / "counts.json").read_text())
    result["warnings"] = ["adapted with no verified basophil <from its lab>"]
    (run / "counts.json").write_text(json.dumps(result))
    page = TestClient(create_app(run)).get("/").text
    assert '<p class="warn">adapted with no verified basophil &lt;from its lab&gt;</p>' in page


def test_a_review_finds_its_images_from_any_folder(data_root: Path, tmp_path: Path, monkeypatch):
    """``wbcid predict imgs`` (or ``count``) records relative paths; a review started from another
    folder ended in a FileNotFoundError traceback. Paths are made absolute when the review starts."""
    (tmp_path / "lab" / "eosinophil").mkdir(parents=True)
    cells = sorted((data_root / "cells/bccd/eosinophil").glob("*.jpg"))[:2]
    for cell in cells:
        shutil.copy(cell, tmp_path / "lab" / "eosinophil")
    rows = "".join(f"eosinophil/{c.name},eosinophil,0.9,0.5,False\n" for c in cells)
    for name in ("here.csv", "elsewhere.csv"):
        (tmp_path / name).write_text("path,label,probability,ood_score,flagged\n" + rows)
    monkeypatch.chdir(tmp_path / "lab")  # where the paths were written
    ReviewStore.open(tmp_path / "here.csv")
    monkeypatch.chdir(tmp_path)
    store = ReviewStore.open(tmp_path / "here.csv")
    assert store.make_thumbnails() == 2 and all(Path(c["image"]).is_absolute() for c in store.cells())
    shutil.copy(tmp_path / "here.csv", tmp_path / "lab" / "beside.csv")  # paths relative to the CSV's folder
    assert not ReviewStore.open(tmp_path / "lab" / "beside.csv").missing()  # started from another folder
    missing = f"2 of its 2 images are not where it records them, e.g. eosinophil/{cells[0].name}"
    with pytest.raises(WbcidError, match=missing):
        ReviewStore.open(tmp_path / "elsewhere.csv")
    assert not (tmp_path / "elsewhere.review").exists()  # a review that did not start leaves nothing behind
    gone = "".join(f"{tmp_path / 'gone' / c.name},eosinophil,0.9,0.5,False\n" for c in cells)
    (tmp_path / "absolute.csv").write_text("path,label,probability,ood_score,flagged\n" + gone)
    with pytest.raises(WbcidError, match="moved since\\? pass --images") as refused:  # not: "start from ..."
        ReviewStore.open(tmp_path / "absolute.csv")
    assert "folder you are in" not in str(refused.value)
    (tmp_path / "lab" / "eosinophil" / cells[0].name).unlink()  # gone after the review started
    gone = next(c["id"] for c in store.cells() if c["image"].endswith(cells[0].name))
    with pytest.raises(WbcidError, match=f"cannot read .*{cells[0].name}"):
        store.field_view(gone)


def test_a_missing_image_leaves_its_cell_in_the_review_and_out_of_the_export(data_root: Path, tmp_path: Path):
    """One image moved or deleted refused the whole review at its start, and an export after it
    failed, locking the verified work away; now only that cell goes without a picture."""
    cells = sorted((data_root / "cells/bccd/eosinophil").glob("*.jpg"))[:3]
    for cell in cells:
        shutil.copy(cell, tmp_path)
    rows = "".join(f"{tmp_path / c.name},eosinophil,0.9,0.5,False\n" for c in cells)
    (tmp_path / "cells.csv").write_text("path,label,probability,ood_score,flagged\n" + rows)
    (tmp_path / cells[0].name).unlink()  # before the review's first start
    client = TestClient(create_app(tmp_path / "cells.csv"))
    listed = client.get("/api/cells").json()["cells"]
    assert sum(c["missing"] for c in listed) == 1
    gone = next(c["id"] for c in listed if c["missing"])
    assert client.get(f"/api/cells/{gone}/image").status_code == 409
    for cell in listed:
        assert client.put(f"/api/cells/{cell['id']}", json={"label": "lymphocyte"}).json()["missing"] == cell["missing"]
    (tmp_path / cells[1].name).unlink()  # after it started: thumbnails of the rest are still cut
    store = ReviewStore.open(tmp_path / "cells.csv")
    assert store.make_thumbnails() == 1
    assert client.get("/api/differential").json()["classes"]["lymphocyte"]["count"] == 3
    exported = client.post("/api/export").json()
    assert exported["exported"] == 1 and "2 verified cell(s) whose image could not be read" in exported["summary"]
    out = Path(exported["path"])
    assert len(pd.read_csv(out / "manifest.csv")) == 1
    assert json.loads((out / "counts.json").read_text())["totals"]["classes"]["lymphocyte"]["count"] == 3


def test_a_review_moved_with_its_images_carries_on(data_root: Path, tmp_path: Path, monkeypatch):
    """A count and its fields moved together (to a USB disk, another workstation's mount) lost every
    picture, reviewed before or after the move: a review records absolute paths, a count the paths as
    given. They are found where they lay relative to it."""
    lab = tmp_path / "lab"
    (lab / "fields").mkdir(parents=True)
    for name in FIELDS[:2]:
        shutil.copy(data_root / "smears/bccd/images" / name, lab / "fields")
    count(None, sorted((lab / "fields").iterdir()), lab / "counts" / "slide1")
    monkeypatch.chdir(lab)  # paths relative to where the count ran
    count(None, [Path("fields") / name for name in FIELDS[:2]], Path("counts") / "slide2")
    monkeypatch.chdir(tmp_path)
    store = ReviewStore.open(lab / "counts" / "slide1")
    verified = store.cells()[0]["id"]
    store.set_label(verified, "monocyte")
    moved = Path(shutil.move(lab, tmp_path / "usb" / "lab"))
    store = ReviewStore.open(moved / "counts" / "slide1")
    assert all(Path(c["image"]).parent == moved / "fields" for c in store.cells())
    assert not store.missing() and store.make_thumbnails() == len(store.cells())
    assert store.cell(verified)["label"] == "monocyte" and store.field_view(verified).is_file()
    assert export_review(store, tmp_path / "verified").joinpath("cells", "monocyte", f"{verified}.png").is_file()
    later = ReviewStore.open(moved / "counts" / "slide2")  # first reviewed after the move
    assert {Path(c["image"]).parent for c in later.cells()} == {moved / "fields"} and not later.missing()


def test_images_moved_on_their_own_are_found_with_images(data_root: Path, tmp_path: Path, monkeypatch, capsys):
    """Fields moved without the run (the share reorganised) showed no picture, and a review not yet
    begun could not start: `--images` names the folder they are in now, laid out as before."""
    from wbcid.cli import main

    old = tmp_path / "share" / "slide1"
    for specimen in ("a", "b"):  # two subfolders with the same file names: the layout, not the names, decides
        (old / specimen).mkdir(parents=True)
        shutil.copy(data_root / "smears/bccd/images" / FIELDS[0], old / specimen / "field.jpg")
    count(None, [old], tmp_path / "counts" / "slide1")
    fresh = Path(shutil.copytree(tmp_path / "counts" / "slide1", tmp_path / "counts" / "fresh"))
    store = ReviewStore.open(tmp_path / "counts" / "slide1")
    moved = Path(shutil.move(old, tmp_path / "archive" / "2026" / "slide1"))
    assert len(store.missing()) == 2
    store = ReviewStore.open(tmp_path / "counts" / "slide1", images=moved)
    assert not store.missing() and {Path(c["image"]).parent.name for c in store.cells()} == {"a", "b"}
    assert not ReviewStore.open(tmp_path / "counts" / "slide1").missing()  # kept for the review's later starts
    with pytest.raises(WbcidError, match="moved since\\? pass --images"):  # begun after the move
        ReviewStore.open(fresh)
    command = ["wbcid", "review", str(fresh), "--images", str(moved), "--export", str(tmp_path / "v")]
    monkeypatch.setattr(sys, "argv", command)
    with pytest.raises(SystemExit) as exited:
        main()
    assert exited.value.code == 0 and "exported to" in capsys.readouterr().out
    assert all(Path(c["image"]).is_file() for c in ReviewStore.open(fresh).cells())
    with pytest.raises(WbcidError, match="--images .*no such folder"):
        ReviewStore.open(fresh, images=tmp_path / "nowhere")


def test_a_damaged_review_database_is_reported_and_kept(run: Path):
    damaged = b"not a database, but perhaps a person's corrections" * 20
    (run / "review.sqlite").write_bytes(damaged)
    with pytest.raises(WbcidError, match="not a readable review database .*move it aside"):
        ReviewStore.open(run)
    assert (run / "review.sqlite").read_bytes() == damaged


def test_a_review_kept_where_nothing_can_be_written_is_exported_as_it_is(run: Path, tmp_path: Path, monkeypatch):
    """A run on a read-only share, or a colleague's: SQLite cannot open a WAL database where it cannot
    write, and the review called its database "not a readable review database ... move it aside to
    start the review afresh", and would not export it."""
    store = ReviewStore.open(run)
    first, second = (cell["id"] for cell in store.cells()[:2])
    store.set_label(first, "eosinophil", reviewer="ana")
    with closing(sqlite3.connect(run / "review.sqlite")) as server:  # a server killed before its log was merged
        server.execute("SELECT COUNT(*) FROM cells").fetchone()
        store.set_label(second, "basophil", reviewer="ana")
        assert (run / "review.sqlite-wal").stat().st_size > 0  # the second correction is in the log only
        shared = Path(shutil.copytree(run, tmp_path / "share"))
    listed = sorted(p.name for p in shared.iterdir())
    monkeypatch.setattr(store_module, "unwritable", lambda folder: "Read-only file system")
    with pytest.raises(WbcidError, match=r"share: cannot write there \(Read-only file system\).*copy the run.*export"):
        ReviewStore.open(shared)  # to review: it could not keep a correction
    from wbcid.cli import main

    out = tmp_path / "export"
    monkeypatch.setattr(sys, "argv", ["wbcid", "review", str(shared), "--export", str(out)])
    with pytest.raises(SystemExit) as exited:
        main()
    assert exited.value.code == 0
    assert sorted(CLASSES[i] for i in read_cells(out / "manifest.csv").labels) == ["basophil", "eosinophil"]
    assert sorted(p.name for p in shared.iterdir()) == listed


def test_a_port_in_use_or_a_bad_address_is_refused_before_the_address_is_announced(run: Path, capsys, monkeypatch):
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        held = other.getsockname()[1]
        with pytest.raises(WbcidError, match=f"cannot serve on 127.0.0.1:{held} .*pass another --port"):
            serve(run, port=held)
        with socket.socket() as spare:  # a port free a moment ago
            spare.bind(("127.0.0.1", 0))
            free = spare.getsockname()[1]
        monkeypatch.setattr(wbcid.web.app, "PORTS", [held, free])  # a second review, no --port: the next port
        with wbcid.web.app._listen("127.0.0.1", "127.0.0.1", None) as sock:
            assert sock.getsockname()[1] == free
        monkeypatch.setattr(wbcid.web.app, "PORTS", [held])
        with pytest.raises(WbcidError, match=f"cannot serve on 127.0.0.1:{held}-{held} "):
            serve(run)
    assert "review at" not in capsys.readouterr().out  # no link to the program that holds the port
    with pytest.raises(WbcidError, match="99999 is not a port"):  # was an OverflowError's traceback
        serve(run, port=99999)
    with pytest.raises(WbcidError, match="cannot serve on no-such-host.invalid: no such address"):
        serve(run, host="no-such-host.invalid")
    with pytest.raises(WbcidError, match="cannot serve on 192.0.2.1 .*not an address of this machine"):
        serve(run, host="192.0.2.1")  # another machine's (a documentation address): "pass another --port" misled
    with pytest.raises(WbcidError, match="--model .*nowhere: no such run directory or model file"):
        serve(run, model=run / "nowhere")  # the server started, and each Grad-CAM map failed on the page


def test_gradcam_view_of_a_cell(run: Path):
    client = TestClient(create_app(run))
    cell = client.get("/api/cells").json()["cells"][0]
    response = client.get(f"/api/cells/{cell['id']}/gradcam")
    assert response.status_code == 200 and response.content[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(list((run / "gradcam").glob(f"*/{cell['id']}.png"))) == 1  # made once, then served from the cache


@pytest.mark.parametrize("kind", ["count", "predictions"])
def test_gradcam_explains_the_model_that_made_the_run(kind: str, run: Path, data_root: Path, tmp_path: Path, caplog):
    """Without --model the maps were the bundled model's, even for a run made with the lab's model."""
    import torch

    from wbcid.contract import BUNDLED
    from wbcid.models import load_checkpoint, save_model

    lab = load_checkpoint(BUNDLED)
    with torch.no_grad():  # another model: a head of random weights looks at the features otherwise
        lab.head[-1].weight.normal_(generator=torch.Generator().manual_seed(0))
    mylab = save_model(lab, tmp_path / "mylab" / "model.pt").parent
    if kind == "count":
        result = json.loads((run / "counts.json").read_text())
        (run / "counts.json").write_text(json.dumps({**result, "model": str(mylab)}))
        (run / "review.sqlite").unlink(missing_ok=True)
    else:
        run = tmp_path / "cells.csv"
        predict(mylab, [sorted((data_root / "cells/lisc" / c).glob("*.jpg"))[0] for c in CLASSES], run)

    def gradcam(model: Path | None) -> bytes:
        client = TestClient(create_app(run, model))
        return client.get(f"/api/cells/{client.get('/api/cells').json()['cells'][0]['id']}/gradcam").content

    recorded = gradcam(None)
    assert recorded == gradcam(mylab) and recorded != gradcam(BUNDLED)
    shutil.rmtree(mylab)
    create_app(run)
    assert f"the model that made this run, {mylab}, is not found from" in caplog.text


def test_a_run_with_several_specimens_has_a_differential_for_each(data_root: Path, tmp_path: Path):
    for specimen, names in (("patient_a", FIELDS[:2]), ("patient_b", FIELDS[2:4])):
        (tmp_path / "fields" / specimen).mkdir(parents=True)
        for name in names:
            (tmp_path / "fields" / specimen / name).symlink_to(data_root / "smears/bccd/images" / name)
    count(None, [tmp_path / "fields"], tmp_path / "run")
    totals = TestClient(create_app(tmp_path / "run")).get("/api/differential").json()
    assert set(totals["specimens"]) == {"patient_a", "patient_b"}
    assert sum(s["detected"] for s in totals["specimens"].values()) == totals["detected"]


def test_an_export_says_what_it_holds_and_when_there_is_nothing_to_adapt_to(run: Path, tmp_path: Path):
    """The command and the page's Export button say the same: how many cells are training data, and
    that "not a WBC" cells are not (before, both said "1 verified cell(s) exported" of an empty manifest)."""
    from typer.testing import CliRunner

    from wbcid.cli import app

    client = TestClient(create_app(run))

    def export() -> tuple[str, dict]:
        result = CliRunner().invoke(app, ["review", str(run), "--export", str(tmp_path / "verified")])
        assert result.exit_code == 0
        return result.output, client.post("/api/export").json()

    store = ReviewStore.open(run)
    first, second = (c["id"] for c in store.cells()[:2])
    said, page = export()
    assert "0 verified cell(s) of the five types exported" in said and "nothing for `wbcid adapt`" in said
    assert page["exported"] == 0 and "nothing for `wbcid adapt`" in page["summary"]
    with pytest.raises(WbcidError, match="this export of a review holds no verified cell of the five types"):
        read_cells(tmp_path / "verified")  # adapt --data said "no labelled images of the five classes found"
    store.set_label(first, "other", reviewer="tester")  # a verified cell, but not one of the five types
    said, page = export()
    assert "0 verified cell(s) of the five types" in said and "1 verified as not a WBC" in said
    assert (page["verified"], page["exported"]) == (1, 0) and "nothing for `wbcid adapt`" in page["summary"]
    store.set_label(second, "basophil", reviewer="tester")
    said, page = export()
    assert "1 verified cell(s) of the five types" in said and "nothing for" not in said
    assert (page["verified"], page["exported"]) == (2, 1) and len(read_cells(Path(page["path"])).labels) == 1


def test_an_export_keeps_every_change_in_order_undone_ones_too(run: Path, tmp_path: Path):
    """A correction changed again or undone leaves no trace in the verified labels; the export's
    audit.csv is where a laboratory reads who changed which cell, from what to what, and when."""
    store = ReviewStore.open(run)
    first, second = store.cells()[:2]
    store.set_label(first["id"], "eosinophil", reviewer="ana")
    store.set_label(first["id"], "monocyte", reviewer="ben")
    store.set_label(second["id"], "other", reviewer="ana")
    store.set_label(second["id"], None, reviewer="ana")  # undone: back to the model's call
    out = export_review(store, tmp_path / "verified")
    audit = pd.read_csv(out / "audit.csv", keep_default_na=False)
    assert list(audit.columns) == ["change", "at", "reviewer", "cell_id", "image", "old_label", "old_reviewed",
                                   "new_label", "new_reviewed"]  # fmt: skip
    assert audit[["cell_id", "reviewer", "old_label", "new_label", "new_reviewed"]].values.tolist() == [
        [first["id"], "ana", first["model_label"], "eosinophil", 1],
        [first["id"], "ben", "eosinophil", "monocyte", 1],
        [second["id"], "ana", second["model_label"], "other", 1],
        [second["id"], "ana", "other", second["model_label"], 0],
    ]
    assert audit["image"].tolist() == [first["image"]] * 2 + [second["image"]] * 2
    assert read_cells(out).paths and len(read_cells(out).paths) == 1  # only the monocyte is training data
    assert "Every change made in the review (4)" in (out / "report.html").read_text()


def test_a_count_under_review_is_not_resumed_with_more_fields(data_root: Path, tmp_path: Path):
    """`count --resume` added a new field's cells to counts.json while the review, which imported the
    count once, kept showing and exporting the old cells."""
    fields = [data_root / "smears/bccd/images" / name for name in FIELDS[:3]]
    run = tmp_path / "run"
    count(None, fields[:2], run, cell_diameter=200)
    ReviewStore.open(run)
    before = (run / "counts.json").read_bytes()
    with pytest.raises(
        WbcidError,
        match=f"{run} is under review, and the review imported its cells once: .* another folder, or move .*sqlite",
    ):
        count(None, fields, run, cell_diameter=200, resume=True)
    assert (run / "counts.json").read_bytes() == before
