"""wbcid: white-blood-cell identification that says how well it travels to a new lab.

The public API is imported on first use (PEP 562), so ``wbcid predict`` does not load the
training stack (PyTorch, kornia, scikit-learn, matplotlib) it never needs. No implementation module has
the name of a function exported here (``wbcid.evaluation`` holds ``evaluate``), so
``from wbcid import evaluate`` is always the function, whatever was imported before.
"""

from importlib import import_module

__version__ = "0.3.0"

_API = {
    "CLASSES": "contract",
    "Cell": "data",
    "CellSet": "data",
    "read_cells": "data",
    "draw_per_class": "splits",
    "WbcidError": "errors",
    "compute_metrics": "evaluation",
    "evaluate": "evaluation",
    "create_model": "models",
    "list_models": "models",
    "save_model": "models",
    "ModelConfig": "contract",
    "OnnxModel": "serving",
    "resolve_model": "loading",
    "predict": "inference",
    "count": "smear.counting",
    "differential": "smear.differential",
    "detect_cells": "smear.detect",
    "detect_cells_learned": "smear.learned",
    "train_detector": "smear.train_detector",
    "explain": "gradcam",
    "TrainConfig": "train",
    "fit": "train",
    "AdaptConfig": "adaptation",
    "adapt": "adaptation",
    "ReviewStore": "web",
    "export_review": "web",
    "run_benchmark": "benchmark",
    "export_onnx": "export",
}
__all__ = sorted(_API)


def __getattr__(name: str):
    if name in _API:
        return getattr(import_module(f".{_API[name]}", __name__), name)
    raise AttributeError(f"module 'wbcid' has no attribute {name!r}")
