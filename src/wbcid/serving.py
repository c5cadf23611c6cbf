"""Serving an exported model (ONNX Runtime; OpenVINO for bf16): the file alone is a usable model, without PyTorch.

The graph (written by :func:`wbcid.export.export_onnx`) takes what :class:`~wbcid.models.WBCNet`
takes, an RGB float batch in [0, 1] at the model's input size, and returns ``logits`` and
``ood_score``; normalisation is part of the graph. The rest of the contract (input size,
canonical crop, colour normalisation, class order) is the :class:`~wbcid.contract.ModelConfig`
stored as ONNX metadata under ``wbcid_config``.

Precision: ONNX Runtime runs the graph in fp32. Where OpenVINO is installed and the CPU has bf16
units (AVX-512 BF16 or AMX), the same file can run in bf16: the network 1.7-1.9x as fast as in ONNX
Runtime fp32 on two CPUs measured (docs/precision.md, docs/precision_amx.md), but 0.77x on a third,
an Intel Xeon with AVX-512 BF16 and no AMX (docs/precision_xeon_bf16.md), so ``auto`` measures both
on the CPU it runs on before it takes bf16 (:meth:`OnnxModel.bf16_pays`). bf16 moves the logits by
up to about 0.2 and the OOD score by up to about 10 %, so a cell whose two best classes are closer
than :data:`RECHECK_MARGIN`, or whose OOD score is near the flag threshold (:data:`RECHECK_OOD`), is
run again in fp32: labels and flags then agree with fp32 whatever the CPU, and both bands are
properties of the arithmetic, not of any lab's cells.
"""

from __future__ import annotations

import functools
import json
import os
import threading
import time

import numpy as np

from .contract import PRECISIONS, ModelConfig
from .errors import WbcidError

METADATA_KEY = "wbcid_config"
OUTPUTS = ["logits", "ood_score"]
# A bf16 result is recomputed in fp32 where its two best logits are closer than RECHECK_MARGIN or
# its OOD score is within a factor exp(RECHECK_OOD) of the threshold (1): each about 2.5x the
# largest bf16-fp32 difference of the bundled model on 500 PBC training cells (logits 0.19, log
# OOD score 0.10; benchmarks/precision.py).
RECHECK_MARGIN = 0.5
RECHECK_OOD = 0.25
NO_BF16_UNITS = "this CPU has no bf16 units (AVX-512 BF16 or AMX)"  # bf16 refused, serving and training alike
# ``auto`` turns to bf16 from this many images: below it, OpenVINO's start-up (about 0.4 s measured
# here) costs more than bf16 saves (about 1 ms per image on one core).
BF16_MIN_IMAGES = 512
# The share of cells whose bf16 result is rechecked in fp32, which bf16 must save time for: the median
# of the five labs' shares (4-38 %: docs/precision.md, docs/precision_amx.md), as no job's is known ahead.
RECHECKED_SHARE = 0.27
PROBE_IMAGES = 16  # images each arithmetic is timed on (random pixels: the time does not depend on them)


