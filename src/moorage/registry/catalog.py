"""The catalog database moved to `moorage.db`; these names stay importable from here."""

from ..db.catalog import Catalog, CatalogUnavailable

__all__ = ["Catalog", "CatalogUnavailable"]
