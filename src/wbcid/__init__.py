"""wbcid: white-blood-cell identification that says how well it travels to a new lab.

The public API is imported on first use (PEP 562), so ``wbcid predict`` does not load the
training stack (kornia, scikit-learn, matplotlib) it never needs.
"""

from importlib import import_module

__version__ = "0.2.0"

_API = {
    "CLASSES": "data", "Cell": "data", "CellSet": "data", "read_cells": "data",
    "WbcidError": "errors",
    "compute_metrics": "evaluate", "evaluate": "evaluate",
    "create_model": "models", "list_models": "models", "load_model": "models", "save_model": "models",
    "predict": "predict",
    "count": "count", "differential": "count", "detect_cells": "detect",
    "explain": "explain",
    "TrainConfig": "train", "fit": "train",
    "run_benchmark": "benchmark",
    "export_onnx": "export",
}
__all__ = sorted(_API)


def __getattr__(name: str):
    if name in _API:
        return getattr(import_module(f".{_API[name]}", __name__), name)
    raise AttributeError(f"module 'wbcid' has no attribute {name!r}")