def _threads(threads: int | None) -> int:
    # Half the cores by default: the rest decode images (predict) or run other fields (count) at
    # the same time. On 2 cores, 1 thread made count 20 % faster than 2 and predict no slower.
    return threads or max(1, (os.cpu_count() or 2) // 2)


def session(path: str | os.PathLike, threads: int | None = None):
    """An ONNX Runtime CPU session for ``path``, with the threading every wbcid model uses."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = _threads(threads)
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # idle threads sleep
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types for unreadable models
        raise WbcidError(f"{path} is not a readable ONNX model ({exc})") from exc


@functools.cache
def bf16_missing() -> str | None:
    """Why bf16 serving is not available here, or ``None`` when it is."""
    try:
        import openvino
    except ImportError:
        return "bf16 serving needs OpenVINO (pip install openvino)"
    if "BF16" not in openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        return NO_BF16_UNITS
    return None


def choose_precision(requested: str, images: int) -> str:
    """The arithmetic for a job of ``images`` images: ``fp32``, ``bf16``, or ``auto`` where bf16 could
    pay, i.e. for a job large enough on a CPU with bf16 units (:class:`OnnxModel` then measures it)."""
    if requested not in PRECISIONS:
        raise WbcidError(f"precision must be one of {', '.join(PRECISIONS)}, not {requested!r}")
    if requested == "fp32" or (requested == "auto" and images < BF16_MIN_IMAGES):
        return "fp32"
    missing = bf16_missing()  # imports OpenVINO: only asked where bf16 would be used
    if missing is None:
        return requested
    if requested == "bf16":
        raise WbcidError(f"--precision bf16: {missing}; use --precision fp32")
    return "fp32"


def _openvino_bf16(path: str | os.PathLike, threads: int | None):
    """A function running the ONNX file in OpenVINO with bf16 arithmetic: float batch -> (logits, ood)."""
    import openvino

    config = {"INFERENCE_PRECISION_HINT": "bf16", "INFERENCE_NUM_THREADS": _threads(threads)}
    request = openvino.Core().compile_model(str(path), "CPU", config).create_infer_request()
    lock = threading.Lock()  # one request serves one batch at a time (ONNX Runtime sessions need no lock)

    def run(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with lock:
            out = request.infer({0: x})  # views of OpenVINO's buffers, overwritten by the next call
            return np.array(out[OUTPUTS[0]]), np.array(out[OUTPUTS[1]])

    return run


class OnnxModel:
    """An exported model with a WBCNet's ``config`` and ``scores``, on NumPy arrays.

    ``precision``: ``fp32`` (ONNX Runtime), ``bf16`` (OpenVINO, close calls rechecked in fp32), or
    ``auto``: bf16 where it measures faster here (:meth:`bf16_pays`); ``rechecked`` counts the images
    recomputed in fp32, ``measured`` the milliseconds per image ``auto`` compared.
    """

    def __init__(self, path: str | os.PathLike, threads: int | None = None, precision: str = "fp32"):
        self.session = session(path, threads)
        meta = self.session.get_modelmeta().custom_metadata_map
        if METADATA_KEY not in meta:
            raise WbcidError(f"{path} was not exported by wbcid (no {METADATA_KEY} metadata)")
        self.config = ModelConfig.from_dict(json.loads(meta[METADATA_KEY]))
        self.precision = choose_precision(precision, BF16_MIN_IMAGES)  # a model alone: ``auto`` as for a big job
        self._bf16 = _openvino_bf16(path, threads) if self.precision != "fp32" else None
        self.rechecked = 0
        self._counting = threading.Lock()  # count's fields call scores from several threads
        self.measured: dict[str, float] = {}
        if self.precision == "auto":
            self.precision = "bf16" if self.bf16_pays() else "fp32"
            self._bf16 = self._bf16 if self.precision == "bf16" else None

    def bf16_pays(self) -> bool:
        """Whether bf16 runs the network here in less time than fp32, its fp32 rechecks of
        ``RECHECKED_SHARE`` of the cells included; each is timed on its second call (the first
        allocates), on ``PROBE_IMAGES`` images. The times are kept in ``measured``."""
        size = self.config.input_size
        x = np.random.default_rng(0).random((PROBE_IMAGES, 3, size, size), dtype=np.float32)
        for name, run in (("fp32", self._fp32), ("bf16", self._bf16)):
            run(x)
            start = time.perf_counter()
            run(x)
            self.measured[f"{name}_ms_per_image"] = round((time.perf_counter() - start) / len(x) * 1e3, 3)
        fp32, bf16 = self.measured["fp32_ms_per_image"], self.measured["bf16_ms_per_image"]
        return bf16 + RECHECKED_SHARE * fp32 < fp32

    def scores(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Logits ``(n, 5)`` and OOD scores ``(n,)`` for a float NCHW batch in [0, 1]."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        if self._bf16 is None:
            return self._fp32(x)
        logits, ood = self._bf16(x)
        close = self.needs_fp32(logits, ood)
        if close.any():
            logits[close], ood[close] = self.fp32_scores(x[close])
        return logits, ood

    def needs_fp32(self, logits: np.ndarray, ood: np.ndarray | None = None) -> np.ndarray:
        """Which bf16 results lie too close to a decision to keep: the two best logits within
        :data:`RECHECK_MARGIN`, or the OOD score within :data:`RECHECK_OOD` of the threshold (none in fp32)."""
        if self._bf16 is None:
            return np.zeros(len(logits), bool)
        top2 = np.partition(logits, -2, axis=1)[:, -2:]
        close = top2[:, 1] - top2[:, 0] < RECHECK_MARGIN
        if ood is not None:
            with np.errstate(divide="ignore", invalid="ignore"):  # NaN (no scorer) is never near the threshold
                close |= np.abs(np.log(ood)) < RECHECK_OOD
        return close

    def fp32_scores(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`scores` in fp32 (ONNX Runtime); on a bf16 model, counted in ``rechecked``."""
        if self._bf16 is not None:
            with self._counting:
                self.rechecked += len(x)
        return self._fp32(np.ascontiguousarray(x, dtype=np.float32))

    def _fp32(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        logits, ood = self.session.run(OUTPUTS, {"image": x})
        return logits, ood


def served_precision(model: object) -> dict:
    """What a model's results were computed in, for the record (PyTorch models: fp32)."""
    chosen = {"measured": model.measured} if isinstance(model, OnnxModel) and model.measured else {}  # by ``auto``
    if isinstance(model, OnnxModel) and model.precision == "bf16":
        # rechecked: network evaluations, TTA views too
        return {"arithmetic": "bf16", "rechecked_in_fp32": model.rechecked} | chosen
    return {"arithmetic": "fp32"} | chosen
