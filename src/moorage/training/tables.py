"""The datasets' tables in the catalog (SQLAlchemy 2), created by migration 0005. `Base` and the time
helpers come from `moorage.db`; `dataset_uses` points at the registry's versions, so its tables are
imported too (a use row goes when its model version is deleted)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import ForeignKeyConstraint, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from ..db import Base, utcnow
from ..registry import tables as _registry_tables  # noqa: F401  (model_versions, for the foreign key)


class Dataset(Base):
    __tablename__ = "datasets"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    description: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    created_by: Mapped[str] = mapped_column(String(128), default="")


class DatasetVersionRow(Base):
    __tablename__ = "dataset_versions"
    __table_args__ = (ForeignKeyConstraint(["dataset_name"], ["datasets.name"], ondelete="CASCADE"),)

    dataset_name: Mapped[str] = mapped_column(String(64), primary_key=True)
    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    # 'pending' while its files are being written, 'ready' once they all are
    status: Mapped[str] = mapped_column(String(16), default="pending")
    kind: Mapped[str] = mapped_column(String(16))
    digest: Mapped[str] = mapped_column(String(64), default="", index=True)
    label_map: Mapped[dict] = mapped_column(default=dict)
    split: Mapped[dict] = mapped_column(default=dict)  # the SplitSpec
    splits: Mapped[dict] = mapped_column(default=dict)  # {split: {"rows": n, "digest": sha256}}
    stats: Mapped[dict] = mapped_column(default=dict)
    source: Mapped[str] = mapped_column(Text, default="")
    path: Mapped[str] = mapped_column(String(256), default="")
    description: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    created_by: Mapped[str] = mapped_column(String(128), default="")


class DatasetUse(Base):
    """A model version made from a dataset version (``role``: trained, evaluated...)."""

    __tablename__ = "dataset_uses"
    __table_args__ = (
        ForeignKeyConstraint(
            ["dataset_name", "dataset_version"],
            ["dataset_versions.dataset_name", "dataset_versions.version"],
            ondelete="CASCADE",
        ),
        ForeignKeyConstraint(
            ["model_name", "model_version"],
            ["model_versions.model_name", "model_versions.version"],
            ondelete="CASCADE",
        ),
        UniqueConstraint("dataset_name", "dataset_version", "model_name", "model_version", "role"),
        Index("ix_dataset_uses_model", "model_name", "model_version"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    dataset_name: Mapped[str] = mapped_column(String(64))
    dataset_version: Mapped[int] = mapped_column(Integer)
    model_name: Mapped[str] = mapped_column(String(64))
    model_version: Mapped[int] = mapped_column(Integer)
    role: Mapped[str] = mapped_column(String(32), default="trained")
    at: Mapped[datetime] = mapped_column(default=utcnow)
