"""Grad-CAM on real cells: the heat sits on the cell, and the command writes one image per input."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from wbcid.contract import BUNDLED
from wbcid.data import CLASSES, read_cells
from wbcid.decoding import PROBLEMS, decode_image
from wbcid.errors import WbcidError
from wbcid.gradcam import explain, grad_cam
from wbcid.loading import resolve_model
from wbcid.preprocess import Preprocess, to_tensor


def test_heat_lies_on_the_centred_cell_not_the_border(data_root):
    model = resolve_model(needs_torch="Grad-CAM")
    cells = read_cells(data_root / "cells.csv", ["pbc"], ["test"]).cells[::200][:8]
    size = model.config.input_size
    images = torch.stack([to_tensor(decode_image(c.path, Preprocess.of(model.config))) for c in cells])
    heat, predicted = grad_cam(model, images)
    assert heat.shape == (len(cells), size, size) and heat.min() >= 0 and heat.max() <= 1
    quarter = size // 4
    centre = heat[:, quarter:-quarter, quarter:-quarter].mean()
    border = (heat.sum() - heat[:, quarter:-quarter, quarter:-quarter].sum()) / (heat.size * 3 / 4)
    assert centre > 1.5 * border  # the canonical crop centres the cell: that is where the evidence is
    assert (predicted == [c.label for c in cells]).mean() >= 0.75


def test_explain_writes_one_overlay_per_readable_image(data_root, tmp_path, caplog):
    good = sorted((data_root / "cells" / "lisc" / "lymphocyte").iterdir())[:2]
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    grey = tmp_path / "grey.png"  # explained, and said, as predict flags it: its map was drawn without a word
    Image.open(good[0]).convert("L").save(grey)
    written = explain(None, [*good, bad, grey], tmp_path / "cam")
    assert len(written) == 3 and f"{grey}: {PROBLEMS['grey']}" in caplog.text
    written = written[:2]
    for path in written:
        assert path.stem.split("_gradcam_")[1] in CLASSES
        with Image.open(path) as image:
            assert image.size == (512, 256)  # the input as the model saw it | the overlay
    with pytest.raises(WbcidError, match="none of the 1 images could be read"):  # not "wrote 0 images"
        explain(None, [bad], tmp_path / "none")
    assert explain(None, good, tmp_path / "cam") == written  # the same model again (after Ctrl-C, say): fine
    with pytest.raises(WbcidError, match=r"holds Grad-CAM images of another model \(bundled model .*choose another"):
        explain(BUNDLED, good, tmp_path / "cam")  # its answers would sit beside these under other names


def test_two_inputs_with_one_name_get_two_files(data_root, tmp_path):
    """Issue 13.9: two inputs named alike were written to one output file and reported as two."""
    import shutil

    sources = sorted((data_root / "cells" / "lisc" / "monocyte").glob("*.jpg"))[:2]
    for folder, source in zip(("a", "b"), sources):
        (tmp_path / folder).mkdir()
        shutil.copy(source, tmp_path / folder / "cell.jpg")
    written = explain(None, [tmp_path / "a" / "cell.jpg", tmp_path / "b" / "cell.jpg"], tmp_path / "out")
    assert len(set(written)) == 2 and all(p.is_file() for p in written)
    long = [shutil.copy(source, tmp_path / folder / f"{'é' * 120}.jpg") for folder, source in zip("ab", sources)]
    written = explain(None, long, tmp_path / "long")  # 244-byte names: with '_gradcam_<type>.png' added, over 255
    assert len(set(written)) == 2 and all(p.is_file() and len(p.name.encode()) <= 255 for p in written)


def test_an_onnx_model_is_refused_with_a_reason(data_root, tmp_path):
    """Issue 13.3: explain with --model x.onnx failed with an AttributeError."""
    from wbcid.contract import BUNDLED_ONNX

    cell = next((data_root / "cells" / "lisc" / "monocyte").glob("*.jpg"))
    with pytest.raises(WbcidError, match="PyTorch model"):
        explain(BUNDLED_ONNX, [cell], tmp_path)


def test_explain_and_evaluate_figures_inside_an_input_folder_are_not_read_as_cells(data_root, tmp_path, caplog):
    """Grad-CAM images and a confusion matrix written into the folder of cells (explain cells --out
    cells/gradcam) were classified as 3 more cells by the next predict of that folder, and trained on
    as the class whose folder held them."""
    import shutil

    from wbcid.evaluation import evaluate
    from wbcid.files import list_images

    folder = tmp_path / "lab" / "monocyte"
    folder.mkdir(parents=True)
    cells = [shutil.copy(p, folder) for p in sorted((data_root / "cells" / "lisc" / "monocyte").iterdir())[:2]]
    explain(None, [folder], folder / "gradcam")
    (tmp_path / "cells.csv").write_text("path,label\n" + "".join(f"{p},monocyte\n" for p in cells))
    evaluate(None, tmp_path / "cells.csv", folder / "evaluation")
    assert len(list(folder.rglob("*.png"))) == 3
    assert list_images([tmp_path / "lab"]) == sorted(map(Path, cells))
    assert "evaluation (1 figure(s) drawn by" in caplog.text and "gradcam (2 figure(s)" in caplog.text
    labelled = read_cells(tmp_path / "lab")  # as training data: the class folder's figures are not monocytes
    assert labelled.paths == sorted(map(Path, cells))
    assert sum(n for reason, n in labelled.skipped.items() if "a figure wbcid drew" in reason) == 3
