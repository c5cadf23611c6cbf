"""Fixtures over the real images in ../shared/data (or $WBCID_DATA): small subsets, never copies."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from wbcid.data import default_data_root


@pytest.fixture(scope="session")
def data_root() -> Path:
    root = default_data_root()
    if not (root / "cells.csv").is_file():
        pytest.fail(f"test data not found at {root}; set WBCID_DATA to the folder holding cells.csv")
    return root


@pytest.fixture(scope="session")
def cells_table(data_root: Path) -> pd.DataFrame:
    return pd.read_csv(data_root / "cells.csv")


def write_manifest(table: pd.DataFrame, data_root: Path, path: Path) -> Path:
    """A manifest of real images with absolute paths, so it can live in a temporary folder."""
    table = table.assign(path=[str(data_root / p) for p in table["path"]])
    table.to_csv(path, index=False)
    return path


@pytest.fixture(scope="session")
def pbc_small(cells_table: pd.DataFrame, data_root: Path, tmp_path_factory) -> Path:
    """24 train / 6 val / 8 test PBC images per class: enough to learn something in seconds."""
    pbc = cells_table[cells_table.source == "pbc"]
    parts = [
        pbc[(pbc.split == split) & (pbc.label == label)].head(n)
        for split, n in (("train", 24), ("val", 6), ("test", 8))
        for label in pbc.label.unique()
    ]
    return write_manifest(pd.concat(parts), data_root, tmp_path_factory.mktemp("pbc") / "manifest.csv")


def optimised_ops(onnx_path: Path, tmp_path: Path) -> list[str]:
    """The operators ONNX Runtime runs of a model, after its portable graph optimisations."""
    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED  # portable, unlike ALL
    options.optimized_model_filepath = str(tmp_path / "optimised.onnx")
    ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    return [node.op_type for node in onnx.load(tmp_path / "optimised.onnx").graph.node]
