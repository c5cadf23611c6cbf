"""The one way every command turns what a user names into a model.

``None`` is the bundled model, a directory is a training run (its ``model.pt``, or its
``model.onnx`` for inference where it has one as new), ``.pt`` a checkpoint, ``.onnx`` an export
served by ONNX Runtime; a model object passes through. PyTorch is imported only for a PyTorch
model, so serving an ONNX model never pays its start-up (about 2 s).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, TypeAlias

from .contract import BUNDLED, BUNDLED_ONNX, BUNDLED_TRAINING
from .errors import WbcidError
from .serving import OnnxModel

if TYPE_CHECKING:
    from .models import WBCNet

Model: TypeAlias = "WBCNet | OnnxModel"
RUN_ONNX = "model.onnx"  # a run's export, written by `wbcid adapt` (or `wbcid export --out RUN/model.onnx`)
ADAPTED_CELLS = "labelled.csv"  # an adapted run's verified cells (path, label); its model.onnx does not list them
log = logging.getLogger("wbcid")


def served_file(run: Path) -> Path:
    """What serves a run directory's predictions: its ``model.onnx`` (2-4x faster than PyTorch on
    CPU, docs/serving.md) unless ``model.pt`` is newer (retrained or refitted since), else the run."""
    onnx, checkpoint = run / RUN_ONNX, run / "model.pt"
    if not onnx.is_file():
        return run
    if checkpoint.is_file() and checkpoint.stat().st_mtime > onnx.stat().st_mtime:
        log.warning("%s is older than %s: serving model.pt (export again to serve ONNX)", onnx, checkpoint.name)
        return run
    return onnx


def _torch_twin(path: Path) -> Path:
    """A run's own model.onnx stands for its model.pt where PyTorch is needed (Grad-CAM of a count made
    with it, adapt, AdaBN), if it is not older than model.pt: then it is an export of that very model."""
    twin = path.parent / "model.pt"
    return twin if path.name == RUN_ONNX and twin.is_file() and served_file(path.parent) == path else path


def _refuse_unfinished(path: Path) -> None:
    """A run whose training is still going (or was stopped) has a ``model.pt``, the best epoch so far,
    but no OOD scorer, export or report yet: served, it would flag nothing. :func:`wbcid.train.fit`
    writes ``report.md`` last, so a ``last.pt`` without one is a training that has not finished."""
    run = path if path.is_dir() else path.parent
    last = run / "last.pt"
    if path.suffix != ".onnx" and last.is_file() and not (run / "report.md").is_file():
        written = time.strftime("%Y-%m-%d %H:%M", time.localtime(last.stat().st_mtime))
        raise WbcidError(
            f"the training in {run} has not finished (its last epoch was saved {written}): its model has no "
            f"out-of-distribution scorer yet. Wait for it to end, or, if it was stopped, finish it with "
            f"`wbcid train --data DATA --out {run} --resume`"
        )


def resolve_model(
    model: Model | str | os.PathLike | None = None, needs_torch: str | None = None, precision: str = "fp32"
) -> Model:
    """A model ready for inference; the bundled one is served from ONNX (2x faster on CPU).

    ``needs_torch`` names what needs PyTorch (Grad-CAM, adaptation, AdaBN, export): the bundled
    model is then read from its ``.pt`` and an ONNX export is refused with that reason.
    ``precision`` (``fp32`` or ``bf16``, see :mod:`wbcid.serving`) applies to ONNX models.
    """
    refusal = f"{needs_torch} needs the PyTorch model (a run directory or .pt file), not ONNX"
    if isinstance(model, OnnxModel):
        if needs_torch:
            raise WbcidError(refusal)
        return model
    if model is not None and not isinstance(model, (str, os.PathLike)):
        from .models import WBCNet

        if not isinstance(model, WBCNet):
            raise WbcidError(f"expected a model, a run directory or a model file, not {type(model).__name__}")
        return model
    if model is None:
        path = BUNDLED_ONNX if not needs_torch and BUNDLED_ONNX.is_file() else BUNDLED
        if not path.is_file():
            raise WbcidError(f"this installation has no bundled model ({path}); pass --model RUN_DIR")
    else:
        path = Path(model)
    if path.is_dir() and not needs_torch:
        path = served_file(path)
    if needs_torch:
        path = _torch_twin(path)
    _refuse_unfinished(path)
    if path.suffix == ".onnx" and path.is_file():
        if needs_torch:
            raise WbcidError(f"{refusal}: {path}")
        loaded: Model = OnnxModel(path, precision=precision)
    else:
        from .models import load_checkpoint

        loaded = load_checkpoint(path)
    if path.resolve() in (BUNDLED.resolve(), BUNDLED_ONNX.resolve()) and loaded.config.training_data is None:
        # the bundled model saw every five-class cell of the five labs in wbcid's data folder (model card)
        loaded.config = replace(loaded.config, training_data=BUNDLED_TRAINING)
    return loaded


def describe_model(model: Model | str | os.PathLike | None) -> str:
    """How reports name a model: its path, the bundled one, or its architecture."""
    if model is None:
        return "bundled model (wbcid-default)"
    if isinstance(model, (str, os.PathLike)):
        return str(model)
    return model.config.model
