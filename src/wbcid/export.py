"""ONNX export: a PyTorch model becomes a file that :class:`wbcid.serving.OnnxModel` serves.

The graph returns what :meth:`WBCNet.scores` returns, with the normalisation inside; the model's
config goes into the ONNX metadata, so the file alone is a usable model (see :mod:`wbcid.serving`);
an adapted model's verified cells are counted there but not named (:meth:`ModelConfig.shareable`).
"""

from __future__ import annotations

import copy
import io
import json
import logging
import os
import warnings
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
    size, batch = model.config.input_size, {0: "batch"}
    free = {name: batch for name in ["image", *OUTPUTS]}
    with warnings.catch_warnings():  # the trace fixes branches on the maps' sizes: fixed here, only the batch is free
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        onnx_bytes = torchscript_onnx(
            _Scores(model).eval(), torch.rand(2, 3, size, size), ["image"], OUTPUTS, free, opset
        )
    proto = onnx.load_from_string(onnx_bytes)
    onnx.helper.set_model_props(proto, {METADATA_KEY: json.dumps(model.config.shareable().to_dict())})
    onnx.save(proto, path)
    return path


def _fix_same_padding(module: torch.nn.Module, example: torch.Tensor) -> None:
    """Give timm's TensorFlow-style "same" convolutions (EfficientNet-Lite's strided ones) the fixed
    padding of ``example``'s size. They compute it from each input's size at run time, and traced,
    that arithmetic stayed in the ONNX graph and kept ONNX Runtime from fusing the padding into the
    convolutions: an adapted run served 40 % slower (268 against 515 images/s, batch 64, outputs
    within 4e-6), the detector 1.3-1.9x slower. Exact wherever the padding cannot change: a
    classifier's input size is fixed (only the batch is free), and the detector's sides are multiples
    of 32, so every strided layer's input is even and padded alike (identical outputs, 32 to 640 px)."""
    from timm.layers.conv2d_same import Conv2dSame, Conv2dSameExport

    same = [m for m in module.modules() if isinstance(m, Conv2dSame)]
    for conv in same:  # timm's export form of the layer: the padding fixed at its first call
        conv.__class__, conv.pad, conv.pad_input_size = Conv2dSameExport, None, (0, 0)
    if same:
        with torch.no_grad():
            module(example)


def torchscript_onnx(
    module: torch.nn.Module,
    example: torch.Tensor,
    inputs: list[str],
    outputs: list[str],
    free: dict[str, dict[int, str]],
    opset: int | None = None,
) -> bytes:
    """``module`` as an ONNX model (bytes); ``free``: the axes of each input and output left free.
    The TorchScript exporter, deprecated but kept for speed: torch.export's took 11 s for the
    classifier against 1 s (identical outputs within 1e-6) and 167 s for the detector. ``module``'s
    "same" padding is fixed for ``example`` (:func:`_fix_same_padding`): pass a copy."""
    _fix_same_padding(module, example)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        # the fixed paddings pass a reversing Slice the exporter does not fold; ONNX Runtime folds it at load
        warnings.filterwarnings("ignore", "Constant folding - Only steps=1", UserWarning)
        torch.onnx.export(
            module,
            (example,),
            buffer,
            input_names=inputs,
            output_names=outputs,
            dynamic_axes=free,
            opset_version=opset,
            dynamo=False,
        )
    return buffer.getvalue()


def export_run(model: WBCNet, run: Path) -> None:
    """Write a run directory's ``model.onnx``, what predict, evaluate and count serve it from
    (:func:`wbcid.loading.served_file`). A failure only warns: the run is complete without it."""
    try:
        export_onnx(model, run / RUN_ONNX)
    except Exception as exc:  # torch.onnx raises many types
        log.warning("could not export %s to ONNX (%s); the run is served by PyTorch", run, exc)
