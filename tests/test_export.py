"""ONNX export: same predictions as PyTorch on real cells, contract carried in the file."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace

import onnx
import pytest
from conftest import optimised_ops

import wbcid
from wbcid.data import read_cells
from wbcid.errors import WbcidError
from wbcid.export import export_onnx
from wbcid.inference import agreement, predict
from wbcid.loading import resolve_model
from wbcid.models import create_model
from wbcid.serving import METADATA_KEY, OnnxModel


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = create_model("efficientnet_lite0", input_size=64).eval()
    model.config = replace(model.config, crop=True)
    path = export_onnx(model, tmp_path_factory.mktemp("onnx") / "model.onnx")
    return model, path


def test_onnx_runtime_agrees_with_pytorch_on_real_cells(exported, pbc_small):
    model, path = exported
    paths = read_cells(pbc_small).paths
    result = agreement(model, resolve_model(path), paths)
    assert result["images"] == len(paths)
    assert result["label_agreement"] == 1.0
    assert result["max_probability_difference"] < 1e-4


def test_the_exported_padding_is_fixed_so_onnx_runtime_folds_it_into_the_convolutions(exported, tmp_path):
    """EfficientNet-Lite's strided "same" convolutions computed their padding from each input's size,
    and traced, that arithmetic stayed in the graph: ONNX Runtime kept five Pad and Slice nodes it
    could not fold, and served an adapted run 40 % slower than the same model exported by torch.export."""
    ops = optimised_ops(exported[1], tmp_path)
    assert ops.count("Conv") + ops.count("FusedConv") == 49 and not {"Pad", "Slice"} & set(ops)


def test_onnx_file_carries_the_preprocessing_contract(exported, pbc_small):
    model, path = exported
    props = {p.key: p.value for p in onnx.load(path).metadata_props}
    assert METADATA_KEY in props
    assert resolve_model(path).config == model.config
    cells = read_cells(pbc_small, splits=["test"]).paths[:6]
    assert predict(path, cells).label.tolist() == predict(model, cells).label.tolist()
    with pytest.raises(WbcidError, match="PyTorch model"):
        predict(path, cells, adabn=True)


def test_export_leaves_the_model_as_it_was(tmp_path):
    """The exporter works on a copy (made out-of-place: faster to export), so a model still being
    trained keeps its mode and its in-place activations."""
    model = create_model("efficientnet_lite0", input_size=32).train()
    inplace = [m.inplace for m in model.modules() if hasattr(m, "inplace")]
    export_onnx(model, tmp_path / "m.onnx")
    assert model.training and any(inplace)
    assert [m.inplace for m in model.modules() if hasattr(m, "inplace")] == inplace
    with pytest.raises(WbcidError, match=r"name the ONNX file \*\.onnx \(e\.g\. .*m\.onnx\)"):
        export_onnx(model, tmp_path / "m.pt")  # --model would read it as a PyTorch checkpoint
    assert not (tmp_path / "m.pt").exists()


def test_foreign_onnx_files_are_refused(tmp_path):
    (tmp_path / "x.onnx").write_bytes(b"garbage")
    with pytest.raises(WbcidError, match="not a readable ONNX"):
        resolve_model(tmp_path / "x.onnx")


def test_exporting_an_onnx_model_is_refused_and_export_is_quiet(tmp_path):
    """Issue 13.3 and 13.15: export of an ONNX model crashed; export printed ~90 lines; no --version."""
    from wbcid.contract import BUNDLED_ONNX

    with pytest.raises(WbcidError, match="already ONNX"):
        export_onnx(OnnxModel(BUNDLED_ONNX), tmp_path / "x.onnx")
    run = subprocess.run(
        [sys.executable, "-m", "wbcid", "export", "--out", str(tmp_path / "m.onnx")], capture_output=True, text=True
    )
    assert run.returncode == 0 and len((run.stdout + run.stderr).splitlines()) <= 5, run.stdout + run.stderr
    wrong = ["--out", str(tmp_path / "c.onnx"), "--check", str(tmp_path / "no")]
    checked = subprocess.run([sys.executable, "-m", "wbcid", "export", *wrong], capture_output=True, text=True)
    assert checked.returncode == 2 and "does not exist" in checked.stderr
    assert not (tmp_path / "c.onnx").exists()  # the data is read before the export's seconds, not after
    version = subprocess.run([sys.executable, "-m", "wbcid", "--version"], capture_output=True, text=True)
    assert version.stdout.strip() == f"wbcid {wbcid.__version__}"
