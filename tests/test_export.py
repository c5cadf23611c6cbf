"""ONNX export: same predictions as PyTorch on real cells, contract carried in the file."""

from __future__ import annotations

import onnx
import pytest

from wbcid.data import read_cells
from wbcid.errors import WbcidError
from wbcid.export import METADATA_KEY, export_onnx
from wbcid.models import create_model, load_model
from wbcid.predict import agreement, predict


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = create_model("efficientnet_lite0", input_size=64).eval()
    model.config["crop"] = True
    path = export_onnx(model, tmp_path_factory.mktemp("onnx") / "model.onnx")
    return model, path


def test_onnx_runtime_agrees_with_pytorch_on_real_cells(exported, pbc_small):
    model, path = exported
    paths = read_cells(pbc_small).paths
    result = agreement(model, load_model(path), paths)
    assert result["images"] == len(paths)
    assert result["label_agreement"] == 1.0
    assert result["max_probability_difference"] < 1e-4


def test_onnx_file_carries_the_preprocessing_contract(exported, pbc_small):
    model, path = exported
    props = {p.key: p.value for p in onnx.load(path).metadata_props}
    assert METADATA_KEY in props
    assert load_model(path).config == model.config
    cells = read_cells(pbc_small, splits=["test"]).paths[:6]
    assert predict(path, cells).label.tolist() == predict(model, cells).label.tolist()
    with pytest.raises(WbcidError, match="PyTorch model"):
        predict(path, cells, adapt=True)


def test_foreign_onnx_files_are_refused(tmp_path):
    (tmp_path / "x.onnx").write_bytes(b"garbage")
    with pytest.raises(WbcidError, match="not a readable ONNX"):
        load_model(tmp_path / "x.onnx")
