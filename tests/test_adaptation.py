"""Few-shot lab adaptation on real cells: a small PBC-only model learns BCCD from a few verified cells."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import write_manifest

from wbcid import adaptation
from wbcid.adaptation import AdaptConfig, adapt
from wbcid.data import CLASSES, read_cells
from wbcid.errors import WbcidError
from wbcid.evaluation import evaluate
from wbcid.inference import agreement
from wbcid.loading import resolve_model
from wbcid.models import create_model, load_checkpoint, save_model
from wbcid.preprocess import Preprocess
from wbcid.serving import OnnxModel
from wbcid.smear.counting import count
from wbcid.splits import draw_per_class
from wbcid.train import TrainConfig, fit

# The tests that need `pbc_model` train it (minutes) and are marked slow one by one, so that the
# others stay in the fast loop (`pytest -m "not slow"`).
QUICK = AdaptConfig(steps=40, views=8, replay_per_class=20)
# For the tests of what an adaptation records, refuses or chooses, not of what it learns: seconds, not a minute.
TINY = AdaptConfig(steps=4, cross_fit_steps=2, views=2, replay_per_class=5)


@pytest.fixture(scope="module")
def pbc_model(pbc_small, tmp_path_factory) -> Path:
    """A small model that has seen PBC only (it records its training data, so replay works)."""
    config = TrainConfig(input_size=96, epochs=3, batch_size=16, lr=3e-3)
    return fit(read_cells(pbc_small), tmp_path_factory.mktemp("pbc") / "run", config)


@pytest.fixture(scope="module")
def bccd(cells_table: pd.DataFrame, data_root: Path, tmp_path_factory) -> tuple[Path, Path]:
    """Five verified BCCD cells per class (at most half of a class) and 120 other BCCD cells to test on."""
    table = cells_table[cells_table.source == "bccd"].reset_index(drop=True)
    folder = tmp_path_factory.mktemp("bccd")
    cells = read_cells(write_manifest(table, data_root, folder / "all.csv"))
    picked, rest = draw_per_class(cells, 5, seed=0)
    rows = [{"path": str(c.path), "label": CLASSES[c.label], "group": c.group} for c in cells.cells]
    labelled = pd.DataFrame([rows[i] for i in picked])
    held_out = pd.DataFrame([rows[i] for i in np.random.default_rng(0).permutation(rest)[:120]])
    labelled.to_csv(folder / "verified.csv", index=False)
    held_out.to_csv(folder / "held_out.csv", index=False)
    return folder / "verified.csv", folder / "held_out.csv"


@pytest.fixture(scope="module")
def adapted(pbc_model: Path, bccd, tmp_path_factory) -> Path:
    return adapt(bccd[0], tmp_path_factory.mktemp("adapted") / "run", pbc_model, QUICK)


def test_draws_respect_groups_and_leave_half_of_each_class():
    from wbcid.data import Cell, CellSet

    cells = CellSet(
        [Cell(Path(f"{i}.jpg"), label=i % 2, group=f"g{i // 2}") for i in range(12)] + [Cell(Path("lone.jpg"), label=4)]
    )
    picked, rest = draw_per_class(cells, 10, seed=3)
    assert sorted(np.r_[picked, rest]) == list(range(13))
    labels = cells.labels
    assert (labels[picked] == 0).sum() <= 3 + 1 and (labels[picked] == 4).sum() == 0  # half, never a class's last
    groups = {cells.cells[i].group for i in picked}
    assert not groups & {cells.cells[i].group for i in rest}  # a picture's cells stay on one side


def test_the_cross_fitting_keeps_a_fields_cells_on_one_side():
    """A review export's cells of one field sat on both halves of adapt's cross-fitting, so held-out
    cells looked more like the verified ones than the lab's other cells do; without shared groups
    (every benchmark's data) the halves are as before: each class split evenly."""
    from wbcid.adaptation.finetune import cross_fit_folds

    labels = np.array([0] * 8 + [1] * 8 + [2])
    fields = np.array([f"field{i // 3}" for i in range(len(labels))])  # three cells a field
    alone = np.array([f"#{i}" for i in range(len(labels))])
    split_before = 0
    for seed in range(20):
        fold = cross_fit_folds(labels, fields, seed)
        assert all(len(set(fold[fields == f])) == 1 for f in set(fields)) and 0 < fold.sum() < len(fold)
        plain = cross_fit_folds(labels, None, seed)
        assert (cross_fit_folds(labels, alone, seed) == plain).all()
        assert all(abs(2 * plain[labels == c].sum() - (labels == c).sum()) <= 1 for c in range(3))
        split_before += any(len(set(plain[fields == f])) == 2 for f in set(fields))
    assert split_before == 20  # the old halves split some field at every seed


def test_the_replay_weighs_its_classes_as_in_all_the_training_cells(data_root: Path):
    """The replay draws each class evenly; its statistics must weigh them as the training data does
    (PBC's training cells are far from even), or the adapted OOD score loses what was measured."""
    pbc = read_cells(data_root / "cells.csv", sources=["pbc"])
    arguments, origin = adaptation.decode_replay(None, pbc, Preprocess(32), replace(QUICK, replay_per_class=2))
    train = pbc.labels[[c.split == "train" for c in pbc.cells]]
    assert np.bincount(arguments["labels"]).tolist() == [2] * len(CLASSES) and len(arguments["calibration"]) == 10
    np.testing.assert_allclose(arguments["class_shares"], np.bincount(train) / len(train))
    assert arguments["class_shares"].max() > 1.5 * arguments["class_shares"].min()
    assert origin == pbc.origin


@pytest.mark.slow
def test_adaptation_raises_accuracy_on_the_new_labs_other_cells(pbc_model: Path, adapted: Path, bccd, tmp_path: Path):
    before = evaluate(pbc_model, bccd[1])
    after = evaluate(adapted, bccd[1])
    assert after["macro_f1"] >= before["macro_f1"] + 0.1, (before["macro_f1"], after["macro_f1"])
    assert after["training_overlap"] == 0
    verified = len(pd.read_csv(bccd[0]))  # scored on the cells it learnt, by its model.onnx or its model.pt:
    assert evaluate(adapted, bccd[0])["training_overlap"] == verified  # "not a test score" (was 0: no warning)
    assert evaluate(adapted / "model.pt", bccd[0])["training_overlap"] == verified
    copied = tmp_path / "second_export"  # the same cells under other paths: known by their bytes
    for cell in read_cells(bccd[0]).cells:
        (copied / CLASSES[cell.label]).mkdir(parents=True, exist_ok=True)
        shutil.copy(cell.path, copied / CLASSES[cell.label] / f"copy_{cell.path.name}")
    assert evaluate(adapted, copied)["training_overlap"] == verified
    record = json.loads((adapted / "config.json").read_text())
    assert record["base_model"] == str(pbc_model) and record["replay"]  # replayed the recorded PBC cells
    assert sum(record["verified_cells"].values()) == len(pd.read_csv(adapted / "labelled.csv"))
    assert load_checkpoint(adapted).config.adaptation["cells"] == record["verified_cells"]


@pytest.mark.slow
def test_the_base_model_is_unchanged_and_the_run_is_an_ordinary_model(
    pbc_model: Path, adapted: Path, data_root, tmp_path: Path
):
    base = load_checkpoint(pbc_model)
    assert torch.equal(
        torch.load(pbc_model / "model.pt", weights_only=True)["state_dict"]["head.1.weight"],
        base.state_dict()["head.1.weight"],
    )
    served = resolve_model(adapted)  # the run's own ONNX export serves predict and count
    checkpoint = load_checkpoint(adapted).config
    assert isinstance(served, OnnxModel) and served.config == checkpoint.shareable()
    assert len(checkpoint.adaptation["verified"]) == sum(checkpoint.adaptation["cells"].values())  # for a later round
    assert checkpoint.adaptation["base_path"] == str(pbc_model.resolve())
    assert not {"verified", "base_path", "folder"} & served.config.adaptation.keys()  # what a lab shares: no path
    assert served.config.adaptation["cells"] == checkpoint.adaptation["cells"]  # but still counts them
    cells = sorted((data_root / "cells/bccd").rglob("*.jpg"))[:16]
    check = agreement(load_checkpoint(adapted), served, cells)
    assert check["label_agreement"] == 1.0
    result = count(adapted, sorted((data_root / "smears/bccd/images").glob("*.jpg"))[:3], tmp_path / "count")
    assert result["totals"]["detected"] >= 3
    assert isinstance(resolve_model(adapted, needs_torch="Grad-CAM"), torch.nn.Module)


@pytest.mark.slow
def test_a_run_whose_checkpoint_changed_after_its_export_is_served_by_the_checkpoint(adapted: Path, tmp_path, caplog):
    run = tmp_path / "run"
    shutil.copytree(adapted, run)
    os.utime(run / "model.onnx", (0, 0))  # exported long before model.pt was written
    assert isinstance(resolve_model(run), torch.nn.Module)
    assert "older than model.pt" in caplog.text


@pytest.mark.slow
def test_with_replay_the_adapted_ood_score_also_weighs_the_frozen_layer_groups(pbc_model: Path, adapted: Path, bccd):
    """The adapted scorer averages the penultimate score with those of the two frozen layer groups
    before the tuned ones, and every way of running the model computes it alike."""
    from wbcid.inference import predict
    from wbcid.ood import LayeredScore

    model = load_checkpoint(adapted)
    assert isinstance(model.ood, LayeredScore)
    assert model.ood.taps == adaptation.stage_taps(model, QUICK.trainable_groups) and len(model.ood.taps) == 2
    assert all(len(scorer.means) > len(CLASSES) for scorer in model.ood.stages.values())  # PBC's and the lab's
    # training recorded every layer group but the last; the stage scorers start from those statistics
    recorded = load_checkpoint(pbc_model).stage_statistics
    frozen = model.group_count - QUICK.trainable_groups
    assert sorted(recorded) == list(range(model.group_count - 1))
    assert sorted(model.stage_statistics) == list(range(frozen))  # the tuned groups' no longer hold
    for tap, scorer in zip(model.ood.taps, model.ood.stages.values()):
        means, _ = recorded[tap]
        torch.testing.assert_close(scorer.means[: len(means)], means)
    paths = read_cells(bccd[1]).paths[:32]
    torch_scores = predict(model, paths, tta=False).ood_score.to_numpy()
    onnx_scores = predict(adapted, paths, tta=False).ood_score.to_numpy()  # served by the run's model.onnx
    np.testing.assert_allclose(onnx_scores, torch_scores, rtol=1e-3)
    penultimate_only = load_checkpoint(adapted)
    penultimate_only.ood = penultimate_only.ood.penultimate
    assert not np.allclose(predict(penultimate_only, paths, tta=False).ood_score.to_numpy(), torch_scores, rtol=0.05)


@pytest.mark.slow
def test_data_statistics_can_be_recorded_again_for_a_model_saved_without_them(pbc_model: Path, pbc_small, tmp_path):
    """What scripts/train_bundled_model.py --statistics-only does to the bundled model: the batch-norm
    and layer groups' statistics as training records them, and nothing else changed."""
    from wbcid.training_statistics import record_data_statistics

    saved = torch.load(pbc_model / "model.pt", weights_only=True)
    recorded_in_training = {k: saved.pop(k) for k in ("stage_statistics", "source_statistics")}
    torch.save(saved, tmp_path / "model.pt")
    shutil.copy(pbc_model / "model.onnx", tmp_path / "model.onnx")
    os.utime(tmp_path / "model.onnx", (0, 0))
    record_data_statistics(tmp_path, read_cells(pbc_small).select(splits=["train"]))
    assert isinstance(resolve_model(tmp_path), OnnxModel)  # exported again with it: not stale
    again = torch.load(tmp_path / "model.pt", weights_only=True)
    assert again.keys() == {*saved, *recorded_in_training} and again["config"] == saved["config"]
    assert all(torch.equal(v, again["state_dict"][k]) for k, v in saved["state_dict"].items())  # scorer included
    for key, statistics in recorded_in_training.items():
        assert again[key].keys() == statistics.keys()
        for name, (means, spread) in statistics.items():
            torch.testing.assert_close(again[key][name][0], means, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(again[key][name][1], spread, rtol=1e-3, atol=1e-5)


@pytest.mark.slow
def test_the_adapted_model_predicts_over_rotations_and_flips_unless_told_not_to(
    pbc_model: Path, adapted: Path, bccd, data_root: Path, tmp_path: Path
):
    from wbcid.inference import predict

    assert not load_checkpoint(pbc_model).config.tta and load_checkpoint(adapted).config.tta
    paths = read_cells(bccd[1]).paths[:24]
    probs = [f"p_{c}" for c in CLASSES]
    default, tta, plain = (predict(adapted, paths, tta=t)[probs].to_numpy() for t in (None, True, False))
    np.testing.assert_allclose(default, tta)
    assert evaluate(adapted, bccd[1])["tta"] is True and evaluate(adapted, bccd[1], tta=False)["tta"] is False
    assert not np.allclose(default, plain, atol=1e-3)
    in_torch = predict(load_checkpoint(adapted), paths)[probs].to_numpy()
    np.testing.assert_allclose(in_torch, tta, atol=2e-3)  # the run's ONNX export keeps the TTA
    fields = sorted((data_root / "smears/bccd/images").glob("*.jpg"))[:2]
    assert count(adapted, fields, tmp_path / "count")["tta"] is True
    assert count(adapted, fields, tmp_path / "single", tta=False)["tta"] is False
    with pytest.raises(WbcidError, match="other settings .*TTA on, now off"):  # a resumed count never mixes two
        count(adapted, fields, tmp_path / "count", resume=True, tta=False)


@pytest.mark.slow
def test_missing_classes_and_single_cells_work(pbc_model: Path, bccd, data_root: Path, tmp_path: Path, caplog):
    table = pd.read_csv(bccd[0])
    few = pd.concat([table[table.label == "neutrophil"].head(3), table[table.label == "eosinophil"].head(1)])
    few.to_csv(tmp_path / "few.csv", index=False)
    with caplog.at_level("WARNING", logger="wbcid"):
        run = adapt(tmp_path / "few.csv", tmp_path / "run", pbc_model, TINY)
    assert "no verified lymphocyte, monocyte, basophil" in caplog.text  # the user is told which counts are unverified
    fields = sorted((data_root / "smears/bccd/images").glob("*.jpg"))[:1]
    counted = count(run, fields, tmp_path / "count")  # and so is whoever counts with the model later
    assert any("no verified lymphocyte, monocyte, basophil" in note for note in counted["warnings"])
    assert "no verified lymphocyte" in (tmp_path / "count" / "report.html").read_text()
    record = json.loads((run / "config.json").read_text())
    assert record["verified_cells"] == {"neutrophil": 3, "lymphocyte": 0, "monocyte": 0, "eosinophil": 1, "basophil": 0}
    assert load_checkpoint(run).head[1].out_features == len(CLASSES)  # still all five classes


def test_a_backbone_without_layer_groups_is_adapted_head_only(bccd, tmp_path: Path):
    """What the refusal to split such a backbone recommends must work."""
    base_path = save_model(create_model("timm:resnet18", pretrained=False, input_size=64), tmp_path / "base.pt")
    config = AdaptConfig(trainable_groups=0, steps=5, views=2, cross_fit=False)
    base, adapted = load_checkpoint(base_path), load_checkpoint(adapt(bccd[0], tmp_path / "run", base_path, config))
    assert all(torch.equal(v, adapted.backbone.state_dict()[k]) for k, v in base.backbone.state_dict().items())
    assert not torch.equal(base.head[1].weight, adapted.head[1].weight)
    with pytest.raises(WbcidError, match="trainable_groups=0"):
        adapt(bccd[0], tmp_path / "deeper", base_path, replace(config, trainable_groups=2))


@pytest.mark.slow
def test_bad_input_gets_a_clear_answer(pbc_model: Path, bccd, data_root: Path, tmp_path: Path, monkeypatch):
    table = pd.read_csv(bccd[0])
    mixed = pd.concat(
        [
            table.head(4).assign(split="train"),
            table.iloc[4:5].assign(split="test"),  # a manifest's test row never trains, as in `wbcid train`
            pd.DataFrame(
                [
                    {"path": str(data_root / "cells.csv"), "label": "neutrophil"},
                    {"path": table.path[0], "label": "platelet"},
                ]
            ),
        ]
    )
    mixed.to_csv(tmp_path / "mixed.csv", index=False)
    run = adapt(tmp_path / "mixed.csv", tmp_path / "mixed_run", pbc_model, TINY)
    skipped = json.loads((run / "config.json").read_text())["skipped"]
    assert any("platelet" in reason for reason in skipped)  # not one of ours: skipped and counted
    assert skipped.get("unreadable or not an image") == 1
    assert sum(n for reason, n in skipped.items() if reason.startswith("in the test split")) == 1
    table.assign(split="test").to_csv(tmp_path / "tested.csv", index=False)
    with pytest.raises(WbcidError, match=r"all \d+ cells are in the test split, and test cells never train"):
        adapt(tmp_path / "tested.csv", tmp_path / "tested_run", pbc_model, TINY)
    with pytest.raises(WbcidError, match=f"already holds an adapted model; .*: --model {run} --out ANOTHER"):
        adapt(tmp_path / "mixed.csv", run, pbc_model, TINY)
    with pytest.raises(WbcidError, match="already exists"):
        adapt(tmp_path / "mixed.csv", tmp_path, pbc_model, TINY)
    (tmp_path / "empty").mkdir()
    with pytest.raises(WbcidError, match="no labelled images"):
        adapt(tmp_path / "empty", tmp_path / "r2", pbc_model, TINY)
    with pytest.raises(WbcidError, match="no images .* in .*empty"):
        adapt(tmp_path / "mixed.csv", tmp_path / "r6", pbc_model, TINY, unlabelled=[tmp_path / "empty"])
    (tmp_path / "fake.pt").write_bytes(b"not a model")
    with pytest.raises(WbcidError, match="not a wbcid model"):
        adapt(tmp_path / "mixed.csv", tmp_path / "r3", tmp_path / "fake.pt", TINY)
    with pytest.raises(WbcidError, match="ONNX"):
        adapt(tmp_path / "mixed.csv", tmp_path / "r4", tmp_path / "m.onnx", TINY)
    with pytest.raises(WbcidError, match="invalid adaptation settings"):
        AdaptConfig(steps=0)
    cli = subprocess.run(
        [
            sys.executable,
            "-m",
            "wbcid",
            "adapt",
            "--data",
            str(tmp_path / "empty"),
            "--out",
            str(tmp_path / "r5"),
            "--model",
            str(pbc_model),
        ],
        capture_output=True,
        text=True,
    )
    assert cli.returncode == 2 and "Traceback" not in cli.stderr and "error:" in cli.stderr

    def decode(*args, **kwargs):
        raise AssertionError("images decoded before every input was found")

    monkeypatch.setattr(adaptation.command, "load_images", decode)
    with pytest.raises(WbcidError, match="does not exist: .*nowhere"):  # a wrong --replay fails fast
        adapt(tmp_path / "mixed.csv", tmp_path / "r7", pbc_model, TINY, replay=tmp_path / "nowhere")
    with pytest.raises(WbcidError, match=r"8 layer groups; cannot train the last 9 \(0-8\)"):  # so does a deep tuning
        adapt(tmp_path / "mixed.csv", tmp_path / "r8", pbc_model, replace(TINY, trainable_groups=9))


@pytest.mark.slow
def test_an_interrupted_adaptation_leaves_nothing_to_load(pbc_model: Path, bccd, tmp_path: Path, monkeypatch):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    real_save = adaptation.command.save_model
    monkeypatch.setattr(adaptation.command, "save_model", interrupt)
    with pytest.raises(KeyboardInterrupt):
        adapt(bccd[0], tmp_path / "run", pbc_model, TINY)
    assert not (tmp_path / "run").exists() and not list(tmp_path.glob("run.partial*"))
    with pytest.raises(WbcidError):
        load_checkpoint(tmp_path / "run")

    def another_adapt_finishes_first(model, path):  # two `wbcid adapt --out run` at once shared run.partial
        real_save(model, path)
        (tmp_path / "run").mkdir()
        (tmp_path / "run" / "model.pt").write_bytes(b"the other adaptation's model")

    monkeypatch.setattr(adaptation.command, "save_model", another_adapt_finishes_first)
    with pytest.raises(WbcidError, match=r"run was filled while this adaptation ran .* kept in .*run\.partial-"):
        adapt(bccd[0], tmp_path / "run", pbc_model, TINY)
    (kept,) = tmp_path.glob("run.partial-*")
    assert load_checkpoint(kept).config.adaptation and (kept / "config.json").is_file()  # whole, not lost
    assert (tmp_path / "run" / "model.pt").read_bytes() == b"the other adaptation's model"


@pytest.mark.slow
def test_unlabelled_cells_alone_that_are_all_flagged_still_give_a_model(pbc_model: Path, data_root: Path):
    """Found by the benchmark: with no verified cell and every unlabelled cell flagged, no pseudo-label
    exists; the batch-norm-adapted model comes back instead of a crash."""
    from wbcid.adaptation import adapt_model
    from wbcid.data import Cell, CellSet
    from wbcid.decoding import load_images
    from wbcid.preprocess import Preprocess

    base = load_checkpoint(pbc_model)
    noise = torch.randint(0, 256, (6, 3, 96, 96), dtype=torch.uint8)  # nothing like a blood cell: all flagged
    model = adapt_model(base, noise[:0], np.array([], dtype=np.int64), TINY, None, noise)
    assert model is not base and model.head[1].out_features == len(CLASSES)
    cells = CellSet([Cell(p) for p in sorted((data_root / "cells/bccd").rglob("*.jpg"))[:4]])
    images, _ = load_images(cells, Preprocess.of(base.config))
    assert adapt_model(base, images[:0], np.array([], dtype=np.int64), TINY, None, images) is not None


@pytest.mark.slow
def test_cross_fitting_raises_the_threshold_for_the_labs_other_cells(pbc_model: Path, adapted: Path, bccd, tmp_path):
    """The same adaptation calibrated on the verified cells' own views flags more of the lab's other
    cells: fine-tuning pulled the verified cells together. Cross-fitting moves only the threshold."""
    from dataclasses import replace

    from wbcid.inference import predict

    plain = adapt(bccd[0], tmp_path / "plain", pbc_model, replace(QUICK, cross_fit=False))
    crossed, uncrossed = load_checkpoint(adapted), load_checkpoint(plain)
    for key, value in uncrossed.state_dict().items():
        if key != "ood.threshold":
            torch.testing.assert_close(crossed.state_dict()[key], value, msg=key)
    assert crossed.ood.threshold > uncrossed.ood.threshold
    other = read_cells(bccd[1]).paths
    assert predict(adapted, other).flagged.mean() < predict(plain, other).flagged.mean()
    assert json.loads((adapted / "config.json").read_text())["adapt"]["cross_fit"] is True


@pytest.mark.parametrize(("method", "share"), [("linear", 0.085), ("weibull", 0.05)])
def test_the_share_of_a_labs_further_cells_above_the_cross_fitted_factor(monkeypatch, method: str, share: float):
    """The factor is a 95th percentile of n = 25 held-out scores (K = 5): a further cell of the lab,
    exchangeable with them, scores above it 8.5 % of the time with numpy's default rank and 5 % with
    rank 0.95 (n + 1), the option measured in docs/adaptation.md."""
    import wbcid.inference

    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(len(CLASSES)), 5)
    pool: list[float] = []  # the held-out cells' scores, handed out as each half-model scores its cells
    monkeypatch.setattr(adaptation.finetune, "fine_tune", lambda base, parts, config, replay, progress: None)
    monkeypatch.setattr(
        wbcid.inference, "predict_scores", lambda model, batches: (None, np.array([pool.pop() for _ in batches[0]]))
    )
    config = replace(QUICK, cross_fit_quantile=method)
    above = []
    for cells in 1 + rng.exponential(size=(4000, len(labels) + 1)):  # above 1: the factor is never clipped
        pool[:] = cells[:-1]
        factor = adaptation.finetune._cross_fitted_stretch(None, torch.zeros(len(labels), 1), labels, config, None)
        assert not pool  # every held-out score was used
        above.append(cells[-1] > factor)
    assert abs(np.mean(above) - share) < 0.012


@pytest.mark.slow
def test_the_half_models_take_their_own_step_budget(pbc_model: Path, bccd, monkeypatch):
    """Cross-fitting's two half-models only place the threshold, so they may train for fewer steps
    than the model that is shipped (``cross_fit_steps``); one progress bar counts every step."""
    import io

    from tqdm.auto import tqdm

    from wbcid.decoding import load_images

    base = load_checkpoint(pbc_model)
    cells = read_cells(bccd[0])
    images, cells = load_images(cells, Preprocess.of(base.config))
    budgets, bars = [], []
    fine_tune = adaptation.finetune.fine_tune

    def counted(b, parts, config, r, progress):
        budgets.append(config.steps)
        return fine_tune(b, parts, config, r, progress)

    def shown(**settings):  # the bar as a terminal would show it (pytest's output is not one)
        bars.append(tqdm(**settings | {"disable": False, "file": io.StringIO()}))
        return bars[-1]

    monkeypatch.setattr(adaptation.finetune, "fine_tune", counted)
    monkeypatch.setattr(adaptation.finetune, "tqdm", shown)
    adaptation.adapt_model(base, images, cells.labels, replace(QUICK, steps=6, cross_fit_steps=3, views=2))
    assert budgets == [6, 3, 3]
    assert [(bar.n, bar.total) for bar in bars] == [(12, 12)]


@pytest.mark.slow
def test_the_labs_loop_count_review_adapt_count(pbc_model: Path, data_root: Path, tmp_path: Path):
    """The product's loop through its real parts: a count, a person's corrections in the review
    store, its export, ``adapt`` on that export, and a count with the adapted model."""
    from wbcid.web import ReviewStore, export_review

    fields = sorted((data_root / "smears/bccd/images").glob("*.jpg"))[:6]
    count(pbc_model, fields, tmp_path / "first")
    store = ReviewStore.open(tmp_path / "first")
    cells = store.cells()
    verified = {cell["id"]: CLASSES[i % 2] for i, cell in enumerate(cells[:4])}  # two types, as a person says
    for cell_id, label in verified.items():
        store.set_label(cell_id, label, reviewer="test")
    exported = export_review(store, tmp_path / "verified")
    run = adapt(exported / "manifest.csv", tmp_path / "lab", pbc_model, TINY)
    record = json.loads((run / "config.json").read_text())
    assert record["verified_cells"] == {c: sum(v == c for v in verified.values()) for c in CLASSES}
    again = count(run, fields, tmp_path / "again")
    assert again["tta"] is True and again["totals"]["detected"] == len(cells)  # same fields, same detector
    assert any("no verified monocyte, eosinophil, basophil" in note for note in again["warnings"])
    second = ReviewStore.open(tmp_path / "again")  # the first round's cells are not asked again
    assert {(c["image"], str(c["box"]), c["label"]) for c in second.cells() if c["reviewed"]} == {
        (c["image"], str(c["box"]), verified[c["id"]]) for c in cells if c["id"] in verified
    }


@pytest.fixture(scope="module")
def second_round(bccd, tmp_path_factory) -> Path:
    """Up to two more verified BCCD cells per class, none verified in the first round (``bccd[0]``)."""
    path = tmp_path_factory.mktemp("round2") / "verified.csv"
    pd.read_csv(bccd[1]).groupby("label").head(2).to_csv(path, index=False)
    return path


def _fine_tuning_inputs(monkeypatch) -> list[tuple[torch.nn.Module, np.ndarray]]:
    """Record the model and labels each adaptation starts from, and skip its fine-tuning (what is
    checked is which model and which cells a round chooses, not the training measured elsewhere)."""
    seen = []

    def record(base, images, labels, *args, **kwargs):
        seen.append((base, np.asarray(labels)))
        return copy.deepcopy(base)

    monkeypatch.setattr(adaptation.command, "adapt_model", record)
    return seen


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.slow
def test_a_second_round_adapts_the_base_again_to_every_verified_cell(
    pbc_model: Path, adapted: Path, bccd, second_round: Path, tmp_path: Path
):
    """The lab's loop run twice: ``adapt --model ROUND1 --data ROUND2`` learns from both rounds'
    cells starting from round 1's base, exactly as adapting that base to all of them at once."""
    run = adapt(second_round, tmp_path / "round2", adapted, TINY)
    record = json.loads((run / "config.json").read_text())
    first = read_cells(bccd[0]).paths
    both = first + read_cells(second_round).paths
    assert record["continued_from"] == str(adapted) and Path(record["base_model"]) == pbc_model.resolve()
    assert {Path(p) for p in pd.read_csv(run / "labelled.csv").path} == {p.resolve() for p in both}
    assert sum(record["verified_cells"].values()) == len(both) and record["earlier_cells"] == len(first)
    at_once = adapt([bccd[0], second_round], tmp_path / "at_once", pbc_model, TINY)
    assert _same_weights(load_checkpoint(run), load_checkpoint(at_once))
    assert load_checkpoint(run).config.adaptation["cells"] == record["verified_cells"]


@pytest.mark.slow
def test_a_second_round_finds_the_first_when_the_lab_folder_moved(
    pbc_model: Path, bccd, second_round: Path, tmp_path: Path, monkeypatch, caplog
):
    """A lab's folder (its verified cells, base model and first round) moved between rounds, to
    another disk or workstation: the round-1 cells and base were "no longer on disk", so round 2
    forgot round 1. They are found where they lay relative to the round-1 run."""
    lab = tmp_path / "lab"
    (lab / "verified").mkdir(parents=True)
    first = pd.read_csv(bccd[0])
    for path in first.path:
        shutil.copy(path, lab / "verified")
    first.assign(path=[Path(p).name for p in first.path]).to_csv(lab / "verified" / "manifest.csv", index=False)
    shutil.copytree(pbc_model, lab / "runs" / "base")
    adapt(lab / "verified", lab / "runs" / "round1", lab / "runs" / "base", TINY)
    moved = Path(shutil.move(lab, tmp_path / "elsewhere" / "lab"))
    seen = _fine_tuning_inputs(monkeypatch)
    with caplog.at_level("WARNING", logger="wbcid"):
        adapt(second_round, tmp_path / "round2", moved / "runs" / "round1", TINY)
    ((start, labels),) = seen
    assert _same_weights(start, load_checkpoint(moved / "runs" / "base"))  # round 1's base, found again
    assert len(labels) == len(first) + len(read_cells(second_round))  # round 1's cells too
    assert "no longer on disk" not in caplog.text and "is not here" not in caplog.text


@pytest.mark.slow
@pytest.mark.parametrize("case", ["no-earlier", "base gone", "older record"])
def test_an_adapted_model_is_tuned_further_only_when_told_or_when_its_base_is_gone(
    adapted: Path, bccd, second_round: Path, tmp_path: Path, monkeypatch, caplog, case: str
):
    model, config = adapted, TINY
    saved = load_checkpoint(adapted)
    if case == "no-earlier":
        config = replace(TINY, earlier=False)
    else:
        record = dict(saved.config.adaptation)
        if case == "base gone":
            record["base_path"] = str(tmp_path / "deleted-run")
        else:
            del record["verified"]
        saved.config = replace(saved.config, adaptation=record)
        model = tmp_path / "edited"
        model.mkdir()
        save_model(saved, model / "model.pt")
    seen = _fine_tuning_inputs(monkeypatch)
    with caplog.at_level("WARNING", logger="wbcid"):
        adapt(second_round, tmp_path / "out", model, config)
    ((start, labels),) = seen
    assert _same_weights(start, saved)  # the adapted model itself, not its base
    earlier = len(read_cells(bccd[0])) if case == "base gone" else 0
    assert len(labels) == len(read_cells(second_round)) + earlier
    expected = {"no-earlier": None, "base gone": "is not here", "older record": "does not record the cells"}[case]
    assert expected is None or expected in caplog.text
