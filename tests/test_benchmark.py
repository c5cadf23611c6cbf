"""The cross-domain benchmark on a small real two-lab subset: bad options, and resuming after an interruption."""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest
from conftest import write_manifest

from wbcid.benchmark import leave_one_source_out
from wbcid.errors import WbcidError
from wbcid.train import TrainConfig

TINY = TrainConfig(model="efficientnet_lite0", input_size=96, epochs=2, batch_size=16, lr=3e-3)


@pytest.fixture(scope="module")
def two_labs(pbc_small, cells_table, data_root, tmp_path_factory):
    """pbc_small plus 12 LISC cells of each type (LISC has no train/val split: the pool splits it)."""
    lisc = cells_table[cells_table.source == "lisc"].groupby("label").head(12)
    pbc = pd.read_csv(pbc_small)
    path = tmp_path_factory.mktemp("two_labs") / "manifest.csv"
    write_manifest(lisc, data_root, path)
    pd.concat([pbc, pd.read_csv(path)]).to_csv(path, index=False)
    return path


def test_leave_one_out_refuses_options_it_would_ignore(tmp_path):
    for extra in (["--holdout", "lisc"], ["--model", str(tmp_path)]):
        result = subprocess.run(
            [sys.executable, "-m", "wbcid", "benchmark", "--data", str(tmp_path), "--out", str(tmp_path / "b")]
            + ["--leave-one-out", *extra],
            capture_output=True,
            text=True,
        )
        assert result.returncode == 2 and "not with --holdout or --model" in result.stderr, result.stderr
    assert not (tmp_path / "b").exists()


def test_leave_one_out_of_a_single_source_is_refused_before_training(pbc_small, tmp_path):
    with pytest.raises(WbcidError, match="needs cells of two sources or more .* found pbc"):
        leave_one_source_out(pbc_small, tmp_path / "b", TINY)
    assert not (tmp_path / "b" / "pbc").exists()


@pytest.mark.slow
def test_an_interrupted_leave_one_out_resumes_without_redoing_what_it_finished(two_labs, tmp_path):
    out = tmp_path / "loo"
    first = leave_one_source_out(two_labs, out, TINY)
    assert set(first["sources"]) == {"lisc", "pbc"}
    kept = (out / "lisc" / "model" / "model.pt").stat().st_mtime_ns
    # Interrupted in pbc's turn after its last epoch's checkpoint: the training's report and the
    # turn's results (its benchmark.json, report.md) are not written yet, nor the table over both.
    for unfinished in ("pbc/model/report.md", "pbc/benchmark.json", "pbc/report.md", "benchmark.json", "report.md"):
        (out / unfinished).unlink()
    with pytest.raises(WbcidError, match="pass --resume"):
        leave_one_source_out(two_labs, out, TINY)
    again = leave_one_source_out(two_labs, out, TINY, resume=True)
    assert (out / "lisc" / "model" / "model.pt").stat().st_mtime_ns == kept  # a finished source is not redone
    assert (out / "pbc" / "model" / "report.md").is_file()
    assert again["sources"] == first["sources"]  # the continued training ends where the first one did
    assert json.loads((out / "benchmark.json").read_text())["sources"] == first["sources"]
