"""wbcid: white-blood-cell identification that says how well it travels to a new lab."""

from .data import CLASSES, Cell, CellSet, read_cells
from .errors import WbcidError
from .evaluate import compute_metrics, evaluate
from .models import create_model, list_models, load_model, save_model
from .predict import predict
from .train import TrainConfig, fit

__version__ = "0.1.0"
__all__ = [
    "CLASSES", "Cell", "CellSet", "TrainConfig", "WbcidError", "compute_metrics", "create_model", "evaluate",
    "fit", "list_models", "load_model", "predict", "read_cells", "save_model",
]
