"""Out-of-distribution flags on real cells: non-WBC cells flagged, WBCs mostly not, in every serving path."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from wbcid.contract import CLASSES, flagged
from wbcid.data import read_cells
from wbcid.decoding import load_images
from wbcid.inference import predict
from wbcid.loading import resolve_model
from wbcid.models import create_model
from wbcid.ood import MahalanobisScore, class_statistics, image_features, ood_groups, stage_statistics
from wbcid.preprocess import Preprocess


@pytest.fixture(scope="module")
def bundled():
    return resolve_model(needs_torch="features")


@pytest.fixture(scope="module")
def platelets_and_wbcs(data_root):
    csv = data_root / "cells.csv"
    other = read_cells(csv, ["pbc_other"], ["test"], known_only=False)
    platelets = [c.path for c in other.cells if c.raw_label == "platelet"][:24]
    wbcs = read_cells(csv, ["pbc"], ["test"]).cells[::80][:24]
    return platelets, [c.path for c in wbcs]


def test_threshold_flags_the_calibration_quantile(bundled, pbc_small):
    cells = read_cells(pbc_small)
    train_images, train = load_images(cells.select(splits=["train"]), Preprocess.of(bundled.config))
    val_images, _ = load_images(cells.select(splits=["val"]), Preprocess.of(bundled.config))
    calibration = image_features(bundled, val_images)
    scorer = MahalanobisScore.fit(image_features(bundled, train_images), train.labels, calibration, quantile=0.8)
    share = flagged(scorer(calibration).numpy()).mean()
    assert 0.1 < share <= 0.2 + 1 / len(calibration)  # about 1 - quantile, by construction


@pytest.mark.parametrize(
    ("name", "recorded"),
    [("efficientnet_lite0", list(range(7))), ("vgg16", [0]), ("timm:resnet18", [])],  # VGG's pooling is 1 x 1
)
def test_training_records_every_layer_group_but_the_last_where_it_can(pbc_small, name, recorded):
    model = create_model(name, pretrained=False, input_size=64)
    images, cells = load_images(read_cells(pbc_small).select(splits=["train"]), Preprocess.of(model.config))
    features, statistics = stage_statistics(model, images, cells.labels)
    torch.testing.assert_close(features, image_features(model, images))
    assert sorted(statistics) == recorded
    for means, covariance in statistics.values():
        assert means.shape[0] == len(CLASSES) and covariance.shape == (means.shape[1],) * 2
        assert torch.linalg.eigvalsh(covariance.double()).min() > 0  # invertible, as a scorer needs


def test_platelets_are_flagged_and_wbcs_mostly_not(bundled, platelets_and_wbcs):
    platelets, wbcs = platelets_and_wbcs
    table = predict(bundled, platelets + wbcs)
    is_platelet = np.r_[np.ones(len(platelets)), np.zeros(len(wbcs))].astype(bool)
    assert {"ood_score", "flagged"} <= set(table.columns)
    assert table.flagged[is_platelet].mean() > 0.7
    assert table.flagged[~is_platelet].mean() < 0.2
    assert table.ood_score[is_platelet].median() > 2 * table.ood_score[~is_platelet].median()


def test_onnx_serves_the_same_scores(bundled, platelets_and_wbcs):
    paths = sum(platelets_and_wbcs, [])[::4]
    torch_table = predict(bundled, paths)
    onnx_table = predict(None, paths)  # the bundled model's ONNX export
    assert np.allclose(torch_table.ood_score, onnx_table.ood_score, rtol=1e-3)
    assert (torch_table.flagged == onnx_table.flagged).all()


def test_a_model_without_scorer_flags_nothing(platelets_and_wbcs):
    model = create_model("efficientnet_lite0", input_size=64).eval()
    logits, ood = model.scores(torch.rand(2, 3, 64, 64))
    assert logits.shape == (2, 5) and torch.isnan(ood).all()
    table = predict(model, platelets_and_wbcs[0][:2])
    assert not table.flagged.any() and table.ood_score.isna().all()
    assert isinstance(table, pd.DataFrame)


def test_weights_count_a_cell_as_often_as_its_weight():
    """Adaptation weighs a class-balanced replay back to the training data's class mix this way."""
    rng = np.random.default_rng(0)
    mixing = rng.normal(size=(6, 6))  # correlated features, as a network's are
    features = torch.from_numpy(np.r_[rng.normal(0, 1, (300, 6)), rng.normal(5, 3, (300, 6))] @ mixing)
    groups = np.repeat([0, 1], 300)
    means, even = class_statistics(features, groups)
    weighted_means, weighted = class_statistics(features, groups, np.where(groups == 1, 4.0, 1.0))
    repeated = class_statistics(torch.cat([features, *[features[300:]] * 3]), np.r_[groups, np.ones(900, int)])[1]
    np.testing.assert_allclose(weighted_means, means)  # only how the scatter is pooled changes
    distance = np.linalg.norm(weighted - repeated) / np.linalg.norm(repeated)
    assert distance < 0.05 < 0.3 < np.linalg.norm(even - repeated) / np.linalg.norm(repeated)


def test_each_lab_gets_its_own_clusters_unless_it_is_too_small(data_root):
    cells = read_cells(data_root / "cells.csv", ["pbc", "lisc", "cellavision"], ["test"])
    groups = ood_groups(cells, min_cells=20)
    keys = {(c.label, c.source): g for c, g in zip(cells.cells, groups)}
    assert keys[(0, "pbc")] != keys[(0, "lisc")]  # 70 lisc neutrophils: a cluster of their own
    assert keys[(4, "cellavision")] not in (keys[(4, "pbc")], keys[(4, "lisc")])  # 3 basophils: pooled
    sizes = pd.Series([(c.label, c.source) for c in cells.cells]).value_counts()
    small_labels = {label for (label, _), n in sizes.items() if n < 20}
    assert len(set(groups)) == (sizes >= 20).sum() + len(small_labels)


def test_pictures_that_are_not_blood_cells_are_flagged(tmp_path):
    from PIL import Image
    from skimage import data  # sample images that ship with scikit-image

    paths = []
    for name in ("chelsea", "astronaut", "coffee"):
        paths.append(tmp_path / f"{name}.png")
        Image.fromarray(getattr(data, name)()).save(paths[-1])
    table = predict(None, paths)
    assert table.flagged.all(), table[["path", "label", "ood_score"]]
