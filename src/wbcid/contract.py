"""What a model promises its users, importable without PyTorch: classes, config, outputs.

A model file (``model.pt`` or its ONNX export) carries a :class:`ModelConfig`; its outputs are
five logits in :data:`CLASSES` order and an ``ood_score`` whose meaning, :func:`flagged`, is the
same for every model (see :mod:`wbcid.ood`). Serving an ONNX model needs only this module,
so ``wbcid predict`` and ``wbcid count`` start without loading PyTorch (about 2 s).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np

from .errors import WbcidError

CLASSES: tuple[str, ...] = ("neutrophil", "lymphocyte", "monocyte", "eosinophil", "basophil")
BUNDLED = Path(__file__).parent / "weights" / "wbcid-default.pt"  # see weights/MODEL_CARD.md
BUNDLED_ONNX = BUNDLED.with_suffix(".onnx")  # the same model for ONNX Runtime: 2x faster on CPU
PRECISIONS = ("auto", "fp32", "bf16")  # arithmetic options of training, adaptation and serving
LOCAL_PATHS = {"verified", "base_path", "folder"}  # what an adaptation records that ModelConfig.shareable drops
BUNDLED_TRAINING = {"origin": None, "sources": ["pbc", "lisc", "tecom", "cellavision", "bccd"], "all_splits": True}
Freeze = str | int  # "none", "backbone", or the number of leading backbone layer groups to freeze


QUANTILE = 0.95  # an OOD threshold is this quantile of the model's validation cells' scores (wbcid.ood)
FEWEST_CALIBRATION = round(1 / (1 - QUANTILE))  # fewer validation cells: the quantile is their largest score


def flagged(ood_score: np.ndarray) -> np.ndarray:
    """Which predictions to check by eye: score above the threshold (NaN, i.e. no scorer: never)."""
    return np.asarray(ood_score, dtype=np.float64) > 1.0


@dataclass(frozen=True)
class ModelConfig:
    """The contract a model file keeps with its users: architecture, input, provenance.

    Stored as a plain dict (:meth:`to_dict`) inside ``model.pt`` and the ONNX metadata, so either
    file alone says how to feed the model. Frozen: a change is a new config (``dataclasses.replace``).
    """

    model: str  # registry name
    input_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: tuple[str, ...] = CLASSES
    freeze: Freeze = "none"
    crop: bool = False  # canonical cell-centred crop before resizing (set by training)
    colour: str = "none"  # colour normalisation (set by training; see wbcid.preprocess)
    frozen_bn: bool = False
    stain_reference: dict | None = None  # for colour="macenko"
    training_data: dict | None = None  # {"origin", "sources"[, "all_splits": True or sources]}: data.training_record
    adaptation: dict | None = None  # wbcid adapt's model: {"base", "base_path", "cells", "verified": [[path, label]]}
    tta: bool = False  # predict over the 8 rotations and flips unless told not to (adapted models: wbcid.adaptation)

    def to_dict(self) -> dict:
        return asdict(self)

    def shareable(self) -> ModelConfig:
        """This config without the local paths an adaptation records: the cells a lab verified
        (``adaptation["verified"]``; file names of a lab's images often carry sample numbers) and its
        base model's file (``base_path``; ``base`` still names it). Only a later ``wbcid adapt``, which
        reads ``model.pt``, needs them. What the ONNX export, the file a lab serves and shares, carries."""
        if not self.adaptation or not LOCAL_PATHS & self.adaptation.keys():
            return self
        return replace(self, adaptation={k: v for k, v in self.adaptation.items() if k not in LOCAL_PATHS})

    def unverified_warning(self) -> str | None:
        """For a model from ``wbcid adapt`` that saw no verified cell of some types from its lab, what
        a user must know before trusting its counts of them (None: there are none, or not adapted)."""
        missing = [name for name, n in (self.adaptation or {}).get("cells", {}).items() if n == 0]
        if not missing:
            return None
        return (
            f"adapted with no verified {', '.join(missing)} from its lab: the model knows these types from "
            "its training labs alone (the one such case measured, tecom's basophil, was missed in every "
            "draw: docs/adaptation.md); verify a few (wbcid review) and adapt again before trusting their counts"
        )

    @classmethod
    def from_dict(cls, saved: dict) -> ModelConfig:
        """Read a stored config; keys this version does not know are ignored (newer files still load)."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in saved.items() if k in known}
        for key in ("mean", "std", "classes"):
            if key in values:
                values[key] = tuple(values[key])
        try:
            return cls(**values)
        except TypeError as exc:
            raise WbcidError(f"model config is incomplete ({exc})") from exc
