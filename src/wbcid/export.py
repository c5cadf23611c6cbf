"""ONNX export and ONNX Runtime inference, with the preprocessing contract inside the file.

The exported graph takes what :class:`~wbcid.models.WBCNet` takes, an RGB float batch in
[0, 1] at the model's input size, and returns ``logits`` and ``ood_score`` (what
:meth:`WBCNet.scores` returns); normalisation is part of the graph. The
rest of the contract (input size, canonical crop, colour normalisation, class order) is stored
as ONNX metadata under ``wbcid_config``, so an ONNX file alone is a usable model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from .errors import WbcidError
from .models import ModelConfig, WBCNet

METADATA_KEY = "wbcid_config"
OUTPUTS = ["logits", "ood_score"]


class _Scores(torch.nn.Module):
    """What is exported: both of :meth:`WBCNet.scores`' outputs."""

    def __init__(self, model: WBCNet):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.scores(x)


def export_onnx(model: WBCNet, path: str | os.PathLike, opset: int = 18) -> Path:
    """Write ``model`` as ONNX (dynamic batch size) with its config in the metadata."""
    import onnx

    if not isinstance(model, WBCNet):
        raise WbcidError("export needs the PyTorch model (a run directory or .pt file); this one is already ONNX")

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval().float().to(memory_format=torch.contiguous_format)
    size = model.config.input_size
    example = torch.rand(2, 3, size, size)
    program = torch.onnx.export(
        _Scores(model).eval(),
        (example,),
        input_names=["image"],
        output_names=OUTPUTS,
        dynamic_shapes=({0: torch.export.Dim("batch")},),
        opset_version=opset,
        external_data=False,
        dynamo=True,
        verbose=False,  # torch.onnx otherwise logs ~90 lines of progress per export
    )
    proto = program.model_proto
    onnx.helper.set_model_props(proto, {METADATA_KEY: json.dumps(model.config.to_dict())})
    onnx.save(proto, path)
    return path


class OnnxModel:
    """An ONNX Runtime session that quacks like a WBCNet for inference (``config``, ``__call__``)."""

    def __init__(self, path: str | os.PathLike, threads: int | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types for unreadable models
            raise WbcidError(f"{path} is not a readable ONNX model ({exc})") from exc
        meta = self.session.get_modelmeta().custom_metadata_map
        if METADATA_KEY not in meta:
            raise WbcidError(f"{path} was not exported by wbcid (no {METADATA_KEY} metadata)")
        self.config = ModelConfig.from_dict(json.loads(meta[METADATA_KEY]))

    def scores(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = np.ascontiguousarray(x.numpy(), dtype=np.float32)
        logits, ood = self.session.run(OUTPUTS, {"image": x})
        return torch.from_numpy(logits), torch.from_numpy(ood)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.scores(x)[0]

    def eval(self) -> OnnxModel:
        return self
