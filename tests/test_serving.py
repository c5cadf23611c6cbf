"""Serving precision: bf16 (OpenVINO) against fp32 (ONNX Runtime) on real cells, and how it is chosen."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from typer.testing import CliRunner

from wbcid import serving
from wbcid.cli import app
from wbcid.contract import BUNDLED_ONNX, flagged
from wbcid.data import read_cells
from wbcid.decoding import load_images
from wbcid.errors import WbcidError
from wbcid.inference import predict_scores
from wbcid.preprocess import Preprocess
from wbcid.serving import RECHECK_MARGIN, RECHECK_OOD, OnnxModel, choose_precision


def test_bf16_labels_and_flags_agree_with_fp32_because_close_calls_are_rechecked(data_root):
    if serving.bf16_missing():
        pytest.skip(serving.bf16_missing())
    fp32, bf16 = OnnxModel(BUNDLED_ONNX), OnnxModel(BUNDLED_ONNX, precision="bf16")
    cells = read_cells(data_root / "cells.csv", ["bccd", "lisc"])  # other labs: more close calls than PBC
    images, _ = load_images(cells.subset(range(0, len(cells), 4)), Preprocess.of(fp32.config))
    x = images.numpy().astype(np.float32) / 255
    logits32, ood32 = fp32.scores(x)
    logits16, ood16 = bf16.scores(x)
    rechecked = np.all(logits16 == logits32, axis=1)
    assert 0 < rechecked.sum() == bf16.rechecked < len(x)  # some, not all, were close calls
    np.testing.assert_array_equal(logits16.argmax(1), logits32.argmax(1))
    np.testing.assert_array_equal(flagged(ood16), flagged(ood32))
    top2 = np.sort(logits16[~rechecked], axis=1)[:, -2:]
    assert (top2[:, 1] - top2[:, 0] >= RECHECK_MARGIN).all()  # the rest were clear: bf16 cannot flip them
    assert (np.abs(np.log(ood16[~rechecked])) >= RECHECK_OOD).all()
    assert np.abs(logits16 - logits32).max() < RECHECK_MARGIN
    assert np.abs(np.log(ood16 / ood32)).max() < RECHECK_OOD


def test_bf16_averages_over_rotations_and_flips_recheck_their_own_close_calls(data_root):
    """Each view's bf16 error is small, but they add up in the average: its close calls are fp32's."""
    if serving.bf16_missing():
        pytest.skip(serving.bf16_missing())
    fp32, bf16 = OnnxModel(BUNDLED_ONNX), OnnxModel(BUNDLED_ONNX, precision="bf16")
    cells = read_cells(data_root / "cells.csv", ["bccd", "tecom"])
    images, _ = load_images(cells.subset(range(0, len(cells), 3)), Preprocess.of(fp32.config))
    logits32, ood32 = predict_scores(fp32, [images.numpy()], tta=True)
    logits16, ood16 = predict_scores(bf16, [images.numpy()], tta=True)
    np.testing.assert_array_equal(logits16.argmax(1), logits32.argmax(1))
    np.testing.assert_array_equal(flagged(ood16), flagged(ood32))
    top2 = np.sort(logits32, axis=1)[:, -2:]
    close = top2[:, 1] - top2[:, 0] < RECHECK_MARGIN / 4  # close in bf16 too, whose logits move by < 0.2
    assert close.any()
    np.testing.assert_allclose(logits16[close], logits32[close], rtol=0, atol=1e-5)  # every view redone in fp32


def test_precision_is_chosen_by_job_size_and_refused_clearly_where_missing(monkeypatch):
    assert choose_precision("fp32", 10**6) == "fp32"
    assert choose_precision("auto", 10) == "fp32"  # OpenVINO's start-up would cost more than it saves
    expected = "fp32" if serving.bf16_missing() else "auto"  # OnnxModel measures whether bf16 pays
    assert choose_precision("auto", serving.BF16_MIN_IMAGES) == expected
    with pytest.raises(WbcidError, match="one of auto, fp32, bf16"):
        choose_precision("half", 10)
    monkeypatch.setattr(serving, "bf16_missing", lambda: "this CPU has no bf16 units (AVX-512 BF16 or AMX)")
    assert choose_precision("auto", 10**6) == "fp32"  # a CPU without bf16 gets the fp32 path
    with pytest.raises(WbcidError, match="no bf16 units.*--precision fp32"):
        choose_precision("bf16", 10**6)


def test_evaluate_records_the_precision_it_ran_in(pbc_small, tmp_path):
    precision = "fp32" if serving.bf16_missing() else "bf16"
    out = tmp_path / "eval"
    args = ["evaluate", "--data", str(pbc_small), "--split", "test", "--out", str(out), "--precision", precision]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    recorded = json.loads((out / "metrics.json").read_text())["precision"]
    assert recorded["arithmetic"] == precision
    assert ("rechecked_in_fp32" in recorded) == (precision == "bf16")


def _fake_bf16(seconds_per_image: float | None):
    """An OpenVINO stand-in: fp32's results, after a pause per image (``None``: at once, as zeros)."""

    def make(path, threads):
        fp32 = serving.session(path, threads)

        def run(x):
            if seconds_per_image is None:
                return np.zeros((len(x), 5), np.float32), np.full(len(x), 0.5, np.float32)
            time.sleep(seconds_per_image * len(x))
            return tuple(fp32.run(serving.OUTPUTS, {"image": x}))

        return run

    return make


