"""Mechanics of the cross-domain methods on real cells: crop, stain jitter, AdaBN, TTA, protocol."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from wbcid.adapt import adapt_batchnorm, batchnorm_statistics, dihedral_scores
from wbcid.augment import RandomStainJitter, train_augmentation
from wbcid.benchmark import training_pool
from wbcid.crop import MARGIN, canonical_crop, find_nucleus
from wbcid.data import read_cells
from wbcid.errors import WbcidError
from wbcid.evaluate import bootstrap_intervals, compute_metrics
from wbcid.models import create_model


@pytest.fixture(scope="module")
def pbc_cells(data_root):
    table = pd.read_csv(data_root / "cells.csv")
    paths = table[(table.source == "pbc") & (table.split == "test")].groupby("label").head(2).path
    return [Image.open(data_root / p).convert("RGB") for p in paths]


def _gray(image: Image.Image, size: int = 64) -> np.ndarray:
    return np.asarray(image.convert("L").resize((size, size)), dtype=np.float32)


def test_canonical_crop_centres_the_nucleus_at_a_fixed_scale(pbc_cells):
    for cell in pbc_cells:
        crop = np.asarray(canonical_crop(cell, 128))
        row, col, extent = find_nucleus(crop)
        assert abs(row - 64) < 10 and abs(col - 64) < 10
        assert extent == pytest.approx(128 / MARGIN, rel=0.2)


def test_canonical_crop_undoes_framing_and_image_size(pbc_cells):
    """Shifted/zoomed and downscaled copies of a cell crop to nearly the same picture."""
    reframe_raw, reframe_crop, rescale_crop = [], [], []
    for cell in pbc_cells:
        reference = _gray(canonical_crop(cell, 128))
        for variant in (cell.crop((20, 35, 204, 219)), cell.crop((0, 0, 190, 190))):
            reframe_raw.append(np.abs(_gray(cell) - _gray(variant)).mean())
            reframe_crop.append(np.abs(reference - _gray(canonical_crop(variant, 128))).mean())
        rescale_crop.append(np.abs(reference - _gray(canonical_crop(cell.resize((112, 112)), 128))).mean())
    assert np.median(reframe_crop) < 0.3 * np.median(reframe_raw)
    assert np.median(rescale_crop) < 5  # grey levels out of 255


def test_canonical_crop_falls_back_on_images_without_a_cell():
    blank = Image.new("RGB", (90, 60), (230, 200, 190))
    assert find_nucleus(np.asarray(blank)) is None
    assert canonical_crop(blank, 32).size == (32, 32)


def test_stain_jitter_changes_colour_not_geometry(pbc_cells):
    torch.manual_seed(0)
    x = torch.stack([torch.from_numpy(np.asarray(c.resize((96, 96))).copy()).permute(2, 0, 1) for c in pbc_cells])
    x = x.float() / 255
    y = RandomStainJitter(sigma=0.2, bias=0.1)(x)
    assert y.shape == x.shape and 0 <= y.min() and y.max() <= 1
    assert (y - x).abs().mean(dim=(1, 2, 3)).min() > 0.01  # every image's colour moved
    for a, b in zip(x, y):  # ...but the same structures stay in the same place
        ga, gb = np.gradient(a.mean(0).numpy()), np.gradient(b.mean(0).numpy())
        ma, mb = np.hypot(*ga).ravel(), np.hypot(*gb).ravel()
        assert np.corrcoef(ma, mb)[0, 1] > 0.9


def test_augmentation_policies():
    x = torch.rand(4, 3, 32, 32)
    assert torch.equal(train_augmentation("none")(x), x)
    for policy in ("basic", "domain"):
        assert train_augmentation(policy)(x).shape == x.shape
    with pytest.raises(WbcidError, match="policy"):
        train_augmentation("heavy")


def test_adabn_only_changes_normalisation_statistics(pbc_cells):
    model = create_model("efficientnet_lite0", input_size=64).eval()
    images = torch.stack([torch.from_numpy(np.asarray(c.resize((64, 64))).copy()).permute(2, 0, 1) for c in pbc_cells])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    adapted = adapt_batchnorm(model, [images[:5], images[5:]])
    for key, value in model.state_dict().items():  # the original model is untouched
        torch.testing.assert_close(value, before[key])
    for name, param in adapted.named_parameters():  # learned weights are unchanged
        torch.testing.assert_close(param, dict(model.named_parameters())[name])
    with torch.no_grad():  # the stem's statistics are now those of these images
        stem = model.backbone.conv_stem(((images.float() / 255) - model.mean) / model.std)
    torch.testing.assert_close(adapted.backbone.bn1.running_mean, stem.mean((0, 2, 3)), rtol=1e-4, atol=1e-4)
    assert not adapted.training and not torch.allclose(adapted.backbone.bn1.running_mean, model.backbone.bn1.running_mean)


def test_tta_is_invariant_to_rotating_the_input():
    model = create_model("seed-cnn").eval()
    x = torch.rand(3, 3, 50, 50)
    with torch.no_grad():
        torch.testing.assert_close(dihedral_scores(model, x)[0], dihedral_scores(model, torch.rot90(x, 1, (2, 3)))[0],
                                   rtol=1e-4, atol=1e-5)


def test_bootstrap_intervals_bracket_the_estimate():
    rng = np.random.default_rng(1)
    y_true = rng.integers(0, 4, 300)  # no basophils
    y_pred = np.where(rng.random(300) < 0.8, y_true, rng.integers(0, 5, 300))
    point = compute_metrics(y_true, y_pred)
    ci = bootstrap_intervals(y_true, y_pred)
    for key in ("accuracy", "balanced_accuracy", "macro_f1"):
        low, high = ci[key]
        assert low < point[key] < high and high - low < 0.15
    assert bootstrap_intervals(y_true, y_pred) == ci  # seeded


def test_training_pool_keeps_splits_and_never_leaks_a_holdout(data_root):
    cells = read_cells(data_root / "cells.csv", sources=["pbc", "lisc", "tecom"])
    rest = cells.subset([c.source != "tecom" and not (c.source == "pbc" and c.split == "test") for c in cells.cells])
    pool = training_pool(rest)
    assert {c.source for c in pool.cells} == {"pbc", "lisc"}
    assert {c.split for c in pool.cells} == {"train", "val"}
    lisc = [c for c in pool.cells if c.source == "lisc"]
    assert len(lisc) == 305 and 0.1 < sum(c.split == "val" for c in lisc) / len(lisc) < 0.2
    pbc_original = {c.path: c.split for c in cells.cells if c.source == "pbc"}
    assert all(pbc_original[c.path] == c.split for c in pool.cells if c.source == "pbc")


def test_source_aware_adabn_is_the_identity_on_the_training_lab(pbc_cells):
    """With the training lab's statistics recorded, adapting to that same lab changes nothing."""
    model = create_model("efficientnet_lite0", input_size=64).eval()
    images = torch.stack([torch.from_numpy(np.asarray(c.resize((64, 64))).copy()).permute(2, 0, 1) for c in pbc_cells])
    model.source_statistics = batchnorm_statistics(model, [images])
    adapted = adapt_batchnorm(model, [images])
    x = images.float() / 255
    with torch.no_grad():
        torch.testing.assert_close(adapted(x), model(x), rtol=1e-3, atol=1e-3)
        other = adapt_batchnorm(model, [images.flip(1)])(x)  # another "lab": channels swapped
    assert not torch.allclose(other, model(x), atol=1e-2)
