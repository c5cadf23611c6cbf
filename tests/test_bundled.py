"""The bundled model: ships in the package, loads without a path, and is the trained one."""

from __future__ import annotations

import errno
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from wbcid.contract import BUNDLED
from wbcid.data import CLASSES, read_cells
from wbcid.decoding import PROBLEMS
from wbcid.errors import WbcidError
from wbcid.evaluation import evaluate
from wbcid.inference import UNREADABLE_MESSAGE, predict
from wbcid.loading import resolve_model
from wbcid.preprocess import Preprocess
from wbcid.serving import OnnxModel


def test_bundled_model_is_small_and_carries_its_contract():
    assert BUNDLED.is_file() and BUNDLED.stat().st_size < 12 * 2**20  # 6.6 MB network + 3.3 MB OOD scorer (fp16)
    assert (BUNDLED.parent / "MODEL_CARD.md").is_file()
    model = resolve_model(needs_torch="this test")
    assert model.config.classes == CLASSES and model.config.crop is True
    assert model.source_statistics  # recorded for test-time adaptation
    served = resolve_model()  # what predict and evaluate run: the same model in ONNX Runtime
    assert isinstance(served, OnnxModel) and served.config.classes == model.config.classes
    assert Preprocess.of(served.config) == Preprocess.of(model.config)
    assert model.ood is not None and [o.name for o in served.session.get_outputs()] == ["logits", "ood_score"]