def test_auto_takes_bf16_only_where_it_measures_faster(monkeypatch, data_root):
    """On an Intel Xeon with AVX-512 BF16 but no AMX, OpenVINO's bf16 ran the network at 0.7x fp32's
    speed, and ``auto`` took it for any CPU with bf16 units: 2,000 cells took 10 s instead of 8."""
    monkeypatch.setattr(serving, "bf16_missing", lambda: None)
    monkeypatch.setattr(serving, "_openvino_bf16", _fake_bf16(0.05))  # far slower than fp32's few ms
    slow = OnnxModel(BUNDLED_ONNX, precision="auto")
    assert slow.precision == "fp32" and slow._bf16 is None
    recorded = serving.served_precision(slow)
    assert recorded["arithmetic"] == "fp32"
    assert recorded["measured"]["bf16_ms_per_image"] > recorded["measured"]["fp32_ms_per_image"]
    monkeypatch.setattr(serving, "_openvino_bf16", _fake_bf16(None))
    fast = OnnxModel(BUNDLED_ONNX, precision="auto")
    assert fast.precision == "bf16" and serving.served_precision(fast)["arithmetic"] == "bf16"
    monkeypatch.setattr(serving, "_openvino_bf16", _fake_bf16(0.05))
    assert OnnxModel(BUNDLED_ONNX, precision="bf16").precision == "bf16"  # asked for: not measured
    assert "measured" not in serving.served_precision(OnnxModel(BUNDLED_ONNX, precision="bf16"))


def test_a_resumed_prediction_keeps_the_arithmetic_it_began_in(monkeypatch, data_root, tmp_path):
    """``auto`` measures afresh each time it starts, so a resumed prediction could measure the other way
    and be refused as made with other settings: it continues in the arithmetic its log records."""
    import wbcid.inference
    from wbcid.inference import predict, progress_log

    monkeypatch.setattr(serving, "bf16_missing", lambda: None)
    monkeypatch.setattr(serving, "BF16_MIN_IMAGES", 2)
    monkeypatch.setattr(serving, "_openvino_bf16", _fake_bf16(0.0))  # as fast as fp32 itself: bf16 does not pay
    images = sorted((data_root / "cells" / "lisc" / "monocyte").glob("*.jpg"))[:6]
    out = tmp_path / "p.csv"
    real = wbcid.inference.predict_scores

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    def stop_after_one(model, batches, tta=None):
        monkeypatch.setattr(wbcid.inference, "predict_scores", interrupted)
        return real(model, batches, tta)

    monkeypatch.setattr(wbcid.inference, "predict_scores", stop_after_one)
    with pytest.raises(KeyboardInterrupt):
        predict(None, images, out, batch_size=3, precision="bf16")
    assert '"precision": "bf16"' in progress_log(out).read_text().splitlines()[0]
    monkeypatch.setattr(wbcid.inference, "predict_scores", real)
    resumed = predict(None, images, out, batch_size=3, resume=True)  # auto, which would measure fp32 here
    assert len(resumed) == 6 and resumed.label.ne("").all()
