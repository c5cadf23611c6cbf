"""Review in the browser: verify a count's cells, keep every correction, export them (``wbcid review``)."""

from .app import create_app, serve
from .export import export_review, export_summary
from .store import LABELS, ReviewStore

__all__ = ["LABELS", "ReviewStore", "create_app", "export_review", "export_summary", "serve"]