def test_predict_without_a_model_uses_the_bundled_one(data_root, tmp_path):
    cells = read_cells(data_root / "cells.csv", sources=["cellavision"])
    picked = [c for c in cells.cells if c.label in (0, 1, 3)][:24]  # neutrophils, lymphocytes, eosinophils
    result = subprocess.run(
        [sys.executable, "-m", "wbcid", "predict", "--out", str(tmp_path / "p.csv"), *[str(c.path) for c in picked]],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    table = pd.read_csv(tmp_path / "p.csv")
    correct = (table.label == [CLASSES[c.label] for c in picked]).mean()
    assert correct > 0.8  # these images were in its training data: a check that the weights are the trained ones


def test_predict_says_when_clearly_more_cells_are_flagged_than_its_own_labs_give(
    data_root, tmp_path, monkeypatch, capsys
):
    """The same step as count's: a folder of cells the model finds unfamiliar names review and adapt."""
    from wbcid.cli import main

    listed = pd.read_csv(data_root / "cells.csv")
    cells = [data_root / p for p in listed.path[(listed.label == "platelet") & (listed.split == "test")][:30]]
    familiar = read_cells(data_root / "cells.csv", sources=["pbc"], splits=["test"]).paths[:30]
    said = {}
    for name, paths in (("other", cells), ("pbc", familiar)):  # platelets; WBCs of a lab it learned
        monkeypatch.setattr(sys, "argv", ["wbcid", "predict", "--out", str(tmp_path / f"{name}.csv"), *map(str, paths)])
        with pytest.raises(SystemExit) as exited:
            main()
        assert exited.value.code == 0
        said[name] = capsys.readouterr().out
    flags = pd.read_csv(tmp_path / "other.csv").flagged.sum()
    assert f"warning: {flags} of 30 cells (" in said["other"] and "`wbcid adapt`" in said["other"]
    assert pd.read_csv(tmp_path / "pbc.csv").flagged.sum() <= 3 and "warning" not in said["pbc"]


def test_unreadable_files_keep_their_row_without_a_label(data_root, tmp_path):
    good = next((data_root / "cells" / "lisc" / "monocyte").iterdir())
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG but not really")
    table = predict(None, [good, bad])
    assert table.path.tolist() == [str(good), str(bad)]
    assert table.label[0] in CLASSES and table.label[1] == ""
    assert table.loc[1, [f"p_{c}" for c in CLASSES]].isna().all()
    assert table.flagged.tolist() == [table.flagged[0], True] and table.error[0] == ""
    assert table.error[1] == f"{UNREADABLE_MESSAGE} (UnidentifiedImageError: cannot identify image file '{bad}')"


def test_a_file_too_large_to_read_says_why(data_root, monkeypatch, tmp_path):
    """predict said only "could not be read as an image" where count says why: past PIL's limit on
    pixels (179 Mpx; lowered here so that a cell image meets it), a whole-slide scan, not a cell."""
    from PIL import Image

    cell = next((data_root / "cells" / "lisc" / "monocyte").iterdir())
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(WbcidError, match="none of the 1 images"):
        predict(None, [cell], tmp_path / "p.csv")
    error = pd.read_csv(tmp_path / "p.csv", keep_default_na=False).error[0]
    assert error.startswith(UNREADABLE_MESSAGE) and "a whole-slide scan? cut it into fields" in error


def test_a_cell_in_grey_dark_blank_or_of_several_pages_is_flagged_with_the_reason(data_root, tmp_path, caplog):
    """A PBC basophil saved in grey was called basophil (0.92) and not flagged; count refuses grey fields.
    A nearly black one and a blank one were flagged by their OOD scores alone, without a reason, and a
    TIFF of three cells was classified by its first, not flagged and without a word (count says so)."""
    from PIL import Image

    colour = sorted((data_root / "cells" / "pbc" / "basophil").iterdir())[0]
    cell = Image.open(colour)
    odd = {
        "grey": cell.convert("L"),
        "dark": Image.fromarray(np.asarray(cell) // 16),
        "blank": Image.new("RGB", cell.size),
    }
    for name, image in odd.items():
        image.save(tmp_path / f"{name}.png")
    files = [colour, *(tmp_path / f"{name}.png" for name in odd), tmp_path / "pages.tif", tmp_path / "camera.jpg"]
    cell.save(files[-2], save_all=True, append_images=[cell.rotate(90), cell.rotate(180)])  # three cells, or a stack
    cell.save(files[-1], format="MPO", save_all=True, append_images=[cell.reduce(4)])  # a camera's JPEG and preview
    table = predict(None, files)
    assert table.error.tolist() == ["", PROBLEMS["grey"], PROBLEMS["dark"], PROBLEMS["blank"], PROBLEMS["pages"], ""]
    assert table.flagged[1:5].all() and "told apart by their stain colours" in PROBLEMS["grey"]
    assert (
        table.label[1] in CLASSES and table.label[4] == table.label[0]
    )  # still answered: the flag says why to check it
    assert "1 image(s) flagged: grey-scale image" in caplog.text and "1 image(s) flagged: the file holds" in caplog.text
    manifest = tmp_path / "cells.csv"  # evaluate flags them too, and its report says why
    manifest.write_text("path,label\n" + "".join(f"{f},basophil\n" for f in files))
    metrics = evaluate(None, manifest, tmp_path / "evaluation")
    assert metrics["problems"] == {PROBLEMS[k]: 1 for k in ("grey", "pages", "blank", "dark")}
    assert metrics["flagged"]["flagged"] == table.flagged.sum()  # as predict flags
    report = (tmp_path / "evaluation" / "report.md").read_text()
    assert f"1 image(s): {PROBLEMS['grey']}." in report and f"1 image(s): {PROBLEMS['pages']}." in report
    low, high = metrics["ci95"]["macro_f1"]  # the report gives the intervals, not only metrics.json
    assert f"{metrics['macro_f1']:.4f} [{low:.4f}, {high:.4f}] |" in report


def test_nothing_readable_is_an_error_after_the_csv_is_written(tmp_path):
    """Issue 13.5: predict exited 0 when every input was unreadable; 13.11: --out checked before work."""
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(WbcidError, match="none of the 1 images"):
        predict(None, [bad], tmp_path / "out.csv")
    assert pd.read_csv(tmp_path / "out.csv", keep_default_na=False).error[0].startswith(UNREADABLE_MESSAGE + " (")
    cli = subprocess.run(
        [sys.executable, "-m", "wbcid", "predict", str(bad), "--out", str(tmp_path / "o2.csv")],
        capture_output=True,
        text=True,
    )
    assert cli.returncode == 2 and "Traceback" not in cli.stderr
    with pytest.raises(WbcidError, match="is a folder"):
        predict(None, [bad], tmp_path)
    with pytest.raises(WbcidError, match="no such file"):
        predict(Path("no-model-needed-yet.pt"), [tmp_path / "missing.png"], tmp_path / "x.csv")


def test_an_output_in_the_way_is_refused_before_any_work(data_root, tmp_path):
    """A file where a folder is written (or the reverse) failed only at the end with an OS error,
    losing the work; now every command says so first."""
    from wbcid.evaluation import evaluate
    from wbcid.export import export_onnx
    from wbcid.gradcam import explain

    image = sorted((data_root / "cells/lisc/neutrophil").glob("*.jpg"))[0]
    (tmp_path / "a_file").write_text("someone's notes")
    with pytest.raises(WbcidError, match="a_file is a file; --out takes the folder to write the evaluation"):
        evaluate(None, data_root / "cells/lisc", tmp_path / "a_file")
    with pytest.raises(WbcidError, match="a_file is a file; --out takes the folder to write the Grad-CAM"):
        explain(None, [image], tmp_path / "a_file")
    with pytest.raises(WbcidError, match="is a folder; --out takes the file to write, e.g. .*model.onnx"):
        export_onnx(resolve_model(None, needs_torch="export"), tmp_path)
    assert (tmp_path / "a_file").read_text() == "someone's notes"
    (tmp_path / "run").mkdir()  # a model's run directory: its own report.md was replaced by an evaluation's
    (tmp_path / "run" / "model.pt").write_bytes(BUNDLED.read_bytes())
    (tmp_path / "run" / "report.md").write_text("the training's report")
    with pytest.raises(WbcidError, match="run is a model's run directory; write the evaluation into another"):
        evaluate(None, data_root / "cells/lisc", tmp_path / "run")
    with pytest.raises(WbcidError, match="run is a model's run directory; write the Grad-CAM images into another"):
        explain(None, [image], tmp_path / "run")
    assert (tmp_path / "run" / "report.md").read_text() == "the training's report"


def test_evaluating_on_training_cells_says_so(data_root, tmp_path, caplog):
    """Issue 13.12: evaluate on cells the bundled model was trained on reported a score without a word."""
    from wbcid.evaluation import evaluate

    cells = read_cells(data_root / "cells.csv", sources=["cellavision"])
    metrics = evaluate(None, cells.subset(range(12)), tmp_path)
    assert metrics["training_overlap"] == 12 and "not a test score" in caplog.text
    assert (tmp_path / "report.md").read_text().splitlines()[0].startswith("# Evaluation of bundled model")
    two_labs = read_cells(data_root / "cells.csv", sources=["cellavision", "lisc"])
    evaluate(None, two_labs.subset([*range(4), *range(len(two_labs) - 4, len(two_labs))]), adabn=True)
    assert "AdaBN over 2 sources at once (cellavision, lisc)" in caplog.text  # one lab's statistics, or say so


def test_a_test_set_that_lacks_classes_says_which(data_root, tmp_path, caplog):
    """The report noted absent classes, the command's output did not: its macro-F1 of 1.0 on two
    eosinophils read like a perfect score on all five types."""
    from wbcid.evaluation import evaluate

    cells = read_cells(data_root / "cells.csv", sources=["lisc"])
    picked = [i for label in (0, 3) for i in [i for i, c in enumerate(cells.cells) if c.label == label][:3]]
    metrics = evaluate(None, cells.subset(picked), tmp_path)
    assert metrics["classes_present"] == ["neutrophil", "eosinophil"]
    assert "has no lymphocyte, monocyte, basophil: macro-F1 and balanced accuracy average over the other" in caplog.text


def test_serving_the_bundled_model_never_imports_pytorch(data_root, tmp_path):
    """Issue 14: predict and count run on ONNX Runtime and start without PyTorch's ~2 s import."""
    cell = next((data_root / "cells" / "lisc" / "monocyte").iterdir())
    field = data_root / "smears" / "bccd" / "images" / "BloodImage_00000.jpg"
    code = (
        "import sys; from wbcid.inference import predict; from wbcid.smear.counting import count; "
        f"table = predict(None, [{str(cell)!r}]); counted = count(None, [{str(field)!r}], {str(tmp_path / 'c')!r}); "
        "assert table.label[0] and counted['totals']['detected'] > 0; print('torch' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "False"


def test_a_wrong_data_path_fails_before_the_heavy_imports(tmp_path):
    """A mistyped --data took 2-6 s to report (PyTorch, scikit-learn and the model loaded first): the
    commands now read their data, or list their images, before importing what does the work."""
    missing = str(tmp_path / "no-such-folder")
    commands = [
        ["train", "--data", missing, "--out", str(tmp_path / "t")],
        ["evaluate", "--data", missing, "--out", str(tmp_path / "e")],
        ["adapt", "--data", missing, "--out", str(tmp_path / "a")],
        ["explain", missing, "--out", str(tmp_path / "x")],
    ]
    for args in commands:
        code = (
            "import atexit, sys; atexit.register(lambda: print(sorted({'torch', 'sklearn'} & set(sys.modules)))); "
            f"from wbcid.cli import main; sys.argv = ['wbcid', *{args!r}]; main()"
        )
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert result.returncode == 2, (args, result.stderr[-2000:])
        assert "no-such-folder" in result.stderr and "Traceback" not in result.stderr
        assert result.stdout.strip() == "[]", args[0]


def test_an_output_inside_a_file_is_refused_before_any_work(data_root, tmp_path, monkeypatch, capsys):
    """`--out notes.txt/p.csv` (a slip) failed with a traceback, and predict only after classifying
    every image; an error of the file system itself is one line too, not a traceback."""
    from wbcid.cli import main
    from wbcid.files import makeable

    (tmp_path / "notes.txt").write_text("a lab's notes")
    images = sorted((data_root / "cells" / "lisc" / "monocyte").glob("*.jpg"))[:2]
    for out in (tmp_path / "notes.txt" / "p.csv", tmp_path / "notes.txt" / "a" / "b.csv"):
        with pytest.raises(WbcidError, match="notes.txt is a file, so .* cannot be made inside it"):
            predict(Path("not-loaded-before-the-check.pt"), images, out)
    assert makeable(tmp_path / "new" / "deeper" / "p.csv") == tmp_path / "new" / "deeper" / "p.csv"
    manifest = tmp_path / "cells.csv"  # a lab's labelled cells, named as --out by a slip: it was replaced
    manifest.write_text("path,label\ncells/a.jpg,monocyte\n")
    with pytest.raises(WbcidError, match="cells.csv exists and is not an earlier `wbcid predict` CSV"):
        predict(None, images, manifest)
    assert manifest.read_text() == "path,label\ncells/a.jpg,monocyte\n"
    (tmp_path / "p.csv").touch()  # as `mktemp` makes it: nothing to lose
    predict(None, images, tmp_path / "p.csv")
    assert len(predict(None, images[:1], tmp_path / "p.csv")) == len(pd.read_csv(tmp_path / "p.csv")) == 1  # replaced

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device", str(tmp_path / "p.csv"))

    monkeypatch.setattr("wbcid.inference.predict", full_disk)
    monkeypatch.setattr(sys, "argv", ["wbcid", "predict", str(images[0]), "--out", str(tmp_path / "p.csv")])
    with pytest.raises(SystemExit) as exited:
        main()
    assert exited.value.code == 1
    said = capsys.readouterr().err.strip()  # and what was kept: here nothing (predict failed before its first batch)
    assert said == f"error: [Errno 28] No space left on device: '{tmp_path / 'p.csv'}'; nothing was finished yet."


@pytest.mark.skipif(not Path("/sys/kernel").is_dir(), reason="Linux's /sys takes no new file, not even root's")
def test_an_output_where_nothing_can_be_written_is_refused_before_any_work(tmp_path):
    """A read-only share or another user's folder as --out: adapt trained (40 s on one cell here) and
    only then stopped at "[Errno 30] Read-only file system: .../adapted.partial"."""
    from wbcid.adaptation import adapt
    from wbcid.smear.counting import count

    model, unreachable = tmp_path / "not-loaded-before-the-check.pt", Path("/sys/wbcid-out")
    for write in (
        lambda: adapt(tmp_path / "not-read-before-the-check.csv", unreachable, model),
        lambda: count(model, [tmp_path / "not-read-before-the-check.jpg"], unreachable),
        lambda: predict(model, [tmp_path / "not-read-before-the-check.jpg"], unreachable / "p.csv"),
    ):
        with pytest.raises(WbcidError, match=r"cannot write /sys/wbcid-out\S* \(Permission denied\): name an output"):
            write()


def test_options_may_be_written_name_equals_value(data_root, tmp_path, monkeypatch, capsys):
    """As ultralytics' `yolo train data=...`: `wbcid predict out=p.csv tta=false ...`; a file named
    like an option assignment but not one ('a=b.jpg') stays an input."""
    from wbcid.cli import as_options, main

    assert as_options(["count", "out=c", "cell_diameter=200", "tta=false", "resume=yes", "a=b.jpg", "x"]) == [
        "count", "--out", "c", "--cell-diameter", "200", "--no-tta", "--resume", "a=b.jpg", "x",
    ]  # fmt: skip
    assert as_options(["adapt", "data=a", "data=b", "--out=r"]) == ["adapt", "--data", "a", "--data", "b", "--out=r"]
    assert as_options(["--help"]) == ["--help"] and as_options(["nocommand", "out=x"]) == ["nocommand", "out=x"]
    assert as_options(["predict", "adabn=false", "x"]) == ["predict", "x"]  # a switch with no --no- form: off
    assert as_options(["predict", "adapt=true", "x"]) == ["predict", "--adabn", "x"]  # its old name too
    with pytest.raises(WbcidError, match="out=: give out a value"):
        as_options(["count", "out=", "fields"])  # --out "" would have been the current folder
    image = next((data_root / "cells" / "lisc" / "basophil").glob("*.jpg"))
    odd = Path(shutil.copy(image, tmp_path / "out=odd.jpg"))
    monkeypatch.setattr(sys, "argv", ["wbcid", "predict", f"out={tmp_path / 'p.csv'}", "tta=false", str(odd)])
    with pytest.raises(SystemExit) as exited:
        main()
    assert exited.value.code == 0
    assert pd.read_csv(tmp_path / "p.csv").path.tolist() == [str(odd)]
    monkeypatch.setattr(sys, "argv", ["wbcid", "predict", "tta=perhaps", str(odd)])
    with pytest.raises(SystemExit) as exited:
        main()
    assert exited.value.code == 2 and "tta=perhaps: tta is a switch, true or false" in capsys.readouterr().err
    monkeypatch.chdir(tmp_path)
    for empty in (["--out", "", str(odd)], ["--out", str(tmp_path / "q.csv"), ""]):  # "$OUT", "$CELLS" unset
        monkeypatch.setattr(sys, "argv", ["wbcid", "predict", *empty])
        with pytest.raises(SystemExit) as exited:
            main()
        assert exited.value.code == 2 and "an empty argument" in capsys.readouterr().err
    assert not (tmp_path / "q.csv").exists()  # the current folder's images were classified into it


def test_an_interrupted_prediction_resumes_without_redoing_what_it_finished(data_root, tmp_path, monkeypatch, capsys):
    """Ctrl-C in predict kept nothing (the CSV was written once, at the end): now each finished batch
    is kept, and --resume classifies only the rest, to the same table as one whole run."""
    import wbcid.files
    import wbcid.inference
    from wbcid.cli import main
    from wbcid.inference import progress_log

    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG but not really")
    images = [*sorted((data_root / "cells" / "lisc" / "monocyte").glob("*.jpg"))[:10], bad]
    whole = predict(None, images, tmp_path / "whole.csv", batch_size=4)
    assert not progress_log(tmp_path / "whole.csv").exists()  # a finished prediction leaves only its CSV
    real, classified = wbcid.inference.predict_scores, []

    def stopped_after(batches: int):
        def scores(model, images, tta=None):
            if len(classified) == batches:
                raise KeyboardInterrupt
            classified.append(len(images[0]))
            return real(model, images, tta)

        return scores

    out = tmp_path / "p.csv"
    monkeypatch.setattr(wbcid.inference, "predict_scores", stopped_after(0))
    monkeypatch.setattr(sys, "argv", ["wbcid", "predict", *map(str, images), "--out", str(out)])
    with pytest.raises(SystemExit) as exited:
        main()
    assert exited.value.code == 130 and f"kept in {progress_log(out)}. Continue" in capsys.readouterr().err

    def full(model, images, tta=None):  # the disk filled up: the error alone did not say what was kept
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(wbcid.inference, "predict_scores", full)
    monkeypatch.setattr(sys, "argv", ["wbcid", "predict", *map(str, images), "--out", str(out), "--resume"])
    with pytest.raises(SystemExit) as exited:
        main()
    said = capsys.readouterr().err
    assert exited.value.code == 1 and "No space left on device; the images classified so far are kept in" in said
    progress_log(out).unlink()
    real_listing = wbcid.inference.list_images
    monkeypatch.setattr(wbcid.inference, "list_images", lambda paths: stopped_after(0)(None, None))
    with pytest.raises(SystemExit):
        main()  # stopped while still listing the images: nothing to resume
    assert capsys.readouterr().err.strip() == "interrupted; nothing was finished yet."
    monkeypatch.setattr(wbcid.inference, "list_images", real_listing)
    monkeypatch.setattr(wbcid.inference, "predict_scores", stopped_after(2))
    with pytest.raises(KeyboardInterrupt):
        predict(None, images, out, batch_size=4)
    assert not out.exists() and len(progress_log(out).read_text().splitlines()) == 1 + 8  # settings, 2 batches
    with pytest.raises(WbcidError, match="holds an interrupted prediction into .*pass --resume"):
        predict(None, images, out, batch_size=4)
    with pytest.raises(WbcidError, match=r"other settings \(TTA off, now on\)"):
        predict(None, images, out, batch_size=4, tta=True, resume=True)
    with wbcid.files.appending(progress_log(out), {}):  # as a second terminal's run would hold it
        with pytest.raises(WbcidError, match="another wbcid command is writing into .*p.csv.progress.jsonl now"):
            predict(None, images, out, batch_size=4, resume=True)
    classified.clear()
    monkeypatch.setattr(wbcid.inference, "predict_scores", stopped_after(99))
    resumed = predict(None, images, out, batch_size=4, resume=True)
    assert classified == [3]  # the two monocytes and the broken file not kept before
    pd.testing.assert_frame_equal(resumed, whole)
    assert pd.read_csv(out).label.tolist() == pd.read_csv(tmp_path / "whole.csv").label.tolist()
    assert not progress_log(out).exists()
