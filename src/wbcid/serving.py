"""ONNX Runtime serving: an exported model file alone is a usable model, without PyTorch.

The graph (written by :func:`wbcid.export.export_onnx`) takes what :class:`~wbcid.models.WBCNet`
takes, an RGB float batch in [0, 1] at the model's input size, and returns ``logits`` and
``ood_score``; normalisation is part of the graph. The rest of the contract (input size,
canonical crop, colour normalisation, class order) is the :class:`~wbcid.contract.ModelConfig`
stored as ONNX metadata under ``wbcid_config``.
"""

from __future__ import annotations

import json
import os

import numpy as np

from .contract import ModelConfig
from .errors import WbcidError

METADATA_KEY = "wbcid_config"
OUTPUTS = ["logits", "ood_score"]


def session(path: str | os.PathLike, threads: int | None = None):
    """An ONNX Runtime CPU session for ``path``, with the threading every wbcid model uses."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    # Half the cores by default: the rest decode images (predict) or run other fields (count) at
    # the same time. On 2 cores, 1 thread made count 20 % faster than 2 and predict no slower.
    options.intra_op_num_threads = threads or max(1, (os.cpu_count() or 2) // 2)
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # idle threads sleep
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types for unreadable models
        raise WbcidError(f"{path} is not a readable ONNX model ({exc})") from exc


class OnnxModel:
    """An ONNX Runtime session with a WBCNet's ``config`` and ``scores``, on NumPy arrays."""

    def __init__(self, path: str | os.PathLike, threads: int | None = None):
        self.session = session(path, threads)
        meta = self.session.get_modelmeta().custom_metadata_map
        if METADATA_KEY not in meta:
            raise WbcidError(f"{path} was not exported by wbcid (no {METADATA_KEY} metadata)")
        self.config = ModelConfig.from_dict(json.loads(meta[METADATA_KEY]))

    def scores(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Logits ``(n, 5)`` and OOD scores ``(n,)`` for a float NCHW batch in [0, 1]."""
        logits, ood = self.session.run(OUTPUTS, {"image": np.ascontiguousarray(x, dtype=np.float32)})
        return logits, ood
