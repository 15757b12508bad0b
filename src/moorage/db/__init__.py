"""The catalog database that the registry, security and jobs share: engine set-up, schema
migrations (`migrations/`, Alembic) and write serialisation (`catalog`), and the declarative base of
every table (`base`).

It imports nothing of moorage but `errors`, so the packages that keep tables here stay independent
of each other.
"""

from .base import Base, as_utc, utcnow
from .catalog import Catalog, CatalogUnavailable

__all__ = ["Base", "Catalog", "CatalogUnavailable", "as_utc", "utcnow"]
