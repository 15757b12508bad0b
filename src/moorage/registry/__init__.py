"""Model registry: versioned artifacts (fsspec) with a SQL catalog (SQLAlchemy + Alembic)."""

from .manifest import TASKS, FileEntry, Lineage, Manifest
from .service import HistoryEntry, ModelSummary, Registry, VersionInfo
from .store import NoProgress, Progress
from .transfer import export_model, import_models

__all__ = [
    "TASKS",
    "FileEntry",
    "HistoryEntry",
    "Lineage",
    "Manifest",
    "ModelSummary",
    "NoProgress",
    "Progress",
    "Registry",
    "VersionInfo",
    "export_model",
    "import_models",
]
