"""ONNX export: a PyTorch model becomes a file that :class:`wbcid.serving.OnnxModel` serves.

The graph returns what :meth:`WBCNet.scores` returns, with the normalisation inside; the model's
config goes into the ONNX metadata, so the file alone is a usable model (see :mod:`wbcid.serving`);
an adapted model's verified cells are counted there but not named (:meth:`ModelConfig.shareable`).
"""

from __future__ import annotations

import copy
import json
import logging
import os
from pathlib import Path

import torch

from .errors import WbcidError
from .files import output_file
from .loading import RUN_ONNX
from .models import WBCNet
from .serving import METADATA_KEY, OUTPUTS

log = logging.getLogger("wbcid")


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

    path = output_file(path, "model.onnx")
    if path.suffix != ".onnx":  # --model reads the name: any other would be loaded as a PyTorch checkpoint
        raise WbcidError(f"{path}: name the ONNX file *.onnx (e.g. {path.with_suffix('.onnx')}), as --model reads it")
    path.parent.mkdir(parents=True, exist_ok=True)
    model = copy.deepcopy(model).eval().float().to(memory_format=torch.contiguous_format)
    for module in model.modules():  # in-place activations (Lite's ReLU6) cost torch.export ~40 % of the export
        if getattr(module, "inplace", False) is True:
            module.inplace = False
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
    onnx.helper.set_model_props(proto, {METADATA_KEY: json.dumps(model.config.shareable().to_dict())})
    onnx.save(proto, path)
    return path


def export_run(model: WBCNet, run: Path) -> None:
    """Write a run directory's ``model.onnx``, what predict, evaluate and count serve it from
    (:func:`wbcid.loading.served_file`). A failure only warns: the run is complete without it."""
    try:
        export_onnx(model, run / RUN_ONNX)
    except Exception as exc:  # torch.onnx raises many types
        log.warning("could not export %s to ONNX (%s); the run is served by PyTorch", run, exc)
